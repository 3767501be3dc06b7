"""Every shipped workflow is valid against the real node specs, and its API twin matches it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._golden import REPO, SHARED
from tests._workflows import check_api, check_ui, spec_of_class, ui_to_api

WORKFLOWS = REPO / "workflows"
# Data the validator reads sits in a subfolder: ComfyUI lists every workflows/*.json as a template.
THIRD_PARTY_SPECS = WORKFLOWS / "specs" / "third_party_nodes.json"
EXPECTED = ("sonic_basic", "sonic_conversation", "sonic_paste_back", "sonic_upscale_facerestore")


# The model folder layout README.md documents: the file pickers of our nodes list these names.
MODEL_LAYOUT = ("Sonic/unet.pth", "Sonic/audio2token.pth", "Sonic/audio2bucket.pth", "yoloface_v5m.pt", "whisper-tiny/config.json",
                "RIFE/flownet.pkl", "stable-video-diffusion-img2vid-xt/model_index.json")


def _specs(models_dir: Path) -> dict[str, dict]:
    from nodes import NODE_CLASS_MAPPINGS

    for rel in MODEL_LAYOUT:
        (models_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (models_dir / rel).write_bytes(b"")

    info = SHARED / "comfyui" / "object_info.json"
    if not info.exists():
        pytest.skip(f"{info} is absent: core node specs (ComfyUI 0.3.64) are needed to check workflows")
    specs = json.loads(info.read_text())
    third = json.loads(THIRD_PARTY_SPECS.read_text())
    specs.update({k: v for k, v in third.items() if not k.startswith("_")})
    specs.update({name: spec_of_class(cls) for name, cls in NODE_CLASS_MAPPINGS.items()})
    return specs


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """Specs as a user with the documented model folder would see them (file pickers filled)."""
    models = tmp_path_factory.mktemp("models")
    mp = pytest.MonkeyPatch()
    mp.setenv("SONIC_MODELS_DIR", str(models))
    try:
        yield _specs(models)
    finally:
        mp.undo()


def _ui_files():
    return sorted(WORKFLOWS.glob("*.json"))


def test_expected_workflows_exist():
    for name in EXPECTED:
        assert (WORKFLOWS / f"{name}.json").is_file(), f"workflows/{name}.json is missing"
        assert (WORKFLOWS / "api" / f"{name}.json").is_file(), f"workflows/api/{name}.json is missing"


def test_only_ui_workflows_sit_in_workflows():
    """ComfyUI lists every workflows/*.json as a template (GET /workflow_templates), so each one is a
    UI workflow we ship, and has the thumbnail the Templates browser asks for: <name>.jpg, a JPEG
    (frontends 1.27.10 and 1.58.1 give custom-node templates mediaSubtype 'jpg')."""
    from PIL import Image

    assert sorted(p.stem for p in _ui_files()) == sorted(EXPECTED)
    for path in _ui_files():
        wf = json.loads(path.read_text())
        assert isinstance(wf.get("nodes"), list) and "links" in wf and "version" in wf, \
            f"{path.name} is not a UI workflow; data files belong in a subfolder (e.g. workflows/specs/)"
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{path.name} has no thumbnail {thumb.name}"
        with Image.open(thumb) as im:
            assert im.format == "JPEG", f"{thumb.name} is {im.format}, not JPEG"


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
def test_ui_workflow_is_valid(path: Path, specs):
    problems = check_ui(json.loads(path.read_text()), specs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted((WORKFLOWS / "api").glob("*.json")), ids=lambda p: p.stem)
def test_api_workflow_is_valid(path: Path, specs):
    problems = check_api(json.loads(path.read_text()), specs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
def test_api_twin_describes_the_same_graph(path: Path, specs):
    twin = WORKFLOWS / "api" / path.name
    assert twin.is_file(), f"{path.name} has no API twin in workflows/api/"
    expected = ui_to_api(json.loads(path.read_text()), specs)
    api = json.loads(twin.read_text())
    strip = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}
    assert strip == expected


def test_validator_catches_broken_workflows(specs):
    """The checks above can fail: a wrong link type, an out-of-range widget and an unknown node."""
    wf = json.loads((WORKFLOWS / "sonic_basic.json").read_text())
    broken = json.loads(json.dumps(wf))
    link = broken["links"][0]
    link[5] = "NOT_A_TYPE"
    assert any("link" in p for p in check_ui(broken, specs))
    broken = json.loads(json.dumps(wf))
    sampler = next(n for n in broken["nodes"] if n["type"] == "SonicSampler")
    sampler["widgets_values"][0] = -5  # seed below min 0
    assert check_ui(broken, specs)
    broken = json.loads(json.dumps(wf))
    broken["nodes"][0]["type"] = "NoSuchNode"
    assert check_ui(broken, specs)


# Single-file models the UI workflows name: each node that picks one carries, in properties.models, its
# name, download URL and folder the way ComfyUI's templates do, so the missing-model panel of frontend
# 1.49+ offers "Download" and "Copy URL" under the folder "sonic" instead of "Unknown". Folders of
# several files (whisper-tiny, SVD-xt) keep the README's commands.
SINGLE_FILE_MODELS = ("Sonic/unet.pth", "Sonic/audio2token.pth", "Sonic/audio2bucket.pth", "yoloface_v5m.pt",
                      "RIFE/flownet.pkl")


def _download_url(name: str) -> str:
    from sonic_core.pipeline import SONIC_REPO

    return f"https://huggingface.co/{SONIC_REPO}/resolve/main/{name}"


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
def test_single_file_models_carry_their_download(path: Path):
    from nodes.runtime import MODEL_FOLDER

    problems, named = [], set()
    for node in json.loads(path.read_text())["nodes"]:
        values = [v for v in node.get("widgets_values") or [] if isinstance(v, str)]
        listed = node["properties"].get("models", [])
        want = [{"name": v, "url": _download_url(v), "directory": MODEL_FOLDER}
                for v in values if v in SINGLE_FILE_MODELS]
        named.update(m["name"] for m in want)
        if listed != want:
            problems.append(f"node {node['id']} ({node['type']}): properties.models {listed}, expected {want}")
    assert not problems, "\n".join(problems)
    assert named, f"{path.name} names none of {SINGLE_FILE_MODELS}"
