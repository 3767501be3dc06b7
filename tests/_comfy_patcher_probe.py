"""Run by tests/test_comfyui_versions.py with the interpreter that has ComfyUI's requirements:
``python _comfy_patcher_probe.py TREE REPO MODELS_ROOT``. Imports that ComfyUI tree (``--cpu``) and
this pack the way ComfyUI does (a package named after its folder), loads tiny Sonic models through
the real SonicLoader and ``models.load``, and prints one JSON line: which patcher class wrapped
each model and what ComfyUI's model management lists as loaded.

Twice: first with ``comfy.model_patcher.CoreModelPatcher`` as the tree leaves it under ``--cpu``;
then, where the tree has ``ModelPatcherDynamic``, pointed at a subclass of it, as 0.33's main.py
points it at ``ModelPatcherDynamic`` when dynamic VRAM works (the subclass only records that it
was asked; with a CPU load device the real class hands back a plain ``ModelPatcher``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys

TREE, REPO, MODELS = sys.argv[1:4]
sys.path.insert(0, TREE)
sys.argv = ["main.py", "--cpu"]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher as mp  # noqa: E402


class _Requested(logging.Handler):
    """ComfyUI logs "Requested to load <class of the managed module>" on every load."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.names: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Requested to load "):
            self.names.append(msg.split()[-1])


requested = _Requested()
logging.getLogger().addHandler(requested)
logging.getLogger().setLevel(logging.INFO)

spec = importlib.util.spec_from_file_location("ComfyUI_Sonic", os.path.join(REPO, "__init__.py"),
                                              submodule_search_locations=[REPO])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
runtime = sys.modules["ComfyUI_Sonic.nodes.runtime"]
nodes_loader = sys.modules["ComfyUI_Sonic.nodes.nodes_loader"]
NAMES = {"unet": "Sonic/unet.pth", "audio2token": "Sonic/audio2token.pth",
         "audio2bucket": "Sonic/audio2bucket.pth", "whisper": "whisper-tiny"}


def run() -> dict:
    """Load the tiny models through SonicLoader and models.load; what wrapped them, what is loaded."""
    nodes_loader._cache.clear()
    requested.names.clear()
    paths = {k: os.path.join(MODELS, v) for k, v in NAMES.items()}
    (models,) = pack.NODE_CLASS_MAPPINGS["SonicLoader"]().load(**paths, dtype="fp32")
    unet = models.load("unet")
    loaded = [lm.model for lm in mm.current_loaded_models if lm.model is not None]
    ours = [p for p in loaded if getattr(p.model, "inner", None) is models.unet]
    return {
        "patcher": type(ours[0]).__name__ if ours else None,
        "is_dynamic": bool(ours and getattr(ours[0], "is_dynamic", lambda: False)()),
        "same_module": unet is models.unet,
        "device": str(next(unet.parameters()).device),
        "requested": list(requested.names),
        "loaded_holders": sorted(type(p.model).__name__ for p in loaded),
    }


out = {"comfyui_core_patcher": getattr(getattr(mp, "CoreModelPatcher", None), "__name__", None),
       "runtime_patcher": runtime.patcher_class().__name__, "default": run()}
if hasattr(mp, "ModelPatcherDynamic"):
    asked: list[str] = []

    class DynamicProbe(mp.ModelPatcherDynamic):
        def __new__(cls, model=None, *args, **kwargs):
            asked.append(type(model).__name__)
            return super().__new__(cls, model, *args, **kwargs)

    mp.CoreModelPatcher = DynamicProbe  # what 0.33's main.py does when comfy-aimdo works
    mm.unload_all_models()
    out["dynamic"] = dict(run(), asked=sorted(asked), runtime_patcher=runtime.patcher_class().__name__)
print(json.dumps(out))
