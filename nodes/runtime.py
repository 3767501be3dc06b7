"""The only module that imports ``comfy.*`` / ``folder_paths``.

Everything ComfyUI-specific (devices, dtypes, model management, progress bars, interrupts,
model folders, the output folder) is asked here. When ComfyUI is absent (tests, the CLI) the
same calls fall back to plain torch, so the node classes import and run anywhere.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import tempfile
import threading
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

try:  # ComfyUI present
    import comfy.model_management as _mm  # type: ignore
    import comfy.model_patcher as _mp  # type: ignore
    import comfy.utils as _cu  # type: ignore
    import folder_paths as _fp  # type: ignore

    COMFY = True
except ImportError:  # tests, CLI
    _mm = _mp = _cu = _fp = None
    COMFY = False

# The sonic_core package: a sibling package inside ComfyUI (the pack is imported as a package),
# the top-level ``sonic_core`` in tests and the CLI (the repository root is on sys.path).
_PACK = __package__.rsplit(".", 1)[0] if __package__ and "." in __package__ else None
CORE_PACKAGE = f"{_PACK}.sonic_core" if _PACK else "sonic_core"


def core(name: str):
    """Import ``sonic_core.<name>`` whichever way this pack was imported."""
    return importlib.import_module(f"{CORE_PACKAGE}.{name}")


# ----------------------------------------------------------------------------------------------
# Interrupts
# ----------------------------------------------------------------------------------------------
if COMFY:
    InterruptProcessingException = _mm.InterruptProcessingException
else:

    class InterruptProcessingException(Exception):
        """Raised when the user cancels (fallback twin of ComfyUI's exception)."""


_interrupt = threading.Event()


def request_interrupt() -> None:
    """Ask the running job to stop at its next check (fallback mode; ComfyUI has its own).

    Without ComfyUI a request made while nothing runs is dropped when the next job starts
    (``start_job``), as ComfyUI clears its flag when a prompt starts."""
    if COMFY:
        _mm.interrupt_current_processing(True)
    else:
        _interrupt.set()


def start_job() -> None:
    """A job begins: drop a cancel requested while idle (ComfyUI clears its own flag per prompt)."""
    if not COMFY and _interrupt.is_set():
        log.info("a cancel requested while nothing ran is dropped: the new job runs")
        _interrupt.clear()


def check_interrupt() -> None:
    """Raise InterruptProcessingException if the user cancelled."""
    if COMFY:
        _mm.throw_exception_if_processing_interrupted()
    elif _interrupt.is_set():
        _interrupt.clear()
        raise InterruptProcessingException("cancelled")


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------
class Progress:
    """A progress bar in the ComfyUI UI (or a log line every 10 % without ComfyUI).

    ``update`` also checks for cancellation, so a loop that reports progress is cancellable.
    """

    def __init__(self, total: int, what: str = "Sonic"):
        start_job()  # every node run reports progress: its bar is where a job starts
        self.total = max(int(total), 1)
        self.current = 0
        self.what = what
        self._bar = _cu.ProgressBar(self.total) if COMFY else None
        self._last_decile = -1

    def update(self, n: int = 1, preview: Any = None) -> None:
        self.current = min(self.current + n, self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.current, self.total, preview)
        else:
            decile = self.current * 10 // self.total
            if decile != self._last_decile:
                self._last_decile = decile
                log.info("%s: %d/%d", self.what, self.current, self.total)
        check_interrupt()

    def callback(self) -> Callable[..., None]:
        """A ``callback(done, total, *_)`` for sonic_core loops."""

        def _cb(done: int, total: int, *_: Any) -> None:
            self.total = max(int(total), 1)
            self.update(done - self.current)

        return _cb


# ----------------------------------------------------------------------------------------------
# Devices and dtypes
# ----------------------------------------------------------------------------------------------
def load_device() -> torch.device:
    """Where models compute."""
    if COMFY:
        return _mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    """Where models wait between runs."""
    return _mm.unet_offload_device() if COMFY else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where results handed between nodes live."""
    return _mm.intermediate_device() if COMFY else torch.device("cpu")


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_CHOICES = ["auto", "fp16", "bf16", "fp32"]


def resolve_dtype(choice: str, device: torch.device | None = None, params: int = 0) -> torch.dtype:
    """``auto`` asks ComfyUI (fp32 on CPU without ComfyUI); otherwise the named dtype."""
    if choice != "auto":
        if choice not in DTYPES:
            raise ValueError(f"dtype {choice!r} is not one of {DTYPE_CHOICES}")
        return DTYPES[choice]
    device = device or load_device()
    if COMFY:
        return _mm.unet_dtype(device=device, model_params=params)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator (ComfyUI's figure includes its own freeable cache); None on CPU."""
    if device.type == "cpu":
        return None
    if COMFY:
        return int(_mm.get_free_memory(device))
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return None


def latent_previewer() -> Callable[[torch.Tensor], Any] | None:
    """``f(latents [B,4,h,w] scaled SD-style) -> preview`` for ``Progress.update``, or None.

    Uses ComfyUI's previewer for the SD1.x/SVD latent format (the method chosen in its settings);
    None without ComfyUI or when previews are off.
    """
    if not COMFY:
        return None
    try:
        import comfy.latent_formats as _lf  # type: ignore
        import latent_preview as _lp  # type: ignore

        previewer = _lp.get_previewer(load_device(), _lf.SD15())
    except Exception as e:  # previews are a convenience: never fail a run for them
        log.debug("no latent preview: %s", e)
        return None
    if previewer is None:
        return None
    return lambda latents: previewer.decode_latent_to_preview_image("JPEG", latents[:1])


# ----------------------------------------------------------------------------------------------
# The core VIDEO type (comfy_api's VideoInput: SaveVideo, GetVideoComponents, CreateVideo)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoFile:
    """The VIDEO output where ComfyUI's own type is absent (tests, scripts, a ComfyUI older than
    comfy_api): the saved file's path, with the one call of comfy_api's VideoFromFile that reads it."""

    path: str

    def get_stream_source(self) -> str:
        return self.path


def video_output(path: str) -> Any:
    """The core VIDEO value of a saved video file: comfy_api's ``VideoFromFile(path)`` (imported as
    ``comfy_api.input_impl.VideoFromFile`` in ComfyUI 0.3.64 and 0.8.0), else a ``VideoFile``. Both
    only hold the path: the frames are read when a later node asks for them."""
    if COMFY:
        try:
            from comfy_api.input_impl import VideoFromFile  # type: ignore
        except ImportError:  # a ComfyUI from before the VIDEO type
            log.debug("comfy_api.input_impl.VideoFromFile is absent: VIDEO output is a plain VideoFile")
        else:
            return VideoFromFile(path)
    return VideoFile(path)


def video_not_ready() -> Any:
    """The VIDEO output of a run that has no file yet (a segment before the last one of a clip): with
    ComfyUI a silent ExecutionBlocker, so the nodes after the VIDEO output skip that run and run once,
    after the last segment, on the whole video; None without ComfyUI."""
    if COMFY:
        try:
            from comfy_execution.graph_utils import ExecutionBlocker  # type: ignore
        except ImportError:
            return None
        return ExecutionBlocker(None)  # None: blocked without an error message
    return None


class _Holder(torch.nn.Module):
    """What the model patcher manages: ComfyUI assigns ``model.device``, a read-only property on
    diffusers / transformers models, so those sit one level down as ``inner``.

    Both patchers ask the managed module only for what every nn.Module has: its state dict
    (``model_size``), named modules, parameters and buffers (the load lists), and they set plain
    attributes on it (``device``, ``model_loaded_weight_memory``, ...; ComfyUI 0.33's dynamic
    patcher also ``dynamic_vbars``, ``dynamic_pins``, ``dynamic_patchers``). ``get_dtype``,
    ``memory_required`` and ``get_dynamic_vram__units`` are optional and left out: our layers are
    plain torch layers, not comfy.ops casting layers, so the dynamic patcher loads their weights
    whole onto the GPU (as it does for an upscale model) and frees them whole when VRAM is short;
    what changes is that loading them no longer unloads the other dynamic models."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


_holder_classes: dict[str, type] = {}


def holder(module: torch.nn.Module, name: str | None = None) -> _Holder:
    """``module`` in a holder whose class is called ``name`` (default: the module's class name):
    ComfyUI logs "Requested to load <class name of the managed module>", so the log names the model."""
    name = name or type(module).__name__
    if not name.isidentifier():
        raise ValueError(f"model name {name!r} must be a Python identifier (it becomes a class name)")
    if name not in _holder_classes:
        doc = f"{name} under ComfyUI's model management."
        _holder_classes[name] = type(name, (_Holder,), {"__doc__": doc})
    return _holder_classes[name](module)


def patcher_class() -> type | None:
    """The model patcher class ComfyUI uses at run time: ``comfy.model_patcher.CoreModelPatcher``
    where it exists (ComfyUI 0.33's main.py points it at ``ModelPatcherDynamic`` when dynamic VRAM
    works, on NVIDIA and recent ROCm; that class hands a CPU load device back to the plain
    ``ModelPatcher``), else ``ModelPatcher``. Read when a model is wrapped, never at import: main.py
    sets it after the custom nodes are imported. None without ComfyUI."""
    if not COMFY:
        return None
    return getattr(_mp, "CoreModelPatcher", None) or _mp.ModelPatcher


class ManagedModel:
    """An nn.Module under ComfyUI's model management (``patcher_class()``), or plain torch without it.

    Call ``load()`` right before use: ComfyUI loads the weights onto the load device (freeing
    other models first if needed: under dynamic VRAM only what does not fit) and it returns the
    module. The module object stays the same; the dynamic patcher swaps its parameters in place.
    """

    def __init__(self, module: torch.nn.Module, load_dev: torch.device | None = None,
                 offload_dev: torch.device | None = None, name: str | None = None):
        self.load_device = load_dev or load_device()
        self.offload_device = offload_dev or offload_device()
        module.to(self.offload_device)
        self.module = module
        self.holder = holder(module, name)  # its class name is what ComfyUI's log shows
        cls = patcher_class()
        self.patcher = cls(self.holder, self.load_device, self.offload_device) if cls is not None else None
        if self.patcher is not None:
            log.debug("%s under %s", type(self.holder).__name__, type(self.patcher).__name__)

    def load(self) -> torch.nn.Module:
        if self.patcher is not None:
            _mm.load_models_gpu([self.patcher])
        else:
            self.module.to(self.load_device)
        return self.module

    def offload(self) -> None:
        if self.patcher is None:
            self.module.to(self.offload_device)


# ----------------------------------------------------------------------------------------------
# Node metadata read by today's frontend (ComfyUI 0.33: search aliases, advanced inputs); older
# frontends ignore both, and saved workflows are unchanged (an advanced widget keeps its place)
# ----------------------------------------------------------------------------------------------
# what users type in the node search to find any Sonic node
SEARCH_ALIASES = ("sonic", "talking head", "lip sync", "portrait animation", "talking avatar", "数字人", "口型",
                  "对口型")


def search_aliases(*own: str) -> list[str]:
    """A node's ``SEARCH_ALIASES``: its own words first, then the pack's (``SEARCH_ALIASES``)."""
    return list(dict.fromkeys((*own, *SEARCH_ALIASES)))


def advanced(spec: dict, names: tuple[str, ...]) -> dict:
    """``spec`` (an INPUT_TYPES dict) with ``"advanced": True`` on the inputs ``names``: inputs whose
    official value is right for almost everyone, which the frontend hides until the user asks. The
    options are copied (a spec shared between nodes is not changed) and the order is kept."""
    missing = set(names) - {n for section in spec.values() for n in section}
    if missing:
        raise KeyError(f"advanced inputs {sorted(missing)} are not inputs of this node")
    out = {}
    for section, inputs in spec.items():
        out[section] = {}
        for name, value in inputs.items():
            if name in names:
                kind, opts = value[0], value[1] if len(value) > 1 else {}
                value = (kind, {**opts, "advanced": True}, *value[2:])
            out[section][name] = value
    return out


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------
MODEL_FOLDER = "sonic"  # ComfyUI/models/sonic
MODELS_ENV = "SONIC_MODELS_DIR"  # fallback model folder without ComfyUI
OUTPUT_ENV = "SONIC_OUTPUT_DIR"  # fallback output folder without ComfyUI
RESUME_ENV = "SONIC_RESUME_DIR"  # where sampler states are kept (default: see resume_dir)
_registered = False


def model_dirs(folder: str = MODEL_FOLDER) -> list[str]:
    """Folders searched for Sonic weights (registered with ComfyUI on first use)."""
    global _registered
    if COMFY:
        if not _registered:
            _fp.add_model_folder_path(folder, os.path.join(_fp.models_dir, folder))
            _registered = True
        return list(_fp.get_folder_paths(folder))
    return [os.environ.get(MODELS_ENV, os.path.join(os.getcwd(), "models", folder))]


def list_files(suffixes: tuple[str, ...], folder: str = MODEL_FOLDER) -> list[str]:
    """Relative paths of weight files with one of ``suffixes`` under the model folders."""
    found: set[str] = set()
    for root in model_dirs(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if f.lower().endswith(suffixes):
                    found.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def list_subfolders(marker: str, folder: str = MODEL_FOLDER) -> list[str]:
    """Relative paths of folders under the model folders that contain a file named ``marker``."""
    found: set[str] = set()
    for root in model_dirs(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            if marker in files and dirpath != root:
                found.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return sorted(found)


def _path_error(kind: str, message: str) -> Exception:
    """The error class a path of ``kind`` (sonic_core.paths.describe_path) gets."""
    cls = {"dangling symlink": FileNotFoundError, "permission denied": PermissionError}.get(kind, ValueError)
    return cls(message)


def resolve_path(name: str, folder: str = MODEL_FOLDER) -> str:
    """Absolute path of ``name`` inside a model folder; absolute paths pass through if they exist.

    A relative name may not climb out of the folder (``..``). Symlinks inside it are followed
    wherever they point, as long as they reach a regular file or a folder: the model folders are
    the user's own, and a Hugging Face cache (``hf download --local-dir`` or a linked snapshot)
    is all symlinks. The path returned is the link's own, so its name and suffix stay.
    """
    paths = core("paths")  # what a path that is not a file or folder really is (a FIFO is never opened)
    usable = (paths.FILE, paths.FOLDER, "empty file")  # an empty file: its loader says so, with what to do
    if os.path.isabs(name) and os.path.lexists(name):
        kind, words = paths.describe_path(name)
        if kind in usable:
            return name
        raise _path_error(kind, f"{name} {words}; give a model file or folder (see README 'Weights')")
    if os.path.isabs(name) or ".." in re.split(r"[\\/]+", name):
        raise ValueError(f"{name!r} points outside the model folder {model_dirs(folder)[0]}: give a name "
                         "relative to it, without '..' (symlinks inside the folder may point anywhere)")
    for root in model_dirs(folder):
        full = os.path.abspath(os.path.join(root, name))
        kind, words = paths.describe_path(full)  # follows symlinks
        if kind in usable:
            return full
        if kind != "missing":
            raise _path_error(kind, f"{name!r} in {root} {words}; fix or remove it, and put the model file "
                                    "or folder there (see README 'Weights')")
    raise FileNotFoundError(
        f"{name!r} was not found in {model_dirs(folder)}: put the file there (see README 'Weights')"
    )


def output_dir() -> str:
    """ComfyUI's output folder (or $SONIC_OUTPUT_DIR / ./output without ComfyUI)."""
    if COMFY:
        return _fp.get_output_directory()
    return os.environ.get(OUTPUT_ENV, os.path.join(os.getcwd(), "output"))


def resume_dir() -> str:
    """Where the sampler keeps its state after every step (sonic_core/resume.py): $SONIC_RESUME_DIR,
    else ComfyUI's user folder (not its temp folder: ComfyUI empties that at every start, which
    would lose the state exactly when a crash makes resuming worth it), else the system temp folder."""
    folder = core("config").RESUME_FOLDER  # through core(): inside ComfyUI the pack is a package
    if os.environ.get(RESUME_ENV):
        return os.environ[RESUME_ENV]
    if COMFY:
        return os.path.join(_fp.get_user_directory(), folder)
    return os.path.join(tempfile.gettempdir(), folder)


def metadata_enabled() -> bool:
    """False when ComfyUI runs with --disable-metadata (saved files then carry no workflow)."""
    if not COMFY:
        return True
    from comfy.cli_args import args  # type: ignore

    return not getattr(args, "disable_metadata", False)


# ----------------------------------------------------------------------------------------------
# Long clips: segments queued one after another, decoding either kind of VAE chunk by chunk
# ----------------------------------------------------------------------------------------------
KEPT_RESULT_KEY = "sonic_kept_result"  # in the sampler's LATENT: the file its result is kept in (resume.py)


def cache_mode_of(args: Any) -> str:
    """The cache ComfyUI's main.py builds from its parsed command line ``args`` (comfy.cli_args):
    "classic" (the last prompt's outputs), "lru" (--cache-lru N), "ram" (outputs evicted when free
    RAM is short) or "none" (--cache-none: nothing kept).

    Up to 0.8.0 classic is the default and --cache-ram [GB] (0.8.0, a float, 0 = off) selects
    RAM pressure. Where ``cache_ram`` is a list (0.33.0: --cache-ram [GB [GB]], default []),
    RAM pressure is the default and only --cache-classic (or --high-ram, which sets it),
    --cache-lru N and --cache-none select another cache."""
    ram = getattr(args, "cache_ram", None)
    if isinstance(ram, (list, tuple)):  # 0.33.0 and later: RAM pressure unless told otherwise
        if getattr(args, "cache_classic", False):
            return "classic"
        if getattr(args, "cache_lru", 0) > 0:
            return "lru"
        if getattr(args, "cache_none", False):
            return "none"
        return "ram"
    if getattr(args, "cache_lru", 0) > 0:  # 0.8.0's order: lru, then ram, then none
        return "lru"
    if ram:
        return "ram"
    if getattr(args, "cache_none", False):
        return "none"
    return "classic"


def cache_mode() -> str:
    """ComfyUI's cache of node outputs between queued prompts (see ``cache_mode_of``); "classic"
    without ComfyUI."""
    if not COMFY:
        return "classic"
    from comfy.cli_args import args  # type: ignore

    return cache_mode_of(args)


CACHE_MODE_NAMES = {  # how the log names each cache mode (RAM pressure is 0.33.0's default: no flag)
    "classic": "the classic cache", "lru": "--cache-lru", "none": "--cache-none",
    "ram": "the RAM-pressure cache (--cache-ram; ComfyUI 0.33's default)",
}


def cache_forgets_outputs() -> bool:
    """True when ComfyUI runs with --cache-none: then nothing (the sampler's latents included) is
    kept between two queued prompts, so a clip rendered in segments would be sampled again for each
    (unless the sampler kept its result on disk, see KEPT_RESULT_KEY)."""
    return cache_mode() == "none"


def queue_prompt_again(node_id: str, input_name: str, value: Any) -> bool:
    """Queue the prompt that is running now once more, first in line, with one input of one node
    changed (``prompt[node_id]["inputs"][input_name] = value``): the way a clip's next segment runs
    while ComfyUI's cache keeps every unchanged node's output (the sampler's latents). Returns False
    without ComfyUI's server (tests, scripts drive the segments themselves)."""
    if not COMFY:
        return False
    import copy
    import uuid

    try:
        import server  # type: ignore  # ComfyUI's server module

        srv = server.PromptServer.instance
        queue = srv.prompt_queue
    except (ImportError, AttributeError):
        return False
    with queue.mutex:
        running = list(queue.currently_running.values())
    # a queue item is (number, prompt_id, prompt, extra_data, outputs_to_execute, ...)
    item = next((it for it in running if it[1] == getattr(srv, "last_prompt_id", None)), None)
    if item is None and len(running) == 1:
        item = running[0]
    if item is None:
        log.warning("cannot find the running prompt to queue the next segment; queue it by hand with "
                    "%s = %r", input_name, value)
        return False
    prompt = copy.deepcopy(item[2])
    if node_id not in prompt:
        log.warning("node %s is not in the running prompt; queue the next segment by hand", node_id)
        return False
    prompt[node_id]["inputs"][input_name] = value
    number = -srv.number  # negative numbers run before the ones the UI queued ("front")
    srv.number += 1
    queue.put((number, str(uuid.uuid4()), prompt, copy.deepcopy(item[3]), list(item[4]), *item[5:]))
    return True


class ChunkDecoder:
    """``decode(latents, chunk_size)`` for sonic_core.stream on either VAE: sonic_core's SVD VAE is
    told the chunk; ComfyUI's VAE is handed exactly one chunk per call, so its temporal decoder
    sees the same consecutive frames as in one pass of that chunk size (it may split further only
    when memory is short). Frames come back ``[c, H, W, 3]`` on the intermediate device."""

    def __init__(self, vae):
        self.vae = vae
        self.ours = isinstance(vae, core("models.svd").SVDVAE)

    def chunk_size(self, requested: int) -> int:
        """``requested`` if > 0, else the VAE's own decode_chunk_size (official 8)."""
        if requested > 0:
            return int(requested)
        return int(getattr(self.vae, "decode_chunk_size", 0) or core("config").SAMPLER_DEFAULTS.decode_chunk_size)

    def decode(self, latents: torch.Tensor, chunk_size: int) -> torch.Tensor:
        if self.ours:
            out = self.vae.decode(latents, chunk_size, callback=lambda *_: check_interrupt())
        else:
            if latents.shape[0] > chunk_size:
                raise ValueError(f"{latents.shape[0]} latents in one chunk of {chunk_size}")
            out = self.vae.decode(latents)
        check_interrupt()
        return out[..., :3].to(intermediate_device())
