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
