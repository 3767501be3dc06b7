"""What the ComfyUI frontend does with our UI workflows, checked without a browser.

1. Frontend 1.27.10 (the one ComfyUI 0.3.64 pins) validates a dropped workflow against its zod schema
   (src/platform/workflow/validation/schemas/workflowSchema.ts, schema version 0.4) and shows an alert
   on the first value of the wrong type; a ``null`` where the schema wants an array, object or number
   was the one seen (floatingLinks, extra.reroutes, definitions, slot_index). ``SCHEMA`` below writes
   down, from that file, what each key the schema names wants; keys it does not name pass through.
   The same check runs on the workflow Video Combine embeds in a saved video.
2. No two nodes overlap once Load Image shows the portrait and Load Audio its player: node
   rectangles with the sizes the frontend gives the loaded nodes (recorded below) are apart, and each
   node sits wholly inside one group or outside all of them.
"""

from __future__ import annotations

import json
import os

import pytest

from tests._golden import REPO

WORKFLOWS = REPO / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))

# ----------------------------------------------------------------------------------------------
# The 0.4 workflow schema of frontend 1.27.10, as data. A value is either the JSON kinds the key
# takes ("number|string"; "null" only where the schema says .nullable()/.nullish()), the name of an
# object shape below, or [shape] / ["kind"] for an array of them.
# ----------------------------------------------------------------------------------------------
VECTOR = "array|object"  # zVector2: [x, y] or {0: x, 1: y}
NODE_ID = "number|string"
SLOT_INDEX = "number|string"  # an int, or a string that parses as one
DATA_TYPE = "string|array|number"
SCHEMA: dict[str, dict] = {
    "workflow": {
        "id": "string", "revision": "number", "last_node_id": NODE_ID, "last_link_id": "number",
        "nodes": ["node"], "links": ["link"], "floatingLinks": ["link_object"], "groups": ["group"],
        "config": "config|null", "extra": "extra|null", "version": "number", "models": ["model"],
        "definitions": "definitions", "subgraphs": ["object"],
    },
    "node": {
        "id": NODE_ID, "type": "string", "pos": VECTOR, "size": VECTOR, "flags": "flags",
        "order": "number", "mode": "number", "inputs": ["input"], "outputs": ["output"],
        "properties": "properties", "widgets_values": "array|object", "color": "string",
        "bgcolor": "string",
    },
    "input": {"name": "string", "type": DATA_TYPE, "link": "number|null", "slot_index": SLOT_INDEX},
    "output": {"name": "string", "type": DATA_TYPE, "links": "array|null", "slot_index": SLOT_INDEX},
    "flags": {"collapsed": "boolean", "pinned": "boolean", "allow_interaction": "boolean",
              "horizontal": "boolean", "skip_repeated_outputs": "boolean"},
    "properties": {"Node name for S&R": "string", "cnr_id": "string", "aux_id": "string", "ver": "string",
                   "models": ["model"]},
    "model": {"name": "string", "url": "string", "hash": "string", "hash_type": "string",
              "directory": "string"},
    "group": {"id": "number", "title": "string", "bounding": "array", "color": "string",
              "font_size": "number", "locked": "boolean"},
    "config": {"links_ontop": "boolean", "align_to_grid": "boolean"},
    "extra": {"ds": "ds", "frontendVersion": "string", "linkExtensions": ["link_extension"],
              "reroutes": ["reroute"]},
    "ds": {"scale": "number", "offset": VECTOR},
    "link_extension": {"id": "number", "parentId": "number"},
    "link_object": {"id": "number", "origin_id": NODE_ID, "origin_slot": SLOT_INDEX, "target_id": NODE_ID,
                    "target_slot": SLOT_INDEX, "type": DATA_TYPE, "parentId": "number"},
    "reroute": {"id": "number", "parentId": "number", "pos": VECTOR, "linkIds": "array|null",
                "floating": "object"},
    "definitions": {"subgraphs": ["object"]},
}
# A link in 0.4 form: [id, origin node, origin slot, target node, target slot, type].
LINK_TUPLE = ("number", NODE_ID, SLOT_INDEX, NODE_ID, SLOT_INDEX, DATA_TYPE)
REQUIRED = {"workflow": ("last_node_id", "last_link_id", "nodes", "links", "version"),
            "node": ("id", "type", "pos", "size", "flags", "order", "mode", "properties"),
            "input": ("name", "type"), "output": ("name", "type")}


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _accepts(want: str, value) -> bool:
    kinds = set(want.split("|"))
    if kinds & set(SCHEMA):  # an object shape, maybe nullable
        kinds = (kinds - set(SCHEMA)) | {"object"}
    return _kind(value) in kinds


def schema_problems(value, shape: str = "workflow", where: str = "") -> list[str]:
    """Every place ``value`` does not give what frontend 1.27.10's schema wants there."""
    fields = SCHEMA[shape]
    probs = [f"{where or '<top>'}: required {key!r} is missing"
             for key in REQUIRED.get(shape, ()) if key not in value]
    for key, want in fields.items():
        if key not in value:
            continue
        v, at = value[key], f"{where}.{key}" if where else key
        if isinstance(want, list):
            if not isinstance(v, list):
                probs.append(f"{at}: expected array, received {_kind(v)}")
                continue
            for i, item in enumerate(v):
                probs += _item_problems(want[0], item, f"{at}[{i}]")
            continue
        if not _accepts(want, v):
            probs.append(f"{at}: expected {want}, received {_kind(v)}")
            continue
        child = want.split("|")[0]
        if child in SCHEMA and isinstance(v, dict):
            probs += schema_problems(v, child, at)
    if shape == "workflow":
        for i, link in enumerate(value.get("links") or []):
            if isinstance(link, list):
                probs += [f"links[{i}][{j}]: expected {want}, received {_kind(x)}"
                          for j, (want, x) in enumerate(zip(LINK_TUPLE, link)) if not _accepts(want, x)]
    return probs


def _item_problems(want: str, item, at: str) -> list[str]:
    if want == "link":
        ok = isinstance(item, list) and len(item) >= len(LINK_TUPLE)
        return [] if ok else [f"{at}: expected a link tuple"]
    if want in SCHEMA:
        return schema_problems(item, want, at) if isinstance(item, dict) else [f"{at}: expected object"]
    return [] if _accepts(want, item) else [f"{at}: expected {want}, received {_kind(item)}"]


def _with_nulls(workflow: dict) -> dict:
    """The workflow as the old files held it: null for every absent key the issue saw rejected."""
    wf = json.loads(json.dumps(workflow))
    for key in ("floatingLinks", "definitions"):
        wf.setdefault(key, None)
    wf.setdefault("extra", {}).setdefault("reroutes", None)
    for node in wf["nodes"]:
        node.setdefault("showAdvanced", None)
        for slot in node.get("inputs", []) + node.get("outputs", []):
            for key in ("slot_index", "label", "dir", "shape", "pos", "locked"):
                slot.setdefault(key, None)
    return wf


# ----------------------------------------------------------------------------------------------
# 1. No value of a type the frontend rejects
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_matches_the_frontend_schema(path):
    problems = schema_problems(json.loads(path.read_text()))
    assert not problems, f"frontend 1.27.10 rejects {path.name}:\n" + "\n".join(problems)


def test_schema_check_catches_the_nulls_frontend_1_27_rejects():
    wf = _with_nulls(json.loads(UI_FILES[0].read_text()))
    problems = "\n".join(schema_problems(wf))
    for where in ("floatingLinks", "definitions", "extra.reroutes", "nodes[0].outputs[0].slot_index"):
        assert f"{where}: expected" in problems, where
    assert "label" not in problems  # passthrough keys take anything


def test_sanitizer_gives_back_the_shipped_file():
    from nodes.nodes_video import frontend_safe_workflow

    for path in UI_FILES:
        shipped = json.loads(path.read_text())
        assert frontend_safe_workflow(_with_nulls(shipped)) == shipped, path.name


def test_saved_video_embeds_a_workflow_the_frontend_accepts(tmp_path, monkeypatch):
    """Video Combine stores the running workflow in the file; dropping the file back onto the canvas
    loads that workflow, so it is stored without the rejected nulls (an unconnected link stays null)."""
    import av
    import torch

    from nodes import runtime
    from nodes.nodes_video import SonicVideoCombine

    monkeypatch.setenv(runtime.OUTPUT_ENV, str(tmp_path))
    shipped = json.loads(UI_FILES[0].read_text())
    frames = torch.full((2, 16, 16, 3), 0.5)  # (N, H, W, C)
    out = SonicVideoCombine().combine(frames, 25.0, "wf/clip", "h264-mp4", 23, "yuv420p",
                                      prompt={}, extra_pnginfo={"workflow": _with_nulls(shipped)})
    with av.open(out["result"][0]) as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}
    embedded = json.loads(tags["workflow"])
    assert not schema_problems(embedded), schema_problems(embedded)
    assert embedded == shipped
    assert os.path.isfile(out["result"][0])


# ----------------------------------------------------------------------------------------------
# 2. Layout with the sizes of loaded nodes
# ----------------------------------------------------------------------------------------------
# (width, body height) in canvas px the frontend gives a node once its widgets show what they hold,
# measured in headless Chromium on ComfyUI 0.3.64 with frontends 1.27.10 and 1.58.1 (the same on
# both): Load Image grows to show the picked portrait, Load Audio shows its player. For the other
# nodes, the smallest size the frontend draws them at (LGraphNode.computeSize). A node is drawn at
# the larger of this and the size in the file.
LOADED_SIZE = {
    "LoadImage": (290, 314), "LoadAudio": (290, 136), "ImageOnlyCheckpointLoader": (219, 98),
    "SonicSVDLoader": (219, 126),
    "SonicLoader": (210, 178), "SonicFaceMaskDetect": (210, 262), "SonicWhisperAudioEncode": (210, 78),
    "SonicMotionBucketPredict": (244, 214), "SonicSampler": (259, 562), "VAEDecode": (140, 46),
    "SonicFrameInterpolate": (210, 150), "SonicVideoCombine": (210, 194),
    # Latent To Video, Paste Back and Latent Segment: estimated for color_match (+24 px a widget) and the
    # more_faces / same_segment_as sockets (+20 px) until measured in the browser again
    "SonicLatentToVideo": (372, 422), "SonicPasteBack": (210, 146), "SonicLatentSegment": (211, 146),
    "UpscaleModelLoader": (210, 58),
    "ImageUpscaleWithModel": (222, 46), "FaceRestoreCFWithModel": (210, 102),
    "FaceRestoreModelLoader": (210, 58),
    # estimates (LiteGraph computeSize of their slots, not yet measured in a browser): the conversation workflow
    "PreviewImage": (225, 246), "SonicMixVoices": (210, 126), "SonicAddFace": (210, 66),
}
# widgets each of our nodes had when LOADED_SIZE was measured: a widget added or removed changes the
# node's height, so the size above is stale until measured again (tests/test_comfyui_real.py's
# browser test measures it) and the workflows' layout must make room for it
MEASURED_WIDGETS = {
    "SonicFaceMaskDetect": 7, "SonicFrameInterpolate": 4, "SonicLatentSegment": 3, "SonicLatentToVideo": 12,
    "SonicLoader": 6, "SonicMotionBucketPredict": 5, "SonicSVDLoader": 3, "SonicSampler": 16,
    "SonicVideoCombine": 5, "SonicWhisperAudioEncode": 1, "SonicPasteBack": 3, "SonicAddFace": 0,
    "SonicMixVoices": 0, "SonicSpeakerVoice": 2,
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos
MIN_GAP = 20  # px kept between nodes; also covers Load Image's computeSize height (326 vs 314)


def _node_rects(workflow: dict) -> dict[str, tuple[float, float, float, float]]:
    """{label: (x0, y0, x1, y1)} of every node as drawn, title bar included."""
    rects = {}
    for node in workflow["nodes"]:
        assert node["type"] in LOADED_SIZE, f"record the loaded size of {node['type']} in LOADED_SIZE"
        (x, y), (w, h) = node["pos"], node["size"]
        min_w, min_h = LOADED_SIZE[node["type"]]
        w, h = max(w, min_w), max(h, min_h)
        rects[f"node {node['id']} ({node['type']})"] = (x, y - TITLE_HEIGHT, x + w, y + h)
    return rects


def _apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def layout_problems(workflow: dict) -> list[str]:
    rects = _node_rects(workflow)
    groups = {}
    for g in workflow.get("groups", []):
        x, y, w, h = g["bounding"]
        groups[f"group {g['title']!r}"] = (x, y, x + w, y + h)
    names = sorted(rects)
    probs = [f"{a} and {b} overlap (or are closer than {MIN_GAP} px)"
             for i, a in enumerate(names) for b in names[i + 1:] if not _apart(rects[a], rects[b], MIN_GAP)]
    gnames = sorted(groups)
    probs += [f"{a} and {b} overlap" for i, a in enumerate(gnames) for b in gnames[i + 1:]
              if not _apart(groups[a], groups[b], 0)]
    for name, rect in rects.items():
        holders = [g for g, box in groups.items() if _inside(rect, box)]
        crossed = [g for g, box in groups.items() if not _apart(rect, box, 0) and g not in holders]
        if crossed:
            probs.append(f"{name} sticks out of {crossed}")
    return probs


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_no_nodes_overlap_once_image_and_audio_are_loaded(path):
    problems = layout_problems(json.loads(path.read_text()))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def widget_count(node_type: str) -> int:
    """Inputs the frontend draws as widgets (combos and INT / FLOAT / STRING / BOOLEAN not forced to sockets)."""
    from nodes import NODE_CLASS_MAPPINGS

    spec = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    n = 0
    for section in ("required", "optional"):
        for entry in spec.get(section, {}).values():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            n += (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not opts.get("forceInput")
    return n


def test_loaded_sizes_were_measured_with_todays_widgets():
    from nodes import NODE_CLASS_MAPPINGS

    assert set(MEASURED_WIDGETS) == set(NODE_CLASS_MAPPINGS), "record every node's widget count"
    stale = {t: (n, widget_count(t)) for t, n in MEASURED_WIDGETS.items() if widget_count(t) != n}
    assert not stale, (f"widgets changed since LOADED_SIZE was measured (then, now): {stale}; measure the "
                       "node in the browser (tests/test_comfyui_real.py), update LOADED_SIZE, MEASURED_WIDGETS "
                       "and the workflows' node sizes and layout")


def test_layout_check_catches_the_old_overlap():
    """The layout the first release shipped: Load Audio right under a Load Image sized for no image."""
    wf = json.loads(UI_FILES[0].read_text())
    audio = next(n for n in wf["nodes"] if n["type"] == "LoadAudio")
    audio["pos"] = [0, 198]
    assert any("LoadAudio" in p and "LoadImage" in p for p in layout_problems(wf))
