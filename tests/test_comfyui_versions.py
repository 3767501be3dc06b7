"""What the pack reads of a real ComfyUI tree, against that tree's own code: the cache mode from its
real argument parser (comfy/cli_args.py) for each command line, on every version listed; and the
model patcher class that wraps Sonic's models when the real SonicLoader runs in that tree.

Skipped unless ``COMFYUI_TREES`` (os.pathsep-separated ComfyUI source trees, e.g.
``/opt/comfy/0.3.64:/opt/comfy/0.8.0:/opt/comfy/0.33.0``) or ``COMFYUI_PATH`` names a tree. Each
tree's parser runs in a subprocess with only that tree on sys.path and the command line given (no
server starts); the parsed arguments come back as JSON and ``runtime.cache_mode_of`` reads them.
What each version builds from its arguments was read off its main.py (``prompt_worker``).

The patcher test imports the tree's comfy package with ``COMFYUI_PYTHON`` (an interpreter with
ComfyUI's requirements and ours; default this one) and ``COMFYUI_STUBS`` in front of its
LD_LIBRARY_PATH (tests/REAL_COMFYUI.md), and skips where that interpreter cannot import it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nodes import runtime

TREES_ENV = "COMFYUI_TREES"
PARSE_TIMEOUT_S = 60.0
CACHE_ARGS = ("cache_classic", "cache_lru", "cache_none", "cache_ram", "high_ram")
# The cache each version's main.py builds for a command line; None: that version's parser rejects it.
EXPECTED = {
    "0.3.64": {(): "classic", ("--cache-classic",): "classic", ("--cache-lru", "5"): "lru",
               ("--cache-none",): "none", ("--cache-ram",): None},
    "0.8.0": {(): "classic", ("--cache-classic",): "classic", ("--cache-lru", "5"): "lru",
              ("--cache-none",): "none", ("--cache-ram",): "ram", ("--cache-ram", "2"): "ram"},
    "0.33.0": {(): "ram", ("--cache-classic",): "classic", ("--high-ram",): "classic",
               ("--cache-lru", "5"): "lru", ("--cache-none",): "none", ("--cache-ram",): "ram",
               ("--cache-ram", "2"): "ram", ("--cache-ram", "2", "16"): "ram",
               ("--cache-lru", "5", "--cache-none"): None},
}
_PARSE = """
import json, sys
wanted = json.loads(sys.argv[2])
sys.argv = ["main.py", *json.loads(sys.argv[1])]
import comfy.options
comfy.options.enable_args_parsing()
from comfy.cli_args import args
print(json.dumps({k: getattr(args, k) for k in wanted if hasattr(args, k)}))
"""


def _trees() -> list[Path]:
    named = [p for p in os.environ.get(TREES_ENV, "").split(os.pathsep) if p]
    if os.environ.get("COMFYUI_PATH"):
        named.append(os.environ["COMFYUI_PATH"])
    trees = []
    for p in dict.fromkeys(named):
        if not (Path(p) / "comfy" / "cli_args.py").is_file():
            pytest.fail(f"{p!r} (from {TREES_ENV} or COMFYUI_PATH) has no comfy/cli_args.py: name ComfyUI source trees")
        trees.append(Path(p))
    return trees


def _version(tree: Path) -> str:
    text = (tree / "comfyui_version.py").read_text(encoding="utf-8")
    return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)


def _tree_param(tree: Path):
    return pytest.param(tree, id=_version(tree))


CASES = [(tree, argv) for tree in _trees() for argv in EXPECTED.get(_version(tree), {})]
if not CASES:
    pytest.skip(f"no ComfyUI tree of a known version ({', '.join(EXPECTED)}) in {TREES_ENV} or COMFYUI_PATH",
                allow_module_level=True)


def parse(tree: Path, argv: tuple[str, ...]) -> dict | None:
    """``comfy.cli_args.args`` of ``tree`` for the command line ``argv`` (its cache settings), or
    None when its parser rejects the command line."""
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tree)!r})\n{_PARSE}",
                           json.dumps(argv), json.dumps(CACHE_ARGS)],
                          cwd=tree, capture_output=True, text=True, timeout=PARSE_TIMEOUT_S)
    if done.returncode == 2 and "error:" in done.stderr:  # argparse's exit on a bad command line
        return None
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tree,argv", CASES, ids=[f"{_version(t)}:{' '.join(a) or 'default'}" for t, a in CASES])
def test_cache_mode_from_the_real_parser(tree, argv):
    expected = EXPECTED[_version(tree)][argv]
    args = parse(tree, argv)
    if expected is None:
        assert args is None, f"{_version(tree)} accepted {argv}: {args}"
        return
    assert args is not None, f"{_version(tree)} rejected {argv}"
    assert runtime.cache_mode_of(type("Args", (), args)) == expected, args
    if _version(tree) == "0.33.0" and not argv:
        assert args["cache_ram"] == [], "0.33.0's default --cache-ram is an empty list"


PROBE = Path(__file__).with_name("_comfy_patcher_probe.py")
PROBE_TIMEOUT_S = 300.0  # imports the tree's comfy package (transformers included) on a busy CPU


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from sonic_core.selftest import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("sonic_models"))


@pytest.mark.slow
@pytest.mark.parametrize("tree", [_tree_param(t) for t in _trees()])
def test_models_wrapped_by_the_patcher_comfyui_uses(tree, tiny_models):
    """Sonic's models go through ``comfy.model_patcher.CoreModelPatcher`` where the tree has it
    (0.33.0), read when a model is wrapped (0.33's main.py rebinds it to ModelPatcherDynamic after
    the packs are imported), else ModelPatcher; loading runs ComfyUI's load_models_gpu, which lists
    the UNet under its own name, and hands back the very module SonicModels holds. On this CPU the
    dynamic class hands a CPU load device back to ModelPatcher (as it does for core models under
    --cpu); what it does on a GPU is bench/device_run.sh --dynamic-vram's check."""
    env = dict(os.environ)
    if os.environ.get("COMFYUI_STUBS"):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (os.environ["COMFYUI_STUBS"],
                                                            env.get("LD_LIBRARY_PATH")) if p)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    done = subprocess.run([python, str(PROBE), str(tree), str(Path(__file__).resolve().parent.parent),
                           str(tiny_models)], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S)
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        pytest.skip(f"{python} cannot import ComfyUI {_version(tree)}: {done.stderr.strip().splitlines()[-1]} "
                    "(set COMFYUI_PYTHON and COMFYUI_STUBS)")
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    core = seen["comfyui_core_patcher"]
    assert seen["runtime_patcher"] == (core or "ModelPatcher")
    assert (core is not None) == (_version(tree) == "0.33.0")
    first = seen["default"]
    assert first == {"patcher": "ModelPatcher", "is_dynamic": False, "same_module": True, "device": "cpu",
                     "requested": ["SonicUNet"], "loaded_holders": ["SonicUNet"]}, first
    if core is None:
        assert "dynamic" not in seen
        return
    dynamic = seen["dynamic"]
    assert dynamic["runtime_patcher"] == "DynamicProbe"
    assert dynamic["asked"] == ["SonicAudio2Bucket", "SonicAudio2Token", "SonicUNet", "WhisperEncoder"]
    assert {k: dynamic[k] for k in first} == first  # CPU: ModelPatcherDynamic hands back ModelPatcher
