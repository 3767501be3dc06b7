"""bench/device_run.sh --dry-run: the one-shot GPU benchmark's own code at tiny sizes on the CPU (issue 15).

The official side runs only when ``bash bench/device_run.sh --prepare`` has put the official code
and its wheels in bench/.device/ (gitignored); without them the script runs our side alone and the
test checks that part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "device_run.sh"
OFFICIAL = REPO / "bench" / ".device" / "official_sonic" / "src" / "pipelines" / "pipeline_sonic.py"
DRY_RUN_TIMEOUT_S = 600


def test_device_run_dry_run(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed: bench/device_run.sh cannot run")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=DRY_RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = proc.stdout
    assert "DRY RUN" in out
    for mode in ("fp32 rows3 wb1", "fp32 rows1 wb1", "fp32 rows3 all-windows", "fp32 rows3 wb1 fp8-weights",
                 "fp32 rows3 wb1 compiled"):
        row = next((line for line in out.splitlines() if line.startswith(f"| ours | {mode} |")), None)
        assert row is not None, f"no row for {mode}:\n{out}"
        assert "True" in row, f"{mode} did not run: {row}"
    assert "skipped: memory cap needs CUDA" in out  # the 7.5 GB runs need a GPU
    saved = json.loads((tmp_path / "out" / "device_run.json").read_text())
    assert (tmp_path / "out" / "device_run.md").read_text().strip() == out.strip()
    ours = {r["mode"]: r for r in saved["ours"]["rows"]}
    assert ours["fp32 rows1 wb1"]["guidance_rows"] == 1 and ours["fp32 rows3 all-windows"]["window_batch"] == 2
    if not OFFICIAL.is_file():
        assert "official side skipped" in proc.stderr
        return
    assert re.search(r"^\| official \| fp32 rows3 wb1 \|", out, re.M), out
    diffs = dict(re.findall(r"^- ours (.+?) vs official fp32 latents after \d+ step\(s\): max ([0-9.e+-]+)", out, re.M))
    # same weights, inputs and conditioning: ours equals the official pipeline to float32 rounding
    # (x ~ noise x sigma_max cancels in the last Euler step, so one ulp of |x| ~ 2000 survives)
    for mode in ("fp32 rows3 wb1", "fp32 rows1 wb1", "fp32 rows3 all-windows", "fp32 rows3 wb1 compiled"):
        assert float(diffs[mode]) < 1e-2, (mode, diffs)
    assert float(diffs["fp32 rows3 wb1 fp8-weights"]) > float(diffs["fp32 rows3 wb1"])  # fp8 really rounds


COMFYUI_033_TREE = next((Path(p) for p in os.environ.get("COMFYUI_TREES", "").split(os.pathsep)
                         if p and (Path(p) / "comfy" / "model_patcher.py").is_file()
                         and "ModelPatcherDynamic" in (Path(p) / "comfy" / "model_patcher.py").read_text()), None)


@pytest.mark.slow
@pytest.mark.skipif(COMFYUI_033_TREE is None or not os.environ.get("COMFYUI_PYTHON"),
                    reason="needs a ComfyUI 0.33 tree in COMFYUI_TREES and COMFYUI_PYTHON (tests/REAL_COMFYUI.md)")
def test_dynamic_vram_check_dry_run(tmp_path):
    """bench/device_run.sh --dynamic-vram --dry-run: issue 31's GPU check runs end to end on the CPU
    (ComfyUI 0.33 under --cpu: no dynamic VRAM, so both rows are ModelPatcher and nothing is unloaded)."""
    env = dict(os.environ, PYTHON=os.environ["COMFYUI_PYTHON"], OUT=str(tmp_path / "out"),
               COMFYUI_033=str(COMFYUI_033_TREE))
    if os.environ.get("COMFYUI_STUBS"):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (os.environ["COMFYUI_STUBS"],
                                                            os.environ.get("LD_LIBRARY_PATH")) if p)
    proc = subprocess.run(["bash", str(SCRIPT), "--dynamic-vram", "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "skipped" not in proc.stderr, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / "dynamic_vram.json").read_text())
    assert saved["enabled"] is False
    assert [(r["mode"], r["sonic_patcher"], r["other_kept"]) for r in saved["rows"]] == [
        ("dynamic", "ModelPatcher", True), ("legacy", "ModelPatcher", True)]
    assert "| ModelPatcher | dynamic |" in proc.stdout
