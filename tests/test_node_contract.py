"""The public node contract of DESIGN.md and the polish every node owes its users."""

from __future__ import annotations

import pytest

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

CONTRACT = {
    "SonicLoader": "Sonic Model Loader",
    "SonicWhisperAudioEncode": "Whisper Audio Encode",
    "SonicFaceMaskDetect": "Face Mask Detect",
    "SonicMotionBucketPredict": "Motion Bucket Predict",
    "SonicSampler": "Sonic Sampler (position shift)",
    "SonicSVDLoader": "SVD VAE + Image Encoder Loader",
    "SonicFrameInterpolate": "Frame Interpolate (RIFE)",
    "SonicVideoCombine": "Video Combine",
    "SonicPasteBack": "Sonic Paste Back",
}


def test_contract_node_ids_and_display_names():
    for node_id, display in CONTRACT.items():
        assert node_id in NODE_CLASS_MAPPINGS, f"node {node_id} is missing"
        assert NODE_DISPLAY_NAME_MAPPINGS.get(node_id) == display


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_polish(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("Sonic")
    assert cls.CATEGORY.split("/")[0] == "Sonic"
    assert isinstance(getattr(cls, "DESCRIPTION", None), str) and len(cls.DESCRIPTION) > 20
    assert callable(getattr(cls(), cls.FUNCTION))
    inputs = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in inputs.get(section, {}).items():
            opts = entry[1] if len(entry) > 1 else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    tips = getattr(cls, "OUTPUT_TOOLTIPS", ())
    assert len(tips) == len(cls.RETURN_TYPES) and all(tips), f"{node_id}: OUTPUT_TOOLTIPS incomplete"
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    assert len(names) == len(cls.RETURN_TYPES)


def test_readme_links_every_node_to_its_help_pages():
    """README.md's node overview links every node to its help pages (web/docs, which name every input:
    tests/test_docs_i18n.py); the per-input tables live there, generated from INPUT_TYPES."""
    from tests._golden import REPO

    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Nodes\n")
    section = readme[start:readme.index("\n## ", start + 1)]
    for node_id in NODE_CLASS_MAPPINGS:
        assert f"(`{node_id}`)" in section, f"README.md's node overview does not list {node_id}"
        for page in (f"web/docs/{node_id}.md", f"web/docs/{node_id}/zh.md"):
            assert f"]({page})" in section, f"README.md's node overview does not link {page}"
            assert (REPO / page).is_file(), f"{page} is missing: run python -m scripts.gen_docs"


COMMON_ALIASES = {"talking head", "lip sync", "portrait animation", "数字人", "口型"}
# What almost nobody changes, hidden until the user asks (ComfyUI 0.33's "advanced" inputs) ...
ALWAYS_ADVANCED = {"SonicSampler": {"min_appearance_guidance", "max_appearance_guidance", "min_audio_guidance",
                                    "max_audio_guidance", "noise_aug", "shift_offset", "fps_conditioning"},
                   "SonicSVDLoader": {"decode_chunk_size"}, "SonicLatentSegment": {"decode_chunk_size"},
                   "SonicLatentToVideo": {"decode_chunk_size", "rife_batch_size"},
                   "SonicFrameInterpolate": {"batch_size"}}
# ... and what a user sets on every clip, never hidden
NEVER_ADVANCED = {"SonicSampler": {"seed", "steps", "min_resolution"}, "SonicLoader": {"unet", "dtype"},
                  "SonicFrameInterpolate": {"multiplier", "frame_rate"}, "SonicVideoCombine": {"filename_prefix"}}


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_search_aliases_and_advanced_inputs(node_id):
    """SEARCH_ALIASES: the node's own words and what users type for any Sonic node. ADVANCED_INPUTS:
    flagged ``"advanced": True`` and nothing else changed (same inputs, same order, same options), so a
    saved workflow's widget values still line up; each hidden input has a value to run with."""
    cls = NODE_CLASS_MAPPINGS[node_id]
    aliases = cls.SEARCH_ALIASES
    assert isinstance(aliases, list) and all(isinstance(a, str) and a.strip() for a in aliases)
    assert len(set(aliases)) == len(aliases) and COMMON_ALIASES <= set(aliases), aliases
    from nodes import runtime

    assert set(aliases) - set(runtime.SEARCH_ALIASES), f"{node_id}: no alias of its own"
    spec = cls.INPUT_TYPES()
    flagged = {n for section in spec.values() for n, v in section.items()
               if isinstance(v, tuple) and len(v) > 1 and isinstance(v[1], dict) and v[1].get("advanced")}
    assert flagged == set(cls.ADVANCED_INPUTS)
    assert ALWAYS_ADVANCED.get(node_id, set()) <= flagged and not flagged & NEVER_ADVANCED.get(node_id, set())
    for section in spec.values():
        for name in flagged & set(section):
            kind, opts = section[name][0], section[name][1]
            assert isinstance(kind, list) or "default" in opts, f"{node_id}.{name}: hidden without a default"


def test_advanced_only_adds_the_flag():
    from nodes import runtime

    shared = {"tooltip": "t", "default": 3, "min": 0, "max": 9}
    spec = {"required": {"a": ("INT", shared), "b": (["x", "y"], {"tooltip": "u"}), "c": ("IMAGE",)},
            "optional": {"d": ("FLOAT", {"default": 0.5, "tooltip": "v"})}}
    out = runtime.advanced(spec, ("a", "d"))
    assert [list(s) for s in out.values()] == [["a", "b", "c"], ["d"]]
    assert out["required"]["a"] == ("INT", {**shared, "advanced": True}) and "advanced" not in shared
    assert out["required"]["b"] == spec["required"]["b"] and out["required"]["c"] == ("IMAGE",)
    assert out["optional"]["d"][1] == {"default": 0.5, "tooltip": "v", "advanced": True}
    with pytest.raises(KeyError, match="nope"):
        runtime.advanced(spec, ("nope",))
