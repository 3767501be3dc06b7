"""A real ComfyUI server loads the pack, serves our node specs, renders a tiny Sonic video and
stops the sampler on Cancel; ComfyUI's own VAE Encode / VAE Decode nodes run on SonicSVDLoader's VAE.

Skipped unless ``COMFYUI_PATH`` names a ComfyUI source tree (the folder holding main.py).
``COMFYUI_PYTHON`` is the interpreter that has ComfyUI's requirements and ours (default: this one);
``COMFYUI_STUBS``, when set, goes in front of the server's LD_LIBRARY_PATH (the CUDA stub libraries
that let PyPI's torchvision/torchaudio import next to a CPU torch, see ../shared/tools/README.md).

The server runs with ``--cpu`` on 127.0.0.1 and a free port, with its own base (custom_nodes,
input, user), output and model folders under a temporary directory and an in-memory database, so
the ComfyUI tree is left untouched. The pack is linked in as ``custom_nodes/ComfyUI-Sonic``. The
render runs workflows/api/sonic_basic.json when it exists (SonicSVDLoader in place of the SVD
checkpoint loader), otherwise the same graph built here from the node specs, on tiny random
weights: the golden case's when ../shared is present (its settings, image and audio), otherwise the
selftest's (sonic_core/selftest.write_tiny_models, the official file formats), so the render and
cancel tests never depend on ../shared.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._golden import REPO, Golden, golden_base
from tests._model_files import write_golden_svd_folder
from tests._workflows import (FRONTEND_SENT_WIDGETS, combo_choices, input_options, input_type, is_widget,
                              ordered_inputs)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "main.py").is_file():
    pytest.skip("COMFYUI_PATH does not name a ComfyUI source tree (a folder with main.py); set it (and "
                "COMFYUI_PYTHON, COMFYUI_STUBS) to run the pack in a real ComfyUI", allow_module_level=True)

HOST = "127.0.0.1"
PACK_LINK = "ComfyUI-Sonic"
STARTUP_TIMEOUT_S = 300.0  # ComfyUI import + our pack on a busy 2-core CPU
RUN_TIMEOUT_S = 600.0  # the tiny workflow end to end
POLL_S = 0.5
LOG_TAIL_CHARS = 6000
IMAGE_NAME = "sonic_test_face.png"
AUDIO_NAME = "sonic_test_speech.wav"
RIFE_NAME = "RIFE/flownet.pkl"
VIDEO_PREFIX = "sonic_real_comfyui"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov")
PCM16_SCALE = 32768.0  # int16 full scale
BASIC_API = REPO / "workflows" / "api" / "sonic_basic.json"
PASTE_API = REPO / "workflows" / "api" / "sonic_paste_back.json"
CHECKPOINT_LOADER = "ImageOnlyCheckpointLoader"  # what sonic_basic.json loads svd_xt with
# The basic graph in execution order; each input is fed by the latest earlier output of its type.
CHAIN = ("LoadImage", "LoadAudio", "SonicLoader", "SonicSVDLoader", "SonicFaceMaskDetect",
         "SonicWhisperAudioEncode", "SonicMotionBucketPredict", "SonicSampler", "VAEDecode",
         "SonicFrameInterpolate", "SonicVideoCombine")
LINKED_OPTIONAL = {"MASK", "AUDIO"}  # optional inputs the basic graph connects: drawn face mask, soundtrack
AUDIO_DURATION_TOL_S = 0.15  # encoder priming/padding of the muxed audio
SAMPLER_STARTED = "Sonic sampler:"  # the first log line of SonicSampler's run
INTERRUPT_TIMEOUT_S = 60.0  # from /interrupt to the end of the run: one window's UNet call, busy CPU
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes in ComfyUI 0.33's console log
LEVEL_TAG = re.compile(r"^\[(?:DEBUG|DETAIL|INFO|WARNING|ERROR|CRITICAL)\] ", re.M)  # 0.33's line prefix


# ----------------------------------------------------------------------------------------------
# HTTP on 127.0.0.1 only (never through a proxy)
# ----------------------------------------------------------------------------------------------
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(url: str, body: dict | None = None, timeout: float = 30.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _OPENER.open(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode() or "null")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Files the server reads: tiny models, one image, one audio clip
# ----------------------------------------------------------------------------------------------
def _write_inputs(g: Golden, input_dir: Path) -> None:
    """The golden portrait as RGBA PNG whose transparent pixels cover the face box (LoadImage turns
    them into its MASK), and the golden waveform as 16-bit mono WAV."""
    import numpy as np
    from PIL import Image

    rgb = g.t("input.image_rgb_u8").numpy()  # (H, W, 3) uint8
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)  # (H, W)
    x, y, w, h = (float(v) for v in g.meta["inputs"]["faces_xywh"][0])
    alpha[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(input_dir / IMAGE_NAME)  # (H, W, 4) -> RGBA

    pcm = (g.t("input.waveform").double() * PCM16_SCALE).round().clamp(-PCM16_SCALE, PCM16_SCALE - 1)
    with wave.open(str(input_dir / AUDIO_NAME), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(g.meta["inputs"]["sample_rate"]))
        f.writeframes(pcm.short().numpy().tobytes())


@dataclass
class RenderCase:
    """What the render tests need: loader picks, settings and the expected video."""

    name: str
    loader_files: dict[str, str]
    svd_dir: Path
    sampler: dict  # SonicSampler widget values
    min_resolution: int
    decode_chunk_size: int
    frames: int  # generated frames (12.5 fps); RIFE makes 2F - 1
    side: int  # px, square frame size for the VAE-node test
    audio_seconds: float
    max_seconds: float = 0.0  # the audio node's cap (a golden case's frame_num)


def _golden_case(g: Golden, model_dir: Path, input_dir: Path) -> RenderCase:
    files = _write_models(g, model_dir)
    svd_dir = write_golden_svd_folder(g, model_dir / "svd-tiny")  # listed by SonicSVDLoader
    _write_inputs(g, input_dir)
    c = g.case
    sampler = {"seed": c.seed, "steps": c.steps, "min_resolution": c.min_resolution, "overlap": c.overlap,
               "frames_per_window": c.frames_per_window, "shift_offset": c.shift_offset,
               "min_appearance_guidance": c.min_appearance_guidance,
               "max_appearance_guidance": c.max_appearance_guidance,
               "min_audio_guidance": c.audio_guidance, "max_audio_guidance": c.audio_guidance,
               "noise_aug": c.noise_aug_strength, "i2i_strength": c.i2i_strength,
               "fps_conditioning": c.fps_conditioning}
    audio_s = g.t("input.waveform").shape[0] / g.meta["inputs"]["sample_rate"]
    return RenderCase(f"golden {g.name}", files, svd_dir, sampler, c.min_resolution, c.decode_chunk_size,
                      int(g.scalars["num_frames"]), int(g.t("out.video").shape[3]), audio_s, c.max_seconds)


TINY_RENDER = {"steps": 2, "min_resolution": 64, "frames_per_window": 4, "overlap": 1, "shift_offset": 3}


def _tiny_case(model_dir: Path, input_dir: Path) -> RenderCase:
    """The selftest's tiny random models in the documented layout, its portrait (transparent pixels
    mark the face) and its voice clip: no ../shared needed."""
    import math

    import av

    from sonic_core import audio as A
    from sonic_core import selftest
    from sonic_core.pipeline import SVD_FOLDER, WHISPER_FOLDER

    selftest.write_tiny_models(model_dir)
    selftest.write_portrait(input_dir / IMAGE_NAME)
    selftest.write_voice(input_dir / AUDIO_NAME)
    with av.open(str(input_dir / AUDIO_NAME)) as c:
        n, rate = sum(f.samples for f in c.decode(audio=0)), c.streams.audio[0].rate
    _len, frames = A.frame_counts(math.ceil(n * A.SAMPLE_RATE / rate))  # resampled to 16 kHz first
    files = {"unet": "Sonic/unet.pth", "audio2token": "Sonic/audio2token.pth",
             "audio2bucket": "Sonic/audio2bucket.pth", "whisper": WHISPER_FOLDER}
    return RenderCase("selftest tiny models", files, model_dir / SVD_FOLDER, dict(TINY_RENDER),
                      TINY_RENDER["min_resolution"], 4, frames, 64, n / rate)


def _write_models(g: Golden, model_dir: Path) -> dict[str, str]:
    import torch

    from sonic_core.config import RIFE_STATE_PREFIX
    from tests._model_files import write_golden_models

    files = write_golden_models(g, model_dir)
    (model_dir / RIFE_NAME).parent.mkdir(parents=True)
    torch.save({RIFE_STATE_PREFIX + k: v for k, v in g.weights("rife").items()}, model_dir / RIFE_NAME)
    return files


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    model_dir: Path
    output_dir: Path
    svd_dir: Path | None
    case: RenderCase
    loader_files: dict[str, str]
    third_party_stubbed: bool = False  # the example workflows' third-party nodes are known

    def log_text(self) -> str:
        """The server's log as plain lines: ANSI escapes removed and, from ComfyUI 0.33 on (app/logger.py
        starts every line with a coloured "[INFO] " tag, no switch to turn it off), the level tag too."""
        text = ANSI_ESCAPE.sub("", self.log.read_text(errors="replace"))
        return LEVEL_TAG.sub("", text)

    def log_tail(self) -> str:
        return self.log_text()[-LOG_TAIL_CHARS:]


def _cli_flags() -> str:
    return (Path(COMFYUI_PATH) / "comfy" / "cli_args.py").read_text()


def _link_pack(custom_nodes: Path) -> Path | None:
    """Link the repository in as custom_nodes/ComfyUI-Sonic; the link to remove afterwards, if any."""
    link = custom_nodes / PACK_LINK
    if link.is_symlink() and link.resolve() == REPO.resolve():
        return None  # already there (a developer's own checkout): use it, leave it
    if link.exists() or link.is_symlink():
        pytest.fail(f"{link} exists and is not a link to {REPO}; move it away to run this test")
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link.symlink_to(REPO.resolve(), target_is_directory=True)
    return link


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode} while starting:\n"
                        f"{log.read_text(errors='replace')[-LOG_TAIL_CHARS:]}")
        try:
            _request(f"{url}/system_stats", timeout=5.0)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(POLL_S)
    pytest.fail(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n"
                f"{log.read_text(errors='replace')[-LOG_TAIL_CHARS:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


# Stand-ins for the third-party nodes the example workflows use (their specs in workflows/specs/),
# so the frontend knows them; they never run.
# A combo that lists a model folder (STUB_MODEL_LISTS) lists it here too, as the real node does.
SPEC_STUBS = """import json, pathlib
import folder_paths
_SPECS = json.loads(pathlib.Path(%r).read_text())
_MODEL_LISTS = %r


def _inputs(name, spec):
    inputs = json.loads(json.dumps(spec["input"]))
    for key, folder in _MODEL_LISTS.get(name, {}).items():
        inputs["required"][key] = [folder_paths.get_filename_list(folder)]
    return inputs


NODE_CLASS_MAPPINGS = {
    name: type(name, (), {"INPUT_TYPES": classmethod(lambda cls, n=name, s=spec: _inputs(n, s)),
                          "RETURN_TYPES": tuple(spec["output"]), "FUNCTION": "run", "CATEGORY": "stub"})
    for name, spec in _SPECS.items() if not name.startswith("_")}
"""
THIRD_PARTY_SPECS = REPO / "workflows" / "specs" / "third_party_nodes.json"
STUB_MODEL_LISTS = {"FaceRestoreModelLoader": {"model_name": "facerestore_models"}}
# The model files the UI workflows name, each under its real name with tiny random weights, so the
# frontend's missing-model panel appears only for a file that is really missing. The render tests
# pick their own files (RenderCase.loader_files); the third-party files are never loaded (the
# browser tests only open the graphs).
YOLOFACE_NAME = "yoloface_v5m.pt"
THIRD_PARTY_MODELS = {"upscale_models": "RealESRGAN_x2.pth", "facerestore_models": "codeformer-v0.1.0.pth"}
OTHER_MODEL_FOLDERS = ("frame_interpolation",)  # filled by the tests that need them (ComfyUI 0.33+)


def _write_named_models(model_root: Path) -> None:
    """The selftest's tiny models (models/sonic/Sonic/unet.pth ...) where the render case left the
    name free, a tiny YOLOv5-face export as yoloface_v5m.pt, and the third-party files."""
    import shutil
    import tempfile

    import torch

    from sonic_core import selftest
    from tests import _yoloface

    model_dir = model_root / "sonic"
    with tempfile.TemporaryDirectory() as tmp:
        selftest.write_tiny_models(tmp)
        for entry in sorted(Path(tmp).iterdir()):
            if not (model_dir / entry.name).exists():  # the render case's own files stay
                shutil.move(str(entry), str(model_dir / entry.name))
    if not (model_dir / YOLOFACE_NAME).exists():
        _yoloface.export(_yoloface.build(), model_dir / YOLOFACE_NAME)
    for folder, name in THIRD_PARTY_MODELS.items():
        (model_root / folder).mkdir(exist_ok=True)
        torch.save({"weight": torch.zeros(1)}, model_root / folder / name)
# What a new user's first start writes; the tutorial's template dialog would cover the canvas.
# Workflow validation on: frontend 1.58.1 has it off by default, 1.27.10 on.
BROWSER_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True}


def _ui_input_names() -> tuple[set[str], set[str]]:
    """Every file name the UI workflows' Load Image / Load Audio nodes name (portrait.png, speech.wav,
    the conversation's two_people.png and its two voices): a workflow naming one the test ComfyUI lacks
    opens with the missing-input notice."""
    images, audios = set(), set()
    for path in (REPO / "workflows").glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            names = {"LoadImage": images, "LoadAudio": audios}.get(node["type"])
            if names is not None and node.get("widgets_values"):
                names.add(node["widgets_values"][0])
    return images, audios


def _write_ui_inputs(input_dir: Path) -> None:
    """A portrait-sized picture and a short tone under every name the UI workflows load."""
    import numpy as np
    from PIL import Image

    images, audios = _ui_input_names()
    y, x = np.mgrid[0:640, 0:512]  # (H, W)
    picture = Image.fromarray(np.dstack([x % 256, y % 256, np.full_like(x, 128)]).astype(np.uint8))
    for name in images:
        picture.save(input_dir / name)
    rate = 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)  # 2 s
    for name in audios:
        with wave.open(str(input_dir / name), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes((tone * (PCM16_SCALE - 1)).astype(np.int16).tobytes())


def _serve(tmp: Path, front_end_root: str | None = None, extra_args: tuple[str, ...] = (),
           own_resume_dir: bool = False):
    """Start ComfyUI on its own folders under ``tmp``; yields the Server, stops it afterwards.
    ``extra_args`` go on ComfyUI's command line; ``own_resume_dir``: the sampler keeps its states in
    ComfyUI's own user/sonic_resume (SONIC_RESUME_DIR unset), not the test session's folder."""
    base, output, model_root = tmp / "base", tmp / "output", tmp / "models"
    model_dir = model_root / "sonic"
    for d in (base / "input", base / "user" / "default", output, model_dir):
        d.mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(BROWSER_SETTINGS))

    base_golden = golden_base()
    present = all(base_golden.with_suffix(s).is_file() for s in (".json", ".safetensors"))
    case = (_golden_case(Golden(base_golden), model_dir, base / "input") if present
            else _tiny_case(model_dir, base / "input"))
    svd_dir, files = case.svd_dir, case.loader_files
    _write_ui_inputs(base / "input")
    _write_named_models(model_root)
    extra = tmp / "extra_model_paths.yaml"
    yaml_root = json.dumps(str(model_root))  # a JSON string is a valid YAML scalar
    folders = "".join(f"  {f}: {f}\n" for f in ("sonic", *THIRD_PARTY_MODELS, *OTHER_MODEL_FOLDERS))
    extra.write_text(f"sonic_test:\n  base_path: {yaml_root}\n{folders}")

    flags = _cli_flags()
    port = _free_port()
    cmd = [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", HOST,
           "--port", str(port), "--output-directory", str(output), "--input-directory", str(base / "input"),
           "--extra-model-paths-config", str(extra), "--disable-auto-launch"]
    if front_end_root:
        cmd += ["--front-end-root", front_end_root]
    if "--database-url" in flags:
        cmd += ["--database-url", "sqlite:///:memory:"]
    stubbed = False
    if "--base-directory" in flags:
        cmd += ["--base-directory", str(base)]
        link = _link_pack(base / "custom_nodes")
        stub = base / "custom_nodes" / "sonic_test_third_party_stubs"
        stub.mkdir()
        (stub / "__init__.py").write_text(SPEC_STUBS % (str(THIRD_PARTY_SPECS), STUB_MODEL_LISTS))
        stubbed = True
    else:  # older ComfyUI: link into its own custom_nodes, removed afterwards
        link = _link_pack(Path(COMFYUI_PATH) / "custom_nodes")
        if "--user-directory" in flags:
            cmd += ["--user-directory", str(base / "user")]
    if "--temp-directory" in flags:
        cmd += ["--temp-directory", str(tmp / "temp")]
    cmd += list(extra_args)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if own_resume_dir:
        env.pop("SONIC_RESUME_DIR", None)
    if os.environ.get("COMFYUI_STUBS"):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (os.environ["COMFYUI_STUBS"], os.environ.get("LD_LIBRARY_PATH", "")) if p)
    log = tmp / "comfyui.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://{HOST}:{port}"
            _wait_ready(url, proc, log)
            yield Server(url, proc, log, model_dir, output, svd_dir, case, files, stubbed)
        finally:
            _stop(proc)
    finally:
        if link is not None:
            link.unlink()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("comfyui"))


# ----------------------------------------------------------------------------------------------
# Startup and /object_info
# ----------------------------------------------------------------------------------------------
def test_comfyui_imports_the_pack(comfy):
    text = comfy.log_text()
    failed = [line for line in text.splitlines()
              if PACK_LINK in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failed, f"ComfyUI could not import the pack: {failed}\n{comfy.log_tail()}"
    assert re.search(rf"^\s*[0-9.]+ seconds: .*{re.escape(PACK_LINK)}\s*$", text, re.M), \
        f"{PACK_LINK} is not in ComfyUI's import times:\n{comfy.log_tail()}"


def _as_json(obj):
    return json.loads(json.dumps(obj))


def test_object_info_matches_our_nodes(comfy, monkeypatch):
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    monkeypatch.setenv("SONIC_MODELS_DIR", str(comfy.model_dir))  # the same files as the server's folder
    info = _request(f"{comfy.url}/object_info", timeout=120.0)
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, \
        f"ComfyUI does not list {missing} (errors while building their specs?):\n{comfy.log_tail()}"
    assert sorted(k for k in info if k.startswith("Sonic")) == sorted(NODE_CLASS_MAPPINGS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        served, inputs = info[node_id], _as_json(cls.INPUT_TYPES())
        assert served["input"] == inputs, f"{node_id}: served inputs differ from INPUT_TYPES"
        assert served["input_order"] == {k: list(v) for k, v in inputs.items()}, node_id
        assert served["output"] == list(cls.RETURN_TYPES), node_id
        assert served["output_name"] == list(cls.RETURN_NAMES), node_id
        assert served["output_tooltips"] == list(cls.OUTPUT_TOOLTIPS), node_id
        assert served["category"] == cls.CATEGORY == "Sonic", node_id
        assert served["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_id], node_id
        assert served["description"] == cls.DESCRIPTION, node_id
        assert served["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False)), node_id


# ----------------------------------------------------------------------------------------------
# Templates: GET /workflow_templates and the thumbnails the frontend asks for
# ----------------------------------------------------------------------------------------------
UI_WORKFLOWS = REPO / "workflows"
JPEG_MAGIC = b"\xff\xd8\xff"


def _get_bytes(url: str, timeout: float = 30.0) -> tuple[int, str, bytes]:
    with _OPENER.open(url, timeout=timeout) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def test_workflow_templates_list_exactly_our_ui_workflows(comfy):
    """ComfyUI lists workflows/*.json of every pack as templates: ours are the UI workflows and
    nothing else, and each has the <name>.jpg thumbnail the frontend requests."""
    listed = _request(f"{comfy.url}/workflow_templates")
    ours = sorted(p.stem for p in UI_WORKFLOWS.glob("*.json"))
    assert sorted(listed.get(PACK_LINK, [])) == ours, listed
    for name in ours:
        status, ctype, body = _get_bytes(f"{comfy.url}/api/workflow_templates/{PACK_LINK}/{name}.jpg")
        assert status == 200 and body.startswith(JPEG_MAGIC), f"{name}.jpg: {status} {ctype}"
        status, _ctype, body = _get_bytes(f"{comfy.url}/api/workflow_templates/{PACK_LINK}/{name}.json")
        assert status == 200 and json.loads(body)["nodes"], f"{name}.json is not served"


# ----------------------------------------------------------------------------------------------
# The basic workflow, rendered
# ----------------------------------------------------------------------------------------------
def _widget_values(s: Server) -> dict[str, dict]:
    """Inputs set for the test, by node class; a name a node lacks is ignored. ``"*files"`` picks,
    for every combo offering one of these choices, that choice."""
    c = s.case
    return {
        "LoadImage": {"image": IMAGE_NAME},
        "LoadAudio": {"audio": AUDIO_NAME},
        "SonicLoader": {**s.loader_files, "dtype": "fp32"},
        "SonicSVDLoader": {"svd_folder": s.svd_dir.name, "dtype": "fp32",
                           "decode_chunk_size": c.decode_chunk_size},
        "SonicFaceMaskDetect": {"detector": "none", "on_no_face": "error", "crop": False},  # golden: no crop
        "SonicWhisperAudioEncode": {"max_seconds": c.max_seconds},
        "SonicMotionBucketPredict": {"min_resolution": c.min_resolution},
        "SonicSampler": dict(c.sampler),
        "SonicFrameInterpolate": {"*files": [RIFE_NAME], "multiplier": 2},
        "SonicVideoCombine": {"filename_prefix": f"basic/{VIDEO_PREFIX}"},
        "SonicLatentToVideo": {"*files": [RIFE_NAME], "multiplier": 2, "filename_prefix": f"basic/{VIDEO_PREFIX}",
                               "decode_chunk_size": c.decode_chunk_size},
        "SonicLatentSegment": {"decode_chunk_size": c.decode_chunk_size},
    }


def _set_widgets(node: dict, spec: dict, values: dict) -> None:
    entries = {name: entry for name, entry, _req in ordered_inputs(spec)}
    for name, entry in entries.items():
        if name in values:
            node["inputs"][name] = values[name]
        elif input_type(entry) == "COMBO":
            picked = [c for c in values.get("*files", []) if c in combo_choices(entry)]
            if picked:
                node["inputs"][name] = picked[0]


def _chain_prompt(specs: dict, values: dict, chain: tuple[str, ...]) -> dict:
    """A graph from the node specs: each input linked to the latest earlier output of its type,
    widgets at their defaults unless ``values`` sets them."""
    prompt, latest = {}, {}
    for number, cls in enumerate(chain, 1):
        node_id, spec, node = str(number), specs[cls], {"class_type": cls, "inputs": {}}
        for name, entry, required in ordered_inputs(spec):
            t, opts = input_type(entry), input_options(entry)
            if is_widget(entry):
                if "default" in opts:
                    node["inputs"][name] = opts["default"]
                elif t == "COMBO" and combo_choices(entry):
                    node["inputs"][name] = combo_choices(entry)[0]
            elif t in latest and (required or t in LINKED_OPTIONAL):
                node["inputs"][name] = latest[t]
            elif required:
                pytest.fail(f"{cls}.{name} needs a {t} that no earlier node of {chain} gives")
        _set_widgets(node, spec, values.get(cls, {}))
        prompt[node_id] = node
        latest.update({t: [node_id, i] for i, t in enumerate(spec["output"])})
    return prompt


def _file_prompt(path: Path, specs: dict, values: dict) -> dict:
    """The shipped API workflow with SonicSVDLoader in place of the SVD checkpoint loader, the face
    taken from the image's mask and the test's files and small settings."""
    prompt = json.loads(path.read_text())
    swapped = {nid for nid, n in prompt.items() if n["class_type"] == CHECKPOINT_LOADER}
    old_out, new_out = specs.get(CHECKPOINT_LOADER, {}).get("output", []), specs["SonicSVDLoader"]["output"]
    for nid in swapped:
        prompt[nid] = {"class_type": "SonicSVDLoader", "inputs": {}}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in swapped:
                t = old_out[value[1]]
                assert t in new_out, f"{node['class_type']}.{name} uses the checkpoint's {t}"
                node["inputs"][name] = [value[0], new_out.index(t)]
        if node["class_type"] == "SonicFaceMaskDetect" and "mask" not in node["inputs"]:
            src = node["inputs"]["image"]
            assert prompt[src[0]]["class_type"] == "LoadImage", "the face node's image is not a LoadImage"
            node["inputs"]["mask"] = [src[0], specs["LoadImage"]["output"].index("MASK")]
        if node["class_type"] in specs:
            _set_widgets(node, specs[node["class_type"]], values.get(node["class_type"], {}))
    return prompt


def _queue(s: Server, prompt: dict) -> str:
    try:
        return _request(f"{s.url}/prompt", {"prompt": prompt, "client_id": "sonic-test"})["prompt_id"]
    except urllib.error.HTTPError as e:
        pytest.fail(f"ComfyUI refused the prompt: {e.read().decode(errors='replace')}\n"
                    f"{json.dumps(prompt, indent=1)}")


def _finished(s: Server, prompt_id: str, timeout_s: float) -> dict:
    """The history entry of ``prompt_id`` once it has succeeded, failed or been interrupted."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = _request(f"{s.url}/history/{prompt_id}").get(prompt_id)
        status = (entry or {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            return entry
        if s.proc.poll() is not None:
            pytest.fail(f"ComfyUI died while running the workflow:\n{s.log_tail()}")
        time.sleep(POLL_S)
    _request(f"{s.url}/interrupt", {"prompt_id": prompt_id})
    pytest.fail(f"the workflow did not finish within {timeout_s:.0f} s:\n{s.log_tail()}")


def _run(s: Server, prompt: dict) -> dict:
    entry = _finished(s, _queue(s, prompt), RUN_TIMEOUT_S)
    if entry["status"].get("status_str") == "error":
        errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        pytest.fail("the workflow failed:\n" + "\n".join(
            f"{e.get('node_type')} (node {e.get('node_id')}): {e.get('exception_type')}: "
            f"{e.get('exception_message')}\n{''.join(e.get('traceback', []))}" for e in errors))
    return entry


def _decode(path: Path) -> tuple[int, float]:
    """(video frames, audio seconds) of a video file, both decoded in full."""
    import av

    with av.open(str(path)) as container:
        assert container.streams.video, f"{path.name} has no video stream"
        assert container.streams.audio, f"{path.name} has no audio stream"
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(f.samples for f in container.decode(audio=0))
        return frames, samples / stream.rate


def _saved_video(s: Server, entry: dict, subfolder: str) -> Path:
    """The one file the run left in output/<subfolder>, named in the UI output the way ComfyUI's own
    video savers do ({"images": [{"filename", "subfolder", "type": "output"}], "animated": [true]})."""
    files = sorted(p for p in (s.output_dir / subfolder).rglob("*") if p.is_file())
    assert len(files) == 1, \
        f"expected one file in output/{subfolder}, found {files}; outputs {entry['outputs']}"
    video = files[0]
    assert video.suffix.lower() in VIDEO_SUFFIXES, video.name
    ui = [out for out in entry["outputs"].values() if "images" in out]
    shown = [item for out in ui for item in out["images"]]
    assert {"filename": video.name, "subfolder": subfolder, "type": "output"} in shown, \
        f"the UI output does not show {subfolder}/{video.name}: {entry['outputs']}"
    assert any(u.get("animated") == [True] for u in ui), f"the UI output is not marked animated: {ui}"
    return video


def _check_video(video: Path, case: RenderCase, frames_expected: int) -> None:
    frames, audio_s = _decode(video)
    assert frames == frames_expected, f"{video.name}: {frames} frames, expected {frames_expected}"
    audio_in = case.audio_seconds
    assert abs(audio_s - audio_in) <= AUDIO_DURATION_TOL_S, \
        f"{video.name}: {audio_s:.3f} s of audio, input {audio_in:.3f} s"


def _specs_with(s: Server, classes) -> dict:
    specs = _request(f"{s.url}/object_info", timeout=120.0)
    absent = [c for c in classes if c not in specs]
    if absent:
        pytest.skip(f"nodes not implemented yet: {absent}")
    return specs


def test_core_vae_nodes_and_video_nodes(comfy):
    """ComfyUI's own VAE Encode / VAE Decode on the VAE of SonicSVDLoader, then RIFE and Video Combine
    with the soundtrack: N identical frames -> 2N-1 frames with audio."""
    chain = ("LoadImage", "LoadAudio", "SonicSVDLoader", "ImageScale", "RepeatImageBatch", "VAEEncode",
             "VAEDecode", "SonicFrameInterpolate", "SonicVideoCombine")
    specs = _specs_with(comfy, chain)
    frames, side = comfy.case.frames, comfy.case.side
    values = _widget_values(comfy)
    values.update({"ImageScale": {"width": side, "height": side, "crop": "center"},
                   "RepeatImageBatch": {"amount": frames},
                   "SonicFrameInterpolate": {"*files": [RIFE_NAME], "multiplier": 2},
                   "SonicVideoCombine": {"filename_prefix": f"media/{VIDEO_PREFIX}"}})
    entry = _run(comfy, _chain_prompt(specs, values, chain))
    _check_video(_saved_video(comfy, entry, "media"), comfy.case, 2 * frames - 1)


def test_basic_workflow_renders_a_video(comfy):
    specs = _specs_with(comfy, CHAIN)
    values = _widget_values(comfy)
    if BASIC_API.is_file():
        prompt = _file_prompt(BASIC_API, specs, values)
    else:
        prompt = _chain_prompt(specs, values, CHAIN)
    entry = _run(comfy, prompt)
    video = _saved_video(comfy, entry, "basic")
    interpolated = any(n["class_type"] == "SonicFrameInterpolate" or
                       (n["class_type"] == "SonicLatentToVideo" and n["inputs"].get("rife_model") == RIFE_NAME)
                       for n in prompt.values())
    frames = 2 * comfy.case.frames - 1 if interpolated else comfy.case.frames
    _check_video(video, comfy.case, frames)
    loads = set(re.findall(r"Requested to load (\w+)", comfy.log_text()))  # ComfyUI names the module class
    assert "_Holder" not in loads and {"SonicUNet", "SonicAudio2Token", "WhisperEncoder"} <= loads, loads


def test_paste_back_workflow_renders_the_photo_sized_video(comfy):
    """workflows/sonic_paste_back.json: the face cropped, animated and pasted back by Latent To Video
    while it streams, so the video has the photo's own size and the whole soundtrack."""
    import av
    from PIL import Image

    specs = _specs_with(comfy, CHAIN[:-3] + ("SonicLatentToVideo",))
    values = _widget_values(comfy)
    # the test portraits are small: the widest margin keeps the square crop over the 64 px minimum
    values["SonicFaceMaskDetect"] = {**values["SonicFaceMaskDetect"], "crop": True, "expand_ratio": 5.0}
    values["SonicLatentToVideo"] = {**values["SonicLatentToVideo"], "filename_prefix": f"paste/{VIDEO_PREFIX}"}
    entry = _run(comfy, _file_prompt(PASTE_API, specs, values))
    video = _saved_video(comfy, entry, "paste")
    _check_video(video, comfy.case, 2 * comfy.case.frames - 1)
    with Image.open(comfy.output_dir.parent / "base" / "input" / IMAGE_NAME) as im:
        w, h = im.size
    with av.open(str(video)) as c:
        size = (c.streams.video[0].width, c.streams.video[0].height)
    assert size == (w + w % 2, h + h % 2), f"{size}: not the {w}x{h} photo (yuv420p pads odd sides by one)"
    assert "paste-back: crop" in comfy.log_text(), "Latent To Video did not paste back"


def test_low_vram_settings_run_under_model_management(comfy):
    """fp8 UNet weights, one guidance row per call and an automatic RIFE batch through ComfyUI's
    ModelPatcher: the fp8 parameters load, move and compute there, and the clip is complete."""
    specs = _specs_with(comfy, CHAIN)
    values = _widget_values(comfy)
    values["SonicLoader"]["weight_dtype"] = "fp8_e4m3fn"
    values["SonicSampler"] = {**values["SonicSampler"], "guidance_rows": "1"}
    for cls in ("SonicLatentToVideo", "SonicVideoCombine"):
        values[cls] = {**values[cls], "filename_prefix": f"lowvram/{VIDEO_PREFIX}"}
    values["SonicLatentToVideo"]["rife_batch_size"] = 0
    values["SonicFrameInterpolate"] = {**values["SonicFrameInterpolate"], "batch_size": 0}
    prompt = _file_prompt(BASIC_API, specs, values) if BASIC_API.is_file() else _chain_prompt(specs, values, CHAIN)
    before = comfy.log_text()
    entry = _run(comfy, prompt)
    _check_video(_saved_video(comfy, entry, "lowvram"), comfy.case, 2 * comfy.case.frames - 1)
    log = comfy.log_text()[len(before):]
    assert re.search(r"UNet weights in float8_e4m3fn: \d+ layers", log), log[-3000:]
    assert re.search(r"window\(s\) x 1 guidance row\(s\) a UNet call", log), log[-3000:]


SEGMENT_CHUNK = 2  # decode chunk of the segment test: several segments from a few frames


def _render_segments(comfy: Server) -> tuple[int, int, str]:
    """Latent Segment -> RIFE -> a core IMAGE node (standing in for an upscaler) -> Video Combine with
    ``segment``, queued once: every segment renders into one file with the whole soundtrack, each next
    segment queued by Video Combine. Returns (segments, sampler node runs, the log of this render)."""
    chain = ("LoadImage", "LoadAudio", "SonicLoader", "SonicSVDLoader", "SonicFaceMaskDetect",
             "SonicWhisperAudioEncode", "SonicMotionBucketPredict", "SonicSampler", "SonicLatentSegment",
             "SonicFrameInterpolate", "ImageScaleBy", "SonicVideoCombine")
    specs = _specs_with(comfy, chain)
    values = _widget_values(comfy)
    frames = comfy.case.frames
    per_segment = max(SEGMENT_CHUNK, -(-frames // 3))  # about three segments
    values["SonicLatentSegment"] = {"segment_frames": per_segment, "decode_chunk_size": SEGMENT_CHUNK}
    values["ImageScaleBy"] = {"upscale_method": "nearest-exact", "scale_by": 2.0}
    values["SonicVideoCombine"] = {"filename_prefix": f"segments/{VIDEO_PREFIX}"}
    prompt = _chain_prompt(specs, values, chain)
    seg_id = next(k for k, n in prompt.items() if n["class_type"] == "SonicLatentSegment")
    combine = next(n for n in prompt.values() if n["class_type"] == "SonicVideoCombine")
    combine["inputs"]["segment"] = [seg_id, specs["SonicLatentSegment"]["output"].index("SONIC_SEGMENT")]
    expected_segments = -(-frames // (-(-per_segment // SEGMENT_CHUNK) * SEGMENT_CHUNK))
    assert expected_segments >= 2, f"{frames} frames make a single segment: the test needs several"
    log_before = len(comfy.log_text())
    history_before = set(_request(f"{comfy.url}/history"))
    _run(comfy, prompt)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:  # the queued segments run one after another
        queue = _request(f"{comfy.url}/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        assert time.monotonic() < deadline, f"the segments did not finish:\n{comfy.log_tail()}"
        time.sleep(POLL_S)
    runs = {k: v for k, v in _request(f"{comfy.url}/history").items() if k not in history_before}
    failed = [v["status"] for v in runs.values() if v["status"].get("status_str") != "success"]
    assert not failed, f"a segment run failed: {failed}\n{comfy.log_tail()}"
    assert len(runs) == expected_segments, f"{len(runs)} runs for {expected_segments} segments"
    last = next(v for v in runs.values() if any("images" in o for o in v["outputs"].values()))
    video = _saved_video(comfy, last, "segments")
    _check_video(video, comfy.case, 2 * frames - 1)
    import av

    with av.open(str(video)) as c:
        width = c.streams.video[0].width
    assert width >= 2 * comfy.case.min_resolution, f"{width} px: the IMAGE node between did not run"
    log_text = comfy.log_text()[log_before:]
    return expected_segments, len(SAMPLER_NODE_RUN.findall(log_text)), log_text


SAMPLER_NODE_RUN = re.compile(r"Sonic sampler: \d+ frames, \d+ windows")  # one line per SonicSampler run
KEPT_HIT = "returning it without sampling"  # the sampler found an identical finished sampling on disk
KEPT_WRITTEN = "kept the sampler's result in"


def test_segments_queue_themselves_into_one_video(comfy):
    """The default (classic) cache keeps the sampler's latents: one Queue, every segment, the sampler
    node runs once."""
    _segments, node_runs, log_text = _render_segments(comfy)
    assert node_runs == 1, "the sampler ran more than once:\n" + log_text[-LOG_TAIL_CHARS * 3:]


@pytest.fixture(scope="module", params=[("--cache-ram", "1000"), ("--cache-none",)],
                ids=["cache-ram", "cache-none"])
def forgetful(request, tmp_path_factory):
    """A server whose cache forgets the sampler's output between segments: --cache-ram with 1000 GB
    of headroom (0.8.0: every output is evicted after each node, as under real RAM pressure) or
    --cache-none. The sampler keeps its states in ComfyUI's own user/sonic_resume."""
    if request.param[0] not in _cli_flags():
        pytest.skip(f"this ComfyUI has no {request.param[0]}")
    yield from _serve(tmp_path_factory.mktemp("forgetful"), extra_args=request.param, own_resume_dir=True)


def test_segments_sample_once_when_the_cache_forgets(forgetful):
    """The cache forgets, so ComfyUI reruns the sampler node for every segment; the first run keeps
    its result on disk and every later one returns it without sampling: one sampling for the clip."""
    segments, node_runs, log_text = _render_segments(forgetful)
    tail = log_text[-LOG_TAIL_CHARS * 3:]
    mode = next(a for a in forgetful.proc.args if a.startswith("--cache-"))
    print(f"{mode}: {segments} segments, {node_runs} sampler node runs, "
          f"{log_text.count(KEPT_WRITTEN)} sampling kept, {log_text.count(KEPT_HIT)} returned without sampling")
    assert node_runs == segments, f"{node_runs} sampler node runs for {segments} segments\n{tail}"
    assert log_text.count(KEPT_WRITTEN) == 1 and log_text.count(KEPT_HIT) == segments - 1, tail
    assert re.search(r"kept the sampler's result in \S*user/sonic_resume/sonic-result-", log_text), tail


def test_interrupt_stops_the_sampler(comfy):
    """Cancel in the UI (POST /interrupt) stops the sampler within a window, and nothing is saved."""
    specs = _specs_with(comfy, CHAIN)
    values = _widget_values(comfy)
    steps = specs["SonicSampler"]["input"]["required"]["steps"]
    values["SonicSampler"]["steps"] = input_options(steps)["max"]  # far longer than the test waits
    values["SonicVideoCombine"] = {"filename_prefix": f"cancel/{VIDEO_PREFIX}"}
    started = comfy.log_text().count(SAMPLER_STARTED)
    prompt_id = _queue(comfy, _chain_prompt(specs, values, CHAIN))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while comfy.log_text().count(SAMPLER_STARTED) == started:
        status = (_request(f"{comfy.url}/history/{prompt_id}").get(prompt_id) or {}).get("status", {})
        assert not status, f"the run ended before the sampler started: {status}"
        assert time.monotonic() < deadline, f"the sampler did not start:\n{comfy.log_tail()}"
        time.sleep(POLL_S)
    time.sleep(POLL_S)  # inside the denoising loop
    _request(f"{comfy.url}/interrupt", {"prompt_id": prompt_id})
    status = _finished(comfy, prompt_id, INTERRUPT_TIMEOUT_S)["status"]
    kinds = [m[0] for m in status.get("messages", [])]
    assert status.get("status_str") == "error" and "execution_interrupted" in kinds, status
    saved = [p for p in (comfy.output_dir / "cancel").rglob("*") if p.is_file()]
    assert not saved, f"an interrupted run saved {saved}"


# ----------------------------------------------------------------------------------------------
# In a real browser: every UI workflow loads with no alert, toast or dialog, dropped in and opened
# from the Templates dialog, on the pinned frontend and on each one in COMFYUI_FRONTEND_ROOTS
# (os.pathsep-separated --front-end-root folders, e.g. pip install --target DIR
# comfyui-frontend-package==1.58.1, then DIR/comfyui_frontend_package/static). Needs Playwright
# (PyPI) and a Chromium (SONIC_CHROMIUM, default Debian's /usr/bin/chromium); skipped without them.
# ----------------------------------------------------------------------------------------------
CHROMIUM = os.environ.get("SONIC_CHROMIUM", "/usr/bin/chromium")
FRONTEND_ROOTS = [r for r in os.environ.get("COMFYUI_FRONTEND_ROOTS", "").split(os.pathsep) if r]
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
PAGE_TIMEOUT_MS = 180_000  # first page load on a busy 2-core CPU
SETTLE_MS = 2500  # image preview, audio player and any toast appear within this after a load
# Toasts, alert and modal dialogs with text, except the Templates dialog while it is meant to be open,
# and status notices: the error overlay of frontend 1.49+ ("4 errors found ... View details") that
# stands for the missing-model panel (a model file the workflow names is not in the loader's list).
NOTICES_JS = """() => [...document.querySelectorAll(
    '.p-toast-message, [role=alertdialog], .p-dialog, [role=dialog], [role=status]')]
  .filter(e => !e.querySelector('[data-testid="template-workflows-content"]'))
  .map(e => e.innerText.trim()).filter(Boolean)"""
CLOSE_NOTICES_JS = """() => document.querySelectorAll(
    '.p-toast-message .p-toast-close-button, .p-toast-message-close-button').forEach(b => b.click())"""
# What the page shows before a workflow of ours is loaded: ComfyUI's default graph, whose model files
# the test ComfyUI lacks (0.33's frontends flag them); an empty graph in its place clears that.
EMPTY_GRAPH = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [], "config": {},
               "extra": {}, "version": 0.4}
GRAPH_JS = """() => ({
  nodes: window.app.graph._nodes.map(n => ({id: n.id, type: n.type, pos: [...n.pos], size: [...n.size]})),
  groups: (window.app.graph._groups || window.app.graph.groups || []).map(g => ({
    title: g.title, bounding: [...(g._bounding || g.bounding)]}))})"""


def _ui_workflows() -> list[Path]:
    return sorted((REPO / "workflows").glob("*.json"))


@pytest.fixture(scope="module", params=["pinned", *FRONTEND_ROOTS],
                ids=lambda r: r if r == "pinned" else Path(r).parent.name + "@" + Path(r).parents[1].name)
def frontend(request, tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set SONIC_CHROMIUM)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright to drive the browser")
    if request.param == "pinned":
        server = request.getfixturevalue("comfy")
        yield server
        return
    yield from _serve(tmp_path_factory.mktemp("comfyui_fe"), request.param)


def _open_page(playwright, server: Server):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(server.url + "/", wait_until="networkidle")
    page.wait_for_function("window.app && window.app.graph && window.app.extensionManager")
    page.wait_for_timeout(SETTLE_MS)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", EMPTY_GRAPH)
    page.wait_for_timeout(SETTLE_MS)
    return browser, page, dialogs


def _notices(page, dialogs: list[str]) -> list[str]:
    found = dialogs + page.evaluate(NOTICES_JS)
    dialogs.clear()
    page.evaluate(CLOSE_NOTICES_JS)
    return found


def _comparable(prompt: dict) -> dict:
    """class_type and inputs, without the player widgets only some frontends send (1.27.10 sends
    LoadAudio's "audioUI": "", 1.58.1 does not; the server ignores it)."""
    added = {name for name, _value in FRONTEND_SENT_WIDGETS.values()}
    out = {}
    for k, n in prompt.items():
        inputs = {i: v for i, v in n["inputs"].items() if i not in added}
        out[k] = {"class_type": n["class_type"], "inputs": inputs}
    return out


def _layout(page) -> list[str]:
    from tests.test_workflow_frontend import layout_problems

    return layout_problems(page.evaluate(GRAPH_JS))


MISSING_MODEL_PANEL = (1, 49)  # the first frontend tested that flags a model file the loader lacks
ABSENT_MODEL = "absent/yoloface_v5m.pt"


def _missing_model_is_noticed(page, dialogs: list[str]) -> list[str]:
    """The notice check can fail: the basic workflow with a detector file the test ComfyUI lacks
    raises the missing-model notice (frontend 1.49+; older ones say nothing of a combo value)."""
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < MISSING_MODEL_PANEL:
        return []
    wf = json.loads((UI_WORKFLOWS / "sonic_basic.json").read_text())
    face = next(n for n in wf["nodes"] if n["type"] == "SonicFaceMaskDetect")
    face["widgets_values"][0] = ABSENT_MODEL
    face["properties"].pop("models", None)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(SETTLE_MS)
    noticed = _notices(page, dialogs)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", EMPTY_GRAPH)
    page.wait_for_timeout(SETTLE_MS)
    _notices(page, dialogs)
    return [] if noticed else [f"frontend {version}: no notice for the missing model file {ABSENT_MODEL}"]


def test_workflows_load_in_the_browser_with_no_alert(frontend):
    """Dropped in (app.loadGraphData validates as a drop does): no notice, every node known, the API
    prompt the frontend makes equals workflows/api/<name>.json, and no nodes overlap at the sizes
    the frontend draws them with the portrait and audio loaded."""
    from playwright.sync_api import sync_playwright

    if not frontend.third_party_stubbed:
        pytest.skip("this ComfyUI has no --base-directory: the third-party node stand-ins cannot be added")
    problems = []
    with sync_playwright() as p:
        browser, page, dialogs = _open_page(p, frontend)
        try:
            problems += [f"on opening the page: {n}" for n in _notices(page, dialogs)]
            for path in _ui_workflows():
                wf = json.loads(path.read_text())
                page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
                page.wait_for_timeout(SETTLE_MS)
                problems += [f"{path.name}: {n}" for n in _notices(page, dialogs)]
                problems += [f"{path.name} in the browser: {n}" for n in _layout(page)]
                api = page.evaluate("async () => (await window.app.graphToPrompt()).output")
                twin = json.loads((REPO / "workflows" / "api" / path.name).read_text())
                got = _comparable(api)
                if got != _comparable(twin):
                    problems.append(f"{path.name}: the frontend's API prompt differs from workflows/api/"
                                    f"{path.name}: {json.dumps(got, sort_keys=True)[:2000]}")
            problems += _missing_model_is_noticed(page, dialogs)
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


def test_workflows_open_from_the_templates_dialog(frontend):
    """Templates dialog -> the pack's entry: each workflow has its thumbnail, and opening it loads
    the graph with no notice."""
    from playwright.sync_api import sync_playwright

    if not frontend.third_party_stubbed:
        pytest.skip("this ComfyUI has no --base-directory: the third-party node stand-ins cannot be added")
    problems = []
    with sync_playwright() as p:
        browser, page, dialogs = _open_page(p, frontend)
        try:
            _notices(page, dialogs)
            for path in _ui_workflows():
                card = f'[data-testid="template-workflow-{path.stem}"]'
                page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
                page.get_by_text(PACK_LINK, exact=True).first.click()
                page.wait_for_selector(card)
                page.wait_for_function(f"""() => [...document.querySelectorAll('{card} img')]
                                           .some(i => i.complete && i.naturalWidth > 0)""")
                page.click(card)
                page.wait_for_selector('[data-testid="template-workflows-content"]', state="detached")
                page.wait_for_timeout(SETTLE_MS)
                problems += [f"{path.name} from Templates: {n}" for n in _notices(page, dialogs)]
                loaded = sorted(n["type"] for n in page.evaluate(GRAPH_JS)["nodes"])
                want = sorted(n["type"] for n in json.loads(path.read_text())["nodes"])
                if loaded != want:
                    problems.append(f"{path.name} from Templates loaded {loaded}")
        finally:
            browser.close()
    assert not problems, "\n".join(problems)
