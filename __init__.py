"""ComfyUI-Sonic: audio-driven talking portraits (Sonic, CVPR 2025) as ComfyUI nodes.

Exports only; no work at import.
"""

if __package__:  # ComfyUI imports this folder as a package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # a plain-module import (pytest collecting a checkout whose folder name is no identifier)
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = None  # no frontend extension: previews use ComfyUI's own video widget

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
