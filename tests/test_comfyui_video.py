"""In a real ComfyUI (issue 26): the VIDEO output chains into core nodes, also after segments queued by
Video Combine itself (queue items of 5 elements in 0.3.64, 6 in 0.8.0), and the subgraph blueprint is
served and loads in the browser where ComfyUI serves blueprints (0.8.0) and harms nothing where not.

Runs like tests/test_comfyui_real.py (same environment variables, its own server); skipped without
COMFYUI_PATH. Only the sampler-free chains run here: VAE Encode of a repeated photo stands in for the
sampler's latent, so a run takes seconds.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

import os
from pathlib import Path as _Path

if not os.environ.get("COMFYUI_PATH") or not (_Path(os.environ["COMFYUI_PATH"]) / "main.py").is_file():
    pytest.skip("COMFYUI_PATH does not name a ComfyUI source tree (a folder with main.py)", allow_module_level=True)

from tests import test_comfyui_real as R  # skips this module without COMFYUI_PATH
from tests.test_comfyui_real import frontend  # noqa: F401 (fixture: the pinned frontend, then each extra root)
from tests.test_blueprint import BLUEPRINT

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    yield from R._serve(tmp_path_factory.mktemp("comfyui_video"))


def _values(s: R.Server, prefix: str) -> dict:
    values = R._widget_values(s)
    side = s.case.side
    values.update({"ImageScale": {"width": side, "height": side, "crop": "center"},
                   "RepeatImageBatch": {"amount": s.case.frames},
                   "SonicVideoCombine": {"filename_prefix": f"{prefix}/{R.VIDEO_PREFIX}"}})
    return values


def _preview_count(entry: dict, node_id: str) -> int:
    return len(entry["outputs"].get(node_id, {}).get("images", []))


def test_video_output_chains_into_get_video_components(comfy):
    """Video Combine's VIDEO -> Get Video Components -> Preview Image: the core node reads the written
    file back, every frame of it."""
    chain = ("LoadImage", "LoadAudio", "SonicSVDLoader", "ImageScale", "RepeatImageBatch", "SonicVideoCombine",
             "GetVideoComponents", "PreviewImage")
    specs = R._specs_with(comfy, chain)
    assert specs["SonicVideoCombine"]["output"] == ["STRING", "VIDEO"]
    prompt = R._chain_prompt(specs, _values(comfy, "video"), chain)
    get = next(k for k, n in prompt.items() if n["class_type"] == "GetVideoComponents")
    combine = next(k for k, n in prompt.items() if n["class_type"] == "SonicVideoCombine")
    assert prompt[get]["inputs"]["video"] == [combine, 1]
    entry = R._run(comfy, prompt)
    video = R._saved_video(comfy, entry, "video")
    frames = comfy.case.frames
    assert R._decode(video)[0] == frames  # (the audio is cut to the video's length: not checked here)
    preview = next(k for k, n in prompt.items() if n["class_type"] == "PreviewImage")
    assert _preview_count(entry, preview) == frames, entry["outputs"].get(preview)


def _wait_idle(s: R.Server) -> None:
    deadline = time.monotonic() + R.RUN_TIMEOUT_S
    while True:
        queue = R._request(f"{s.url}/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        assert time.monotonic() < deadline, f"the queue did not empty:\n{s.log_tail()}"
        time.sleep(R.POLL_S)


def test_segments_requeue_and_video_nodes_run_once_at_the_end(comfy):
    """VAE Encode's latent -> Latent Segment -> Video Combine (segment) -> Get Video Components -> Preview
    Image: every segment is queued by Video Combine (re-queued items keep every element of ComfyUI's
    queue item: 5 in 0.3.64, 6 in 0.8.0), the nodes after VIDEO are blocked until the last segment, then
    run once on the whole file."""
    chain = ("LoadImage", "LoadAudio", "SonicSVDLoader", "ImageScale", "RepeatImageBatch", "VAEEncode",
             "SonicLatentSegment", "SonicVideoCombine", "GetVideoComponents", "PreviewImage")
    specs = R._specs_with(comfy, chain)
    frames = comfy.case.frames
    values = _values(comfy, "segvideo")
    values["SonicLatentSegment"] = {"segment_frames": R.SEGMENT_CHUNK, "decode_chunk_size": R.SEGMENT_CHUNK}
    prompt = R._chain_prompt(specs, values, chain)
    seg_id = next(k for k, n in prompt.items() if n["class_type"] == "SonicLatentSegment")
    combine = next(n for n in prompt.values() if n["class_type"] == "SonicVideoCombine")
    combine["inputs"]["segment"] = [seg_id, specs["SonicLatentSegment"]["output"].index("SONIC_SEGMENT")]
    preview = next(k for k, n in prompt.items() if n["class_type"] == "PreviewImage")
    expected = -(-frames // R.SEGMENT_CHUNK)
    assert expected >= 3, f"{frames} frames: the test needs several segments"
    before = set(R._request(f"{comfy.url}/history"))
    R._run(comfy, prompt)
    _wait_idle(comfy)
    runs = {k: v for k, v in R._request(f"{comfy.url}/history").items() if k not in before}
    failed = [v["status"] for v in runs.values() if v["status"].get("status_str") != "success"]
    assert not failed, f"a segment run failed: {failed}\n{comfy.log_tail()}"
    assert len(runs) == expected, f"{len(runs)} runs for {expected} segments"
    previews = [_preview_count(v, preview) for v in runs.values()]
    assert sorted(previews) == [0] * (expected - 1) + [frames], \
        f"the nodes after VIDEO ran {previews} times/frames; want once, after the last segment, {frames} frames"
    last = next(v for v in runs.values() if _preview_count(v, preview))
    video = R._saved_video(comfy, last, "segvideo")
    assert R._decode(video)[0] == frames


# ----------------------------------------------------------------------------------------------
# ComfyUI's own frame interpolation (0.33+) after our sampler, beside Sonic's RIFE node
# ----------------------------------------------------------------------------------------------
CORE_INTERP = ("FrameInterpolationModelLoader", "FrameInterpolate")
CORE_RIFE_NAME = "sonic_test_rife4.pth"
# A RIFE 4.x IFNet with random weights, built by that ComfyUI's own class in its own Python (the layout
# its loader detects; Sonic's flownet.pkl, RIFE HDv3, is not one it reads).
CORE_RIFE_SCRIPT = """import sys, torch
sys.path.insert(0, {root!r})
from comfy.cli_args import args
args.cpu = True
from comfy_extras.frame_interpolation_models.ifnet import IFNet
torch.manual_seed(0)
net = IFNet(head_ch=4, channels=(16, 16, 16, 16, 16))
for p in net.parameters():
    p.data.normal_(0.0, 0.02)
torch.save(net.state_dict(), {path!r})
"""


def _write_core_rife(s: R.Server) -> None:
    import subprocess

    folder = s.model_dir.parent / "frame_interpolation"
    folder.mkdir(exist_ok=True)
    env = dict(os.environ)
    if env.get("COMFYUI_STUBS"):
        env["LD_LIBRARY_PATH"] = env["COMFYUI_STUBS"]
    script = CORE_RIFE_SCRIPT.format(root=R.COMFYUI_PATH, path=str(folder / CORE_RIFE_NAME))
    run = subprocess.run([env.get("COMFYUI_PYTHON", sys.executable), "-c", script], cwd=R.COMFYUI_PATH,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_core_frame_interpolation_follows_the_sampler(comfy):
    """Sonic Sampler -> VAE Decode, then both ComfyUI's Run Frame Interpolation Model (x2, a RIFE 4.x
    model) and Sonic's Frame Interpolate (x2, RIFE/flownet.pkl), each into Video Combine at 25 fps:
    the same 2N-1 frames and the whole soundtrack either way. The core node outputs no frame rate:
    Video Combine's 25 is set by hand there."""
    specs = R._specs_with(comfy, R.CHAIN)
    if not all(c in specs for c in CORE_INTERP):
        pytest.skip(f"this ComfyUI has no {CORE_INTERP} (0.33.0 and later)")
    _write_core_rife(comfy)
    specs = R._specs_with(comfy, R.CHAIN + CORE_INTERP)
    values = R._widget_values(comfy)
    values["SonicVideoCombine"] = {"filename_prefix": f"sonic_rife/{R.VIDEO_PREFIX}"}
    prompt = R._chain_prompt(specs, values, R.CHAIN)
    decode = next(k for k, n in prompt.items() if n["class_type"] == "VAEDecode")
    sonic_combine = next(n for n in prompt.values() if n["class_type"] == "SonicVideoCombine")
    loader, interp, combine = (str(len(prompt) + i) for i in (1, 2, 3))
    prompt[loader] = {"class_type": CORE_INTERP[0], "inputs": {"model_name": CORE_RIFE_NAME}}
    prompt[interp] = {"class_type": CORE_INTERP[1],
                      "inputs": {"interp_model": [loader, 0], "images": [decode, 0], "multiplier": 2}}
    prompt[combine] = {"class_type": "SonicVideoCombine",
                       "inputs": {**sonic_combine["inputs"], "images": [interp, 0],
                                  "filename_prefix": f"core_rife/{R.VIDEO_PREFIX}"}}
    assert not isinstance(prompt[combine]["inputs"]["frame_rate"], list), "the frame rate is linked"
    entry = R._run(comfy, prompt)
    frames = 2 * comfy.case.frames - 1
    for sub in ("sonic_rife", "core_rife"):
        R._check_video(R._saved_video(comfy, entry, sub), comfy.case, frames)


# ----------------------------------------------------------------------------------------------
# The blueprint
# ----------------------------------------------------------------------------------------------
def _serves_blueprints(s: R.Server) -> bool:
    try:
        R._request(f"{s.url}/global_subgraphs")
        return True
    except R.urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


def test_blueprint_is_served_or_harmless(comfy):
    """0.8.0 lists subgraphs/Sonic Talking Portrait.json at /global_subgraphs and serves it unchanged;
    a ComfyUI without blueprints (0.3.64) has no such route and the pack loads without a word about it."""
    if not _serves_blueprints(comfy):
        log = comfy.log_text()
        assert "subgraph" not in log.lower(), log[-R.LOG_TAIL_CHARS:]
        assert not [ln for ln in log.splitlines() if R.PACK_LINK in ln and "IMPORT FAILED" in ln]
        return
    listed = R._request(f"{comfy.url}/global_subgraphs")
    ours = {k: v for k, v in listed.items() if v["info"]["node_pack"] == f"custom_nodes.{R.PACK_LINK}"}
    assert [v["name"] for v in ours.values()] == [BLUEPRINT.stem], listed
    (key,) = ours
    served = R._request(f"{comfy.url}/global_subgraphs/{key}")
    assert json.loads(served["data"]) == json.loads(BLUEPRINT.read_text())


CANVAS_CENTRE_JS = """() => { const b = document.querySelector('#graph-canvas').getBoundingClientRect();
  return {x: b.left + b.width / 2, y: b.top + b.height / 2}; }"""
SUBGRAPH_JS = """() => window.app.graph._nodes.map(n => ({
  type: n.type, title: n.title, subgraph: !!(n.isSubgraphNode && n.isSubgraphNode()),
  inner: n.subgraph ? n.subgraph._nodes.map(m => m.type) : [],
  inputs: (n.inputs || []).map(i => [i.name, i.type]), outputs: (n.outputs || []).map(o => [o.name, o.type])}))"""


def test_blueprint_loads_in_the_browser_with_no_alert(frontend):  # noqa: F811 (the imported fixture)
    """Where ComfyUI serves blueprints: the page opens without a load-failure toast, the blueprint is
    added from the node search box by its name, and dropped in as a workflow; each time one node with
    photo and audio in, VIDEO out, the basic chain inside, and no alert, toast or dialog."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright to drive the browser")
    if not R.Path(R.CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {R.CHROMIUM}")
    if not _serves_blueprints(frontend):
        pytest.skip("this ComfyUI does not serve subgraph blueprints (/global_subgraphs)")
    from playwright.sync_api import sync_playwright

    bp = json.loads(BLUEPRINT.read_text())
    inner = sorted(n["type"] for n in bp["definitions"]["subgraphs"][0]["nodes"])
    problems: list[str] = []

    def check(how: str, graph: list[dict]) -> None:
        subs = [n for n in graph if n["subgraph"]]
        if len(subs) != 1:
            problems.append(f"{how}: {len(subs)} subgraph nodes in {graph}")
            return
        n = subs[0]
        if sorted(n["inner"]) != inner:
            problems.append(f"{how}: inner nodes {sorted(n['inner'])}")
        if n["inputs"][:2] != [["photo", "IMAGE"], ["audio", "AUDIO"]] or n["outputs"] != [["video", "VIDEO"]]:
            problems.append(f"{how}: slots {n['inputs']} -> {n['outputs']}")

    with sync_playwright() as p:
        browser, page, dialogs = R._open_page(p, frontend)
        try:
            problems += [f"on opening the page: {x}" for x in R._notices(page, dialogs)]
            page.evaluate("async () => { await window.app.loadGraphData({nodes: [], links: [], version: 0.4}); }")
            page.wait_for_timeout(R.SETTLE_MS)
            R._notices(page, dialogs)
            where = page.evaluate(CANVAS_CENTRE_JS)
            page.mouse.dblclick(where["x"], where["y"])  # opens the node search box, its input focused
            page.wait_for_timeout(R.SETTLE_MS)
            page.keyboard.type(BLUEPRINT.stem)
            page.wait_for_timeout(R.SETTLE_MS)
            page.keyboard.press("Enter")
            page.wait_for_timeout(R.SETTLE_MS)
            problems += [f"added from the search box: {x}" for x in R._notices(page, dialogs)]
            check("added from the search box", page.evaluate(SUBGRAPH_JS))
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", bp)
            page.wait_for_timeout(R.SETTLE_MS)
            problems += [f"dropped in as a workflow: {x}" for x in R._notices(page, dialogs)]
            check("dropped in as a workflow", page.evaluate(SUBGRAPH_JS))
            api = page.evaluate("async () => (await window.app.graphToPrompt()).output")
            if sorted(n["class_type"] for n in api.values()) != inner:
                problems.append(f"the prompt of the blueprint: {sorted(n['class_type'] for n in api.values())}")
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


def test_workflow_saved_before_the_video_output_loads_with_no_alert(comfy):
    """workflows/sonic_basic.json as saved before the VIDEO output (Latent To Video listing only
    'filename'): it loads with no notice, and the node has both outputs, 'filename' still first."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright to drive the browser")
    if not R.Path(R.CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {R.CHROMIUM}")
    from playwright.sync_api import sync_playwright

    wf = json.loads((R.REPO / "workflows" / "sonic_basic.json").read_text())
    saver = next(n for n in wf["nodes"] if n["type"] == "SonicLatentToVideo")
    saver["outputs"] = saver["outputs"][:1]
    with sync_playwright() as p:
        browser, page, dialogs = R._open_page(p, comfy)
        try:
            R._notices(page, dialogs)
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
            page.wait_for_timeout(R.SETTLE_MS)
            notices = R._notices(page, dialogs)
            outputs = page.evaluate("""(id) => window.app.graph.getNodeById(id).outputs
                                       .map(o => [o.name, o.type])""", saver["id"])
        finally:
            browser.close()
    assert not notices, notices
    assert outputs == [["filename", "STRING"], ["video", "VIDEO"]], outputs
