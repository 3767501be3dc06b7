"""Checks a ComfyUI workflow (UI format and API format) against node input specs.

Specs come in ComfyUI's ``/object_info`` form: ours are computed from the node classes, core
nodes from ../shared/comfyui/object_info.json (ComfyUI 0.3.64), the third-party ones our examples
use from workflows/specs/third_party_nodes.json. Each check returns a list of problems (empty = valid),
so a test can show all of them at once.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Widgets the frontend adds by itself that graphToPrompt still sends (checked with ComfyUI 0.3.64 and
# its frontend 1.27.10): an audio_upload combo gets an "audioUI" player widget, sent as "" (the server
# ignores inputs its node does not declare). Upload buttons are not sent.
FRONTEND_SENT_WIDGETS = {"audio_upload": ("audioUI", "")}


def spec_of_class(cls: type) -> dict:
    """The /object_info entry ComfyUI would serve for one of our node classes."""
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {sect: list(v) for sect, v in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": cls.__name__,
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }


def input_type(entry: list) -> str:
    """'COMBO' for choice lists, else the declared type name."""
    t = entry[0]
    return "COMBO" if isinstance(t, list) else t


def input_options(entry: list) -> dict:
    return entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}


def combo_choices(entry: list) -> list:
    if isinstance(entry[0], list):
        return entry[0]
    return input_options(entry).get("options", [])


def ordered_inputs(spec: dict) -> list[tuple[str, list, bool]]:
    """(name, entry, required) in the order the frontend lays out widgets."""
    out = []
    for sect in ("required", "optional"):
        entries = spec["input"].get(sect, {})
        order = spec.get("input_order", {}).get(sect, list(entries))
        out += [(name, entries[name], sect == "required") for name in order]
    return out


def is_widget(entry: list) -> bool:
    return input_type(entry) in WIDGET_TYPES


def has_seed_control(name: str, entry: list) -> bool:
    opts = input_options(entry)
    return input_type(entry) == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def has_upload(entry: list) -> bool:
    opts = input_options(entry)
    return bool(opts.get("image_upload") or opts.get("audio_upload") or opts.get("video_upload"))


def frontend_sent_widgets(spec: dict) -> dict[str, Any]:
    """{name: value} of the widgets the frontend adds to this node and sends in the API prompt."""
    extra = {}
    for _name, entry, _req in ordered_inputs(spec):
        for option, (name, value) in FRONTEND_SENT_WIDGETS.items():
            if input_options(entry).get(option):
                extra[name] = value
    return extra


def is_file_combo(entry: list) -> bool:
    """Choices that depend on files on the user's disk (empty in a clean install, or uploads)."""
    return input_type(entry) == "COMBO" and (not combo_choices(entry) or has_upload(entry))


def check_value(node: str, name: str, entry: list, value: Any) -> list[str]:
    """Is ``value`` valid for this widget input?"""
    t, opts = input_type(entry), input_options(entry)
    where = f"{node}.{name}={value!r}"
    if t == "COMBO":
        choices = combo_choices(entry)
        if is_file_combo(entry):
            return [] if isinstance(value, str) and value else [f"{where}: file choice must be a non-empty string"]
        return [] if value in choices else [f"{where}: not one of {choices}"]
    if t == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: not a boolean"]
    if t == "STRING":
        return [] if isinstance(value, str) else [f"{where}: not a string"]
    if t in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{where}: not a number"]
        if t == "INT" and not float(value).is_integer():
            return [f"{where}: not an integer"]
        probs = []
        if "min" in opts and value < opts["min"]:
            probs.append(f"{where}: below min {opts['min']}")
        if "max" in opts and value > opts["max"]:
            probs.append(f"{where}: above max {opts['max']}")
        return probs
    return [f"{where}: {t} is not a widget type"]


def types_match(out_type: str, in_type: str) -> bool:
    return out_type == in_type or "*" in (out_type, in_type)


def ui_widget_values(node: dict, spec: dict) -> tuple[dict[str, Any], list[str]]:
    """Map a UI node's ``widgets_values`` onto its widget inputs (skipping those driven by links)."""
    linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
    values = list(node.get("widgets_values") or [])
    if isinstance(node.get("widgets_values"), dict):  # some nodes serialise widgets by name
        return dict(node["widgets_values"]), []
    mapped, probs, pos = {}, [], 0
    label = f"node {node['id']} ({node['type']})"
    for name, entry, _req in ordered_inputs(spec):
        if not is_widget(entry):
            continue
        if pos >= len(values):
            probs.append(f"{label}: no widget value for {name!r}")
            break
        value = values[pos]
        pos += 1
        if name not in linked:
            mapped[name] = value
        if has_seed_control(name, entry) and pos < len(values) and values[pos] in SEED_CONTROL_VALUES:
            pos += 1
        if has_upload(entry):
            while pos < len(values) and (values[pos] in (None, "", "image", "audio", "video")):
                pos += 1
    if pos != len(values):
        probs.append(f"{label}: {len(values) - pos} unexpected extra widget values {values[pos:]}")
    return mapped, probs


def check_ui(workflow: dict, specs: dict[str, dict]) -> list[str]:
    """Problems of a UI-format (LiteGraph) workflow."""
    probs: list[str] = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    if not nodes:
        return ["workflow has no nodes"]
    for node in nodes.values():
        if node["type"] not in specs:
            probs.append(f"node {node['id']}: unknown type {node['type']!r}")
    if probs:
        return probs
    links = {}
    for link in workflow.get("links", []):
        lid, src, src_slot, dst, dst_slot, ltype = link[:6]
        links[lid] = link
        if src not in nodes or dst not in nodes:
            probs.append(f"link {lid}: joins missing node {src} -> {dst}")
            continue
        s_spec, d_node = specs[nodes[src]["type"]], nodes[dst]
        if src_slot >= len(s_spec["output"]):
            probs.append(f"link {lid}: {nodes[src]['type']} has no output slot {src_slot}")
            continue
        out_t = s_spec["output"][src_slot]
        if dst_slot >= len(d_node.get("inputs", [])):
            probs.append(f"link {lid}: {d_node['type']} has no input slot {dst_slot}")
            continue
        d_input = d_node["inputs"][dst_slot]
        entry = dict((n, e) for n, e, _ in ordered_inputs(specs[d_node["type"]])).get(d_input["name"])
        if entry is None:
            probs.append(f"link {lid}: {d_node['type']} has no input {d_input['name']!r}")
            continue
        in_t = input_type(entry)
        if not (types_match(out_t, in_t) and types_match(out_t, ltype)):
            probs.append(f"link {lid}: {nodes[src]['type']}[{src_slot}] {out_t} -> "
                         f"{d_node['type']}.{d_input['name']} {in_t} (link says {ltype})")
        if d_input.get("link") != lid:
            probs.append(f"link {lid}: input {d_node['type']}.{d_input['name']} records link {d_input.get('link')}")
        outs = nodes[src].get("outputs", [])
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            probs.append(f"link {lid}: output {src_slot} of node {src} does not list it")
    for node in nodes.values():
        spec = specs[node["type"]]
        # a saved node lists the outputs its node had then: a prefix of today's (outputs are only appended)
        saved = [o.get("type") for o in node.get("outputs") or []]
        if len(saved) > len(spec["output"]) or not all(map(types_match, saved, spec["output"])):
            probs.append(f"node {node['id']} ({node['type']}): outputs {saved} are not a prefix of {spec['output']}")
        entries = {n: (e, r) for n, e, r in ordered_inputs(spec)}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None and inp["link"] not in links:
                probs.append(f"node {node['id']}: input {inp['name']} names missing link {inp['link']}")
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, (entry, required) in entries.items():
            if required and not is_widget(entry) and name not in linked:
                probs.append(f"node {node['id']} ({node['type']}): required input {name!r} is not connected")
        values, vprobs = ui_widget_values(node, spec)
        probs += vprobs
        for name, value in values.items():
            probs += check_value(f"node {node['id']} ({node['type']})", name, entries[name][0], value)
    return probs


def check_api(prompt: dict, specs: dict[str, dict]) -> list[str]:
    """Problems of an API-format prompt ({id: {class_type, inputs}})."""
    probs: list[str] = []
    if not prompt:
        return ["prompt is empty"]
    for nid, node in prompt.items():
        ct = node.get("class_type")
        if ct not in specs:
            probs.append(f"{nid}: unknown class_type {ct!r}")
            continue
        spec = specs[ct]
        entries = {n: (e, r) for n, e, r in ordered_inputs(spec)}
        extra = frontend_sent_widgets(spec)
        for name, value in node.get("inputs", {}).items():
            if name in extra and name not in entries:
                if value != extra[name]:
                    probs.append(f"{nid} ({ct}).{name}={value!r}: the frontend sends {extra[name]!r}")
                continue
            if name not in entries:
                probs.append(f"{nid} ({ct}): unknown input {name!r}")
                continue
            entry = entries[name][0]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src, slot = value
                if src not in prompt:
                    probs.append(f"{nid} ({ct}).{name}: source node {src} missing")
                    continue
                out_types = specs.get(prompt[src]["class_type"], {}).get("output", [])
                if slot >= len(out_types) or not types_match(out_types[slot], input_type(entry)):
                    probs.append(f"{nid} ({ct}).{name}: {prompt[src]['class_type']}[{slot}] does not give "
                                 f"{input_type(entry)}")
            elif is_widget(entry):
                probs += check_value(f"{nid} ({ct})", name, entry, value)
            else:
                probs.append(f"{nid} ({ct}).{name}: {input_type(entry)} input needs a link, got {value!r}")
        for name, (_entry, required) in entries.items():
            if required and name not in node.get("inputs", {}):
                probs.append(f"{nid} ({ct}): required input {name!r} missing")
    return probs


def ui_to_api(workflow: dict, specs: dict[str, dict]) -> dict:
    """The API prompt a UI workflow describes (what the frontend's graphToPrompt sends)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for nid, node in nodes.items():
        if node.get("mode", 0) in (2, 4):  # muted / bypassed nodes are not sent
            continue
        values, _ = ui_widget_values(node, specs[node["type"]])
        inputs: dict[str, Any] = dict(values)
        inputs.update(frontend_sent_widgets(specs[node["type"]]))
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(nid)] = {"class_type": node["type"], "inputs": inputs}
    return prompt
