"""The core VIDEO output of Video Combine and Latent To Video (issue 26), the output contract that
keeps saved workflows' links, and the segment re-queue on both shapes of ComfyUI's queue items.

Without ComfyUI the VIDEO output is ``nodes.runtime.VideoFile`` (the saved file's path), and None
after a segment that is not the last; tests/test_comfyui_video.py chains the real comfy_api VIDEO into
ComfyUI's Get Video Components and checks the segment re-queue in a real ComfyUI.
"""

from __future__ import annotations

import os
import sys
import threading
import types

import av
import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, nodes_long, nodes_video, runtime
from tests.test_long_nodes import FRAMES, _audio, _run_segments, env, models  # noqa: F401 (fixtures)
from tests.test_workflows import specs  # noqa: F401 (fixture)

# Every node's outputs as released before issue 26 (type, name): saved workflows link to these slot
# indices, so they stay first and in this order; new outputs are appended after them.
RELEASED_OUTPUTS = {
    "SonicLoader": [("SONIC_MODEL", "sonic_model")],
    "SonicWhisperAudioEncode": [("SONIC_AUDIO", "sonic_audio")],
    "SonicFaceMaskDetect": [("IMAGE", "image"), ("MASK", "face_mask"), ("SONIC_FACE_BOX", "face_box")],
    "SonicMotionBucketPredict": [("SONIC_MOTION", "sonic_motion")],
    "SonicSampler": [("LATENT", "latent"), ("FLOAT", "fps")],
    "SonicSVDLoader": [("VAE", "vae"), ("CLIP_VISION", "clip_vision")],
    "SonicFrameInterpolate": [("IMAGE", "images"), ("FLOAT", "frame_rate")],
    "SonicVideoCombine": [("STRING", "filename")],
    "SonicLatentToVideo": [("STRING", "filename")],
    "SonicLatentSegment": [("IMAGE", "images"), ("SONIC_SEGMENT", "segment")],
    "SonicPasteBack": [("IMAGE", "images")],
}


def _outputs(cls) -> list[tuple[str, str]]:
    return list(zip(cls.RETURN_TYPES, getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)))


@pytest.mark.parametrize("node_id", sorted(RELEASED_OUTPUTS))
def test_released_outputs_keep_their_slots(node_id):
    if node_id not in NODE_CLASS_MAPPINGS:
        pytest.skip(f"{node_id} is not in this build")
    now = _outputs(NODE_CLASS_MAPPINGS[node_id])
    released = RELEASED_OUTPUTS[node_id]
    assert now[:len(released)] == released, f"{node_id}: outputs {now} no longer start with {released}"


@pytest.mark.parametrize("node_id", ["SonicVideoCombine", "SonicLatentToVideo"])
def test_saving_nodes_append_a_core_video_output(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert _outputs(cls) == [("STRING", "filename"), ("VIDEO", "video")]
    assert len(cls.OUTPUT_TOOLTIPS) == 2 and "VIDEO" in cls.OUTPUT_TOOLTIPS[1]


def _frames(n: int, side: int = 32) -> torch.Tensor:
    t = torch.linspace(0, 1, n).view(n, 1, 1, 1)
    return (0.2 + 0.6 * t).expand(n, side, side, 3).contiguous()  # [n, side, side, 3]


def _count(path: str) -> int:
    with av.open(path) as c:
        return sum(1 for _ in c.decode(video=0))


def test_video_combine_video_output_is_the_written_file(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.OUTPUT_ENV, str(tmp_path))
    out = nodes_video.SonicVideoCombine().combine(_frames(7), 25.0, "Sonic/v", "h264-mp4", 20, "yuv420p")
    path, video = out["result"]
    assert isinstance(video, runtime.VideoFile) and video.get_stream_source() == path
    assert os.path.isfile(path) and _count(video.path) == 7


def test_latent_to_video_and_segments_video_output(env):  # noqa: F811 (the imported fixture)
    vae, _rife, latents, _out, _written = env
    result = nodes_long.SonicLatentToVideo().save({"samples": latents}, vae, 12.5, "RIFE/flownet.pkl", 2,
                                                  "Sonic/stream", audio=_audio(1.0), decode_chunk_size=4)
    path, video = result["result"]
    assert isinstance(video, runtime.VideoFile) and video.path == path and _count(path) == 2 * FRAMES - 1
    # segments: only the last one has a file; before it the VIDEO output is "not ready" (None here)
    first, _info = _run_segments(vae, latents, None, stop=1, prefix="Sonic/seg")
    assert first["result"] == ("", None)
    assert nodes_video._live, "the clip's file stays open for the next segment"
    last, _info = _run_segments(vae, latents, None, prefix="Sonic/seg")
    path, video = last["result"]
    assert video.path == path and _count(path) == 2 * FRAMES - 1


def test_video_not_ready_blocks_silently_in_comfyui(monkeypatch):
    """In ComfyUI a non-final segment's VIDEO is a silent ExecutionBlocker: the nodes after it skip
    that run (checked on ComfyUI's own class when COMFYUI_PATH names a ComfyUI tree)."""
    root = os.environ.get("COMFYUI_PATH", "")
    if not os.path.isfile(os.path.join(root, "comfy_execution", "graph_utils.py")):
        pytest.skip("COMFYUI_PATH does not name a ComfyUI tree with comfy_execution/graph_utils.py")
    monkeypatch.syspath_prepend(root)
    from comfy_execution.graph_utils import ExecutionBlocker

    monkeypatch.setattr(runtime, "COMFY", True)
    blocked = runtime.video_not_ready()
    assert isinstance(blocked, ExecutionBlocker) and blocked.message is None


# ----------------------------------------------------------------------------------------------
# The segment re-queue: ComfyUI 0.3.64 queue items have 5 elements, 0.8.0 adds a 6th (sensitive)
# ----------------------------------------------------------------------------------------------
class _Queue:
    """The part of ComfyUI's PromptQueue that queue_prompt_again uses."""

    def __init__(self, running: dict):
        self.mutex = threading.RLock()
        self.currently_running = running
        self.queued: list[tuple] = []

    def put(self, item: tuple) -> None:
        self.queued.append(item)


def _server(monkeypatch, item: tuple) -> types.SimpleNamespace:
    srv = types.SimpleNamespace(prompt_queue=_Queue({0: item}), number=5, last_prompt_id=item[1])
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(
        instance=srv)))
    monkeypatch.setattr(runtime, "COMFY", True)
    return srv


PROMPT = {"7": {"class_type": "SonicLatentSegment", "inputs": {"segment_index": 0}}}
EXTRA = {"client_id": "abc", "extra_pnginfo": {"workflow": {}}}


@pytest.mark.parametrize("tail", [(), ({"api_key": "secret"},)], ids=["0.3.64 (5 elements)",
                                                                        "0.8.0 (6th: sensitive)"])
def test_requeue_keeps_every_element_of_the_queue_item(monkeypatch, tail):
    item = (3, "prompt-1", PROMPT, EXTRA, ["12"], *tail)
    srv = _server(monkeypatch, item)
    assert runtime.queue_prompt_again("7", "segment_index", 1)
    (queued,) = srv.prompt_queue.queued
    assert len(queued) == len(item), f"{len(queued)} elements queued for a {len(item)}-element item"
    number, prompt_id, prompt, extra, outputs, *rest = queued
    assert number == -5 and srv.number == 6, "the next segment runs first"
    assert prompt_id != "prompt-1" and prompt["7"]["inputs"]["segment_index"] == 1
    assert PROMPT["7"]["inputs"]["segment_index"] == 0, "the running prompt is left as it was"
    assert extra == EXTRA and extra is not EXTRA and outputs == ["12"]
    assert tuple(rest) == tail, "the 6th element (0.8.0: the sensitive data) is carried over"


def test_requeue_refuses_a_prompt_without_the_segment_node(monkeypatch):
    srv = _server(monkeypatch, (3, "prompt-1", PROMPT, EXTRA, ["12"]))
    assert not runtime.queue_prompt_again("99", "segment_index", 1)
    assert not srv.prompt_queue.queued


def test_workflows_saved_before_the_video_output_stay_valid(specs):  # noqa: F811 (the imported fixture)
    """The shipped workflows list both outputs; one saved before issue 26 lists only 'filename' and is
    still valid (its links keep their slots), while a saved output order that differs is caught."""
    import json

    from tests._workflows import check_ui
    from tests.test_workflows import WORKFLOWS

    for path in sorted(WORKFLOWS.glob("*.json")):
        wf = json.loads(path.read_text())
        savers = [n for n in wf["nodes"] if n["type"] in ("SonicVideoCombine", "SonicLatentToVideo")]
        assert savers and all([o["type"] for o in n["outputs"]] == ["STRING", "VIDEO"] for n in savers), path.name
        for n in savers:
            n["outputs"] = n["outputs"][:1]  # as saved before the VIDEO output
        assert not check_ui(wf, specs), path.name
        savers[0]["outputs"] = [{"name": "video", "type": "VIDEO", "links": None},
                                {"name": "filename", "type": "STRING", "links": None}]
        assert any("not a prefix" in p for p in check_ui(wf, specs)), path.name
