"""workflows/api/sonic_conversation.json run node by node on tiny models (issue 30 item 9): every node
of the shipped prompt called as ComfyUI's executor calls it (inputs from the prompt, links resolved in
order), with only ComfyUI's own Load Image / Load Audio / Preview Image and the face detector's
network replaced. Both faces move in one video of the photo's size, the sound is the two voices mixed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from sonic_core import pipeline, selftest
from tests._golden import REPO
from tests.test_conversation_cli import (PHOTO, RATE, _corr, _decode, face_box, voice_samples, write_photo,
                                         write_wav)

PROMPT = REPO / "workflows" / "api" / "sonic_conversation.json"
FAST = {"SonicSampler": {"steps": 2, "min_resolution": 64},  # tiny models: few steps, the smallest size
        "SonicMotionBucketPredict": {"min_resolution": 64}, "SonicLatentToVideo": {"multiplier": 2}}


class PhotoFaces:
    """Stands in for the YOLOv5-face network: the drawn faces of the test photo (none on a crop, so
    Face Mask Detect shifts the photo's box into its crop)."""

    def detect(self, image_u8, confidence=None, iou=None):
        if tuple(image_u8.shape[:2]) != (PHOTO[1], PHOTO[0]):
            return []
        return [SimpleNamespace(x=x1, y=y1, w=x2 - x1, h=y2 - y1, score=0.9)
                for x1, y1, x2, y2 in map(face_box, range(2))]


def _order(prompt: dict) -> list[str]:
    done, order = set(), []

    def visit(nid: str) -> None:
        if nid in done:
            return
        for value in prompt[nid]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                visit(value[0])
        done.add(nid)
        order.append(nid)

    for nid in prompt:
        visit(nid)
    return order


@pytest.mark.slow
def test_conversation_workflow_runs(tmp_path, monkeypatch):
    import nodes.nodes_face as nodes_face
    from nodes import NODE_CLASS_MAPPINGS
    from nodes import runtime

    models = selftest.write_tiny_models(tmp_path / "models")
    photo_path = write_photo(tmp_path / "two.png", heads=2)
    a, b = voice_samples(0.8, 140.0), voice_samples(0.5, 220.0)
    voices = [pipeline.read_audio(write_wav(tmp_path / f"{n}.wav", s)) for n, s in (("a", a), ("b", b))]
    image, _alpha = pipeline.read_image(photo_path)  # the workflow finds the faces with the detector
    monkeypatch.setenv("SONIC_MODELS_DIR", str(models))
    monkeypatch.setenv(runtime.OUTPUT_ENV, str(tmp_path / "output"))
    monkeypatch.setattr(nodes_face, "_detector", lambda name: PhotoFaces())
    prompt = json.loads(PROMPT.read_text())
    audio_nodes = iter(voices)
    results, previews = {}, []
    for nid in _order(prompt):
        node = prompt[nid]
        kind = node["class_type"]
        if kind == "LoadImage":
            results[nid] = (image, None)
            continue
        if kind == "LoadAudio":
            wave, rate = next(audio_nodes)
            results[nid] = ({"waveform": wave, "sample_rate": rate},)
            continue
        inputs = {k: results[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        if kind == "PreviewImage":
            previews.append(inputs["images"])
            continue
        if kind == "SonicSVDLoader":
            inputs["svd_folder"] = str(models / pipeline.SVD_FOLDER)
        inputs.update(FAST.get(kind, {}))
        cls = NODE_CLASS_MAPPINGS[kind]
        out = getattr(cls(), cls.FUNCTION)(**inputs)
        results[nid] = out["result"] if isinstance(out, dict) else out
    assert len(previews) == 2 and all(tuple(p.shape[1:3]) == (PHOTO[1], PHOTO[0]) for p in previews)
    assert not np.allclose(previews[0].numpy(), previews[1].numpy()), "each preview highlights its own face"
    [video] = list((tmp_path / "output").rglob("*.mp4"))
    assert video.parent.name == "Sonic" and video.name.startswith("conversation")
    frames, sound, rate = _decode(video)
    assert frames.shape[1:3] == (PHOTO[1], PHOTO[0]) and frames.shape[0] == 2 * int(0.8 * 12.5) - 1
    for k in range(2):  # both faces move
        x1, y1, x2, y2 = face_box(k)
        assert frames[:, y1:y2, x1:x2].astype(np.float32).std(axis=0).mean() > 1.0, f"face {k + 1} is still"
    assert frames[:, :, -20:].astype(np.float32).std(axis=0).mean() < 0.5, "the background moved"
    import soxr

    mix = np.zeros(len(a), np.float32)
    mix += a
    mix[:len(b)] += b
    want = soxr.resample(mix, RATE, rate)
    assert _corr(sound, want) > max(_corr(sound, soxr.resample(a, RATE, rate)),
                                    _corr(sound, soxr.resample(b, RATE, rate))), "the sound is not the mix"
