"""sonic_core: the Sonic method without ComfyUI (torch, diffusers, transformers, safetensors, av).

Nothing heavy happens at import; submodules are imported where they are used.
"""

__version__ = "0.1.0"
