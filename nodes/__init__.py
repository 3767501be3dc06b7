"""ComfyUI adapters: one ``nodes_<family>.py`` per node family, each a thin call into sonic_core."""

from __future__ import annotations

import importlib

_FAMILIES = ("nodes_loader", "nodes_audio", "nodes_face", "nodes_motion", "nodes_sampler",
             "nodes_svd", "nodes_video", "nodes_long", "nodes_paste", "nodes_speakers")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in _FAMILIES:
    _mod = importlib.import_module(f"{__name__}.{_name}")
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
