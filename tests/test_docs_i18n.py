"""Help-panel docs (web/docs) and translations (locales/) against the node classes.

The generator (scripts/gen_docs.py) writes them from INPUT_TYPES / RETURN_NAMES / OUTPUT_TOOLTIPS /
DESCRIPTION and the hand-written text in docs/src; here its --check mode must pass, and the files
the frontend reads are checked again on their own, against the node classes, in the layout the
ComfyUI frontend expects (nodeDefs.<NodeId>.inputs.<name>.{name,tooltip},
nodeDefs.<NodeId>.outputs.<index>.{name,tooltip}, main.json nodeCategories). Every failure names
the node, input or file.
"""

from __future__ import annotations

import ast
import copy
import json
import re

import pytest

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from scripts import gen_docs
from tests._golden import REPO

LANGS = ("en", "zh")
CJK = re.compile(r"[\u4e00-\u9fff]")
SECTIONS = ("required", "optional")


def _inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {name: entry for sect in SECTIONS for name, entry in spec.get(sect, {}).items()}


def _load(path):
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: run python -m scripts.gen_docs"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def specs():
    return gen_docs.node_specs()


def test_generator_check_passes(capsys):
    """Docs and locales are what the generator makes of the current nodes and docs/src."""
    rc = gen_docs.main(["--check"])
    err = capsys.readouterr().err
    assert rc == 0, f"python -m scripts.gen_docs --check failed:\n{err}"


def test_web_directory_serves_the_docs():
    """ComfyUI serves WEB_DIRECTORY at /extensions/<pack folder>/; the frontend's help panel asks for
    /extensions/<pack folder>/docs/<NodeId>/<locale>.md, then docs/<NodeId>.md."""
    tree = ast.parse((REPO / "__init__.py").read_text(encoding="utf-8"))
    values = [node.value for node in tree.body if isinstance(node, ast.Assign)
              and any(getattr(t, "id", None) == "WEB_DIRECTORY" for t in node.targets)]
    assert len(values) == 1, "__init__.py must set WEB_DIRECTORY once"
    web_directory = ast.literal_eval(values[0])
    assert isinstance(web_directory, str), f"WEB_DIRECTORY is {web_directory!r}: ComfyUI serves no help pages"
    web = REPO / web_directory
    assert (web / "docs").is_dir(), f"WEB_DIRECTORY {web_directory!r} holds no docs/ folder"
    assert not list(web.rglob("*.js")), "web/ holds a .js file: ComfyUI would load it as a frontend extension"
    for node_id in NODE_CLASS_MAPPINGS:
        assert (web / "docs" / f"{node_id}.md").is_file(), f"web/docs/{node_id}.md is missing"
        assert (web / "docs" / node_id / "zh.md").is_file(), f"web/docs/{node_id}/zh.md is missing"


def test_docs_name_every_input_and_output():
    missing = []
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        for lang, path in (("en", REPO / "web/docs" / f"{node_id}.md"),
                           ("zh", REPO / "web/docs" / node_id / "zh.md")):
            if not path.is_file():
                missing.append(f"{path.relative_to(REPO)} is missing")
                continue
            text = path.read_text(encoding="utf-8")
            for name in [*_inputs(cls), *names]:
                if f"`{name}`" not in text:
                    missing.append(f"{path.relative_to(REPO)} does not name `{name}` of {node_id}")
            if lang == "zh" and len(CJK.findall(text)) < 50:
                missing.append(f"{path.relative_to(REPO)} is hardly Chinese")
    for path in (REPO / "web/docs").rglob("*.md"):
        node_id = path.stem if path.parent.name == "docs" else path.parent.name
        if node_id not in NODE_CLASS_MAPPINGS:
            missing.append(f"{path.relative_to(REPO)}: no node {node_id} (stale)")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("lang", LANGS)
def test_locale_node_defs_match_input_types(lang):
    """locales/<lang>/nodeDefs.json: every node, input and output, with a name and a tooltip; no
    stale key; the Chinese ones in Chinese."""
    defs = _load(REPO / "locales" / lang / "nodeDefs.json")
    problems = [f"nodeDefs.json ({lang}): node {k} does not exist (stale)" for k in defs
                if k not in NODE_CLASS_MAPPINGS]
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        entry = defs.get(node_id)
        if not isinstance(entry, dict):
            problems.append(f"nodeDefs.json ({lang}): node {node_id} is missing")
            continue
        where = f"nodeDefs.json ({lang}) {node_id}"
        if not entry.get("display_name"):
            problems.append(f"{where}: display_name is missing")
        elif lang == "en" and entry["display_name"] != NODE_DISPLAY_NAME_MAPPINGS[node_id]:
            problems.append(f"{where}: display_name {entry['display_name']!r} is not the node's")
        elif lang == "zh" and not CJK.search(entry["display_name"]):
            problems.append(f"{where}: display_name {entry['display_name']!r} is not Chinese")
        if not entry.get("description") or (lang == "zh" and not CJK.search(entry["description"])):
            problems.append(f"{where}: description is missing or not translated")
        inputs = _inputs(cls)
        got = entry.get("inputs", {})
        problems += [f"{where}: input {k!r} does not exist (stale)" for k in got if k not in inputs]
        for name, spec in inputs.items():
            assert re.fullmatch(r"[A-Za-z0-9_]+", name), (
                f"{node_id}.{name}: the frontend's i18n key would differ")
            item = got.get(name)
            if not isinstance(item, dict) or not item.get("name"):
                problems.append(f"{where}: input {name!r} has no name")
                continue
            tip = item.get("tooltip", "")
            if not tip:
                problems.append(f"{where}: input {name!r} has no tooltip")
            elif lang == "en" and tip != spec[1].get("tooltip"):
                problems.append(f"{where}: input {name!r}: tooltip differs from INPUT_TYPES")
            elif lang == "zh" and not CJK.search(tip):
                problems.append(f"{where}: input {name!r}: tooltip is not Chinese")
            if lang == "en" and item["name"] != name:
                problems.append(f"{where}: input {name!r} is shown as {item['name']!r}")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outs = entry.get("outputs", {})
        want = {str(i) for i in range(len(cls.RETURN_TYPES))}
        problems += [f"{where}: output {k!r} does not exist (stale)" for k in outs if k not in want]
        for i, name in enumerate(names):
            item = outs.get(str(i))
            if not isinstance(item, dict) or not item.get("name") or not item.get("tooltip"):
                problems.append(f"{where}: output {i} ({name}) has no name or tooltip")
            elif lang == "en" and (item["name"], item["tooltip"]) != (name, cls.OUTPUT_TOOLTIPS[i]):
                problems.append(f"{where}: output {i} ({name}) differs from RETURN_NAMES/OUTPUT_TOOLTIPS")
            elif lang == "zh" and not (CJK.search(item["name"]) or item["name"] in ("VAE", "Latent")):
                problems.append(f"{where}: output {i} ({name}) name {item['name']!r} is not Chinese")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("lang", LANGS)
def test_locale_main_names_the_category(lang):
    main = _load(REPO / "locales" / lang / "main.json")
    categories = {cls.CATEGORY.split("/")[0] for cls in NODE_CLASS_MAPPINGS.values()}
    for cat in categories:
        name = main.get("nodeCategories", {}).get(cat)
        assert name, f"locales/{lang}/main.json has no nodeCategories.{cat}"
        assert lang == "en" or CJK.search(name), f"locales/{lang}/main.json: {cat} -> {name!r} is not Chinese"


# The check itself must be able to fail: each planted defect is named.
def test_check_names_a_new_input_without_chinese(specs):
    planted = copy.deepcopy(specs)
    planted["SonicVideoCombine"]["inputs"].append(
        {"name": "brand_new", "type": "INT", "optional": True, "tooltip": "A new knob.", "default": 1,
         "min": 0, "max": 2, "step": 1, "choices": None, "picker": False})
    problems = gen_docs.zh_problems(planted, gen_docs.load_zh())
    assert any("SonicVideoCombine.brand_new" in p and "name is missing" in p for p in problems), problems
    assert any("SonicVideoCombine.brand_new" in p and "tooltip is missing" in p for p in problems), problems


def test_check_names_a_changed_english_tooltip_and_a_stale_key(specs):
    planted = copy.deepcopy(specs)
    planted["SonicSampler"]["inputs"][8]["tooltip"] += " Changed."
    table = gen_docs.load_zh()
    table["nodes"]["SonicLoader"]["inputs"]["gone"] = {"name": "旧", "tooltip": "旧", "en": "0"}
    problems = gen_docs.zh_problems(planted, table)
    name = planted["SonicSampler"]["inputs"][8]["name"]
    assert any(f"SonicSampler.{name}" in p and "other English" in p for p in problems), problems
    assert any("SonicLoader has no input 'gone'" in p for p in problems), problems


def test_check_names_a_missing_node(specs):
    planted = copy.deepcopy(specs)
    planted["SonicBrandNew"] = copy.deepcopy(planted["SonicLoader"])
    problems = gen_docs.zh_problems(planted, gen_docs.load_zh())
    assert any("SonicBrandNew has no Chinese display_name" in p for p in problems), problems
    with pytest.raises(ValueError, match="SonicBrandNew"):
        gen_docs.render_doc("SonicBrandNew", planted["SonicBrandNew"], "en", None)
