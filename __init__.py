"""ComfyUI-Sonic: audio-driven talking portraits (Sonic, CVPR 2025) as ComfyUI nodes.

Exports only; no work at import.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None  # no frontend extension: previews use ComfyUI's own video widget

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
