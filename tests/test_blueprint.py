"""The subgraph blueprint in subgraphs/ (issue 26): ComfyUI 0.8.0 serves every <pack>/subgraphs/*.json
at /global_subgraphs and the frontend offers each as one node named after its file. Checked here against
the node definitions as tests/test_workflows.py checks the workflows; tests/test_comfyui_video.py loads
it in a real ComfyUI and browser."""

from __future__ import annotations

import json

from nodes.nodes_video import frontend_safe_workflow
from tests._golden import REPO
from tests._workflows import check_ui, ordered_inputs
from tests.test_workflows import specs  # noqa: F401 (fixture)

SUBGRAPHS = REPO / "subgraphs"
BLUEPRINT = SUBGRAPHS / "Sonic Talking Portrait.json"  # the file name is the node's name in the UI
BASIC = REPO / "workflows" / "sonic_basic.json"
OUTSIDE = ("LoadImage", "LoadAudio")  # the basic workflow's nodes that stay outside: its inputs
INPUT_NODE, OUTPUT_NODE = -10, -20  # ids of a subgraph's input and output nodes in its links
IO_SPEC = "_SubgraphIO"
CATEGORY = "Video generation and editing/Image to video"  # one of 0.33.0's own blueprint categories


def _load() -> tuple[dict, dict, dict]:
    bp = json.loads(BLUEPRINT.read_text())
    (sg,) = bp["definitions"]["subgraphs"]
    (node,) = bp["nodes"]
    return bp, sg, node


def test_one_blueprint_with_photo_and_audio_in_and_video_out():
    assert sorted(p.name for p in SUBGRAPHS.iterdir()) == [BLUEPRINT.name]
    bp, sg, node = _load()
    assert node["type"] == sg["id"] and not bp["links"], "the root graph is one node of the subgraph"
    io = ([(i["name"], i["type"]) for i in sg["inputs"]], [(o["name"], o["type"]) for o in sg["outputs"]])
    assert io == ([("photo", "IMAGE"), ("audio", "AUDIO")], [("video", "VIDEO")])
    assert ([(i["name"], i["type"]) for i in node["inputs"]], [(o["name"], o["type"]) for o in node["outputs"]]) == io
    assert sg["inputNode"]["id"] == INPUT_NODE and sg["outputNode"]["id"] == OUTPUT_NODE
    assert bp["extra"]["BlueprintDescription"], "the node library shows this description"
    # ComfyUI 0.33's built-in blueprints carry both on the subgraph; frontends 1.49.6 and 1.58.1 put the
    # node under "Subgraph Blueprints/<category>" and show extra.BlueprintDescription, else this one.
    assert sg["category"] == CATEGORY and sg["description"] == bp["extra"]["BlueprintDescription"]
    aliases = set(bp["extra"]["BlueprintSearchAliases"])
    assert {"talking head", "lip sync", "portrait animation", "数字人", "口型"} <= aliases
    assert frontend_safe_workflow(bp) == bp, "no null where the frontend's schema wants a value"


def _inner_workflow(sg: dict, specs: dict) -> tuple[dict, dict]:  # noqa: F811
    """The subgraph's inner graph as a UI workflow, its input and output nodes as two nodes whose
    slots are the subgraph's inputs and outputs, so check_ui checks every inner link and widget."""
    links = [[lk["id"], lk["origin_id"], lk["origin_slot"], lk["target_id"], lk["target_slot"], lk["type"]]
             for lk in sg["links"]]
    ins = {"id": INPUT_NODE, "type": IO_SPEC + "In", "inputs": [], "widgets_values": [],
           "outputs": [{"name": i["name"], "type": i["type"], "links": i["linkIds"]} for i in sg["inputs"]]}
    outs = {"id": OUTPUT_NODE, "type": IO_SPEC + "Out", "outputs": [], "widgets_values": [],
            "inputs": [{"name": o["name"], "type": o["type"], "link": lid} for o in sg["outputs"]
                       for lid in o["linkIds"]]}
    io_specs = {
        IO_SPEC + "In": {"input": {}, "output": [i["type"] for i in sg["inputs"]]},
        IO_SPEC + "Out": {"input": {"required": {o["name"]: [o["type"], {}] for o in sg["outputs"]}},
                          "output": []},
    }
    return {"nodes": [*sg["nodes"], ins, outs], "links": links}, {**specs, **io_specs}


def test_inner_graph_is_valid_against_the_node_definitions(specs):  # noqa: F811
    _bp, sg, _node = _load()
    workflow, all_specs = _inner_workflow(sg, specs)
    problems = check_ui(workflow, all_specs)
    assert not problems, "\n".join(problems)
    for o in sg["outputs"]:
        assert len(o["linkIds"]) == 1, f"subgraph output {o['name']} must have exactly one source"


def test_validator_catches_a_broken_blueprint(specs):  # noqa: F811
    _bp, sg, _node = _load()
    broken = json.loads(json.dumps(sg))
    broken["inputs"][1]["type"] = "IMAGE"  # audio input fed as an IMAGE
    workflow, all_specs = _inner_workflow(broken, specs)
    assert any("AUDIO" in p for p in check_ui(workflow, all_specs))
    broken = json.loads(json.dumps(sg))
    sampler = next(n for n in broken["nodes"] if n["type"] == "SonicSampler")
    sampler["widgets_values"][0] = -5  # seed below min 0
    assert check_ui(*_inner_workflow(broken, specs))


def test_inner_graph_is_the_basic_workflow(specs):  # noqa: F811
    """Same nodes, widget values and links as workflows/sonic_basic.json, less its Load Image and Load
    Audio (whose links now come from the subgraph's inputs), plus the VIDEO output: the two stay in step."""
    _bp, sg, _node = _load()
    basic = json.loads(BASIC.read_text())
    kept = {n["id"]: n for n in basic["nodes"] if n["type"] not in OUTSIDE}
    inner = {n["id"]: n for n in sg["nodes"]}
    assert {k: n["type"] for k, n in inner.items()} == {k: n["type"] for k, n in kept.items()}
    for k, n in kept.items():
        assert inner[k]["widgets_values"] == n["widgets_values"], f"node {k} ({n['type']}): widget values differ"
    outside = {n["id"] for n in basic["nodes"] if n["type"] in OUTSIDE}
    want = sorted((lk[1] if lk[1] not in outside else INPUT_NODE, lk[2] if lk[1] not in outside else -1, lk[3],
                   lk[4]) for lk in basic["links"])
    got = sorted((lk["origin_id"], lk["origin_slot"] if lk["origin_id"] != INPUT_NODE else -1, lk["target_id"],
                  lk["target_slot"]) for lk in sg["links"] if lk["target_id"] != OUTPUT_NODE)
    assert got == want
    (to_out,) = [lk for lk in sg["links"] if lk["target_id"] == OUTPUT_NODE]
    saver = inner[to_out["origin_id"]]
    assert saver["type"] == "SonicLatentToVideo" and to_out["origin_slot"] == 1 and to_out["type"] == "VIDEO"


def test_promoted_widgets_exist(specs):  # noqa: F811
    """Widgets shown on the blueprint's node (frontend 1.28+ 'proxyWidgets') name real inner widgets."""
    _bp, sg, node = _load()
    inner = {str(n["id"]): n for n in sg["nodes"]}
    promoted = node.get("properties", {}).get("proxyWidgets", [])
    assert promoted, "the seed is promoted to the blueprint's node"
    for node_id, widget in promoted:
        assert node_id in inner, f"promoted widget {widget!r} of missing inner node {node_id}"
        names = [name for name, _e, _r in ordered_inputs(specs[inner[node_id]["type"]])]
        assert widget in names, f"{inner[node_id]['type']} has no widget {widget!r}"
