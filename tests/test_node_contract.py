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


def test_readme_documents_every_node_and_input():
    """README.md's node reference names every node and every input (users read it, not the code)."""
    from tests._golden import REPO

    readme = (REPO / "README.md").read_text()
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        start = readme.find(f"(`{node_id}`)")
        assert start >= 0, f"README.md has no section for {node_id}"
        section = readme[start:readme.find("\n### ", start + 1)]
        for sect in ("required", "optional"):
            for name in cls.INPUT_TYPES().get(sect, {}):
                assert f"`{name}`" in section, f"README.md section of {node_id} does not explain input {name!r}"
