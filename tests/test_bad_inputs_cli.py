"""``python -m sonic_core animate`` with careless arguments (issue 13): one line on stderr, exit 2,
no traceback, and the check happens before any model loads (the models folder here is empty:
a check made after loading would end in the missing-weights message, exit 3, instead)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sonic_core import budget, cli, selftest
from tests._golden import REPO


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    return selftest.write_portrait(d / "p.png"), selftest.write_voice(d / "v.wav")


def _animate(inputs, out: Path, *extra: str, models: Path | None = None) -> list[str]:
    image, voice = inputs
    return ["-q", "animate", str(image), str(voice), "-o", str(out),
            "--models", str(models or out.parent / "no_models"), *extra]


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    t0 = time.perf_counter()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert time.perf_counter() - t0 < 30, "the check came late"
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("args, pattern", [
    (["--steps", "0"], r"--steps 0 is out of range: must be a whole number from 1 to 1000"),
    (["--window-batch", "-1"], r"--window-batch -1 is out of range: must be a whole number from 0 to 64"),
    (["--max-seconds", "-1"], r"--max-seconds -1\.0 is out of range: must be a finite number from 0 to 36000 "
                              r"\(0 = the whole audio\)"),
    (["--max-seconds", "inf"], r"--max-seconds inf must be a finite number"),
    (["--dynamic-scale", "nan"], r"--dynamic-scale nan must be a finite number from 0 to 10"),
    (["--min-resolution", "8"], r"--min-resolution 8 is out of range: must be a whole number from 64 to 4096"),
    (["--device", "bogus"], r"--device 'bogus' is not a device; use auto, cpu, cuda"),
    (["--device", "cuda:x"], r"--device 'cuda:x' is not a device"),
])
def test_bad_numbers_and_devices_exit_2_before_loading(inputs, tmp_path, capsys, args, pattern):
    import re

    out = tmp_path / "o.mp4"
    code, err = _run(capsys, _animate(inputs, out, *args))
    assert code == 2 and re.search(pattern, err), err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert os.listdir(tmp_path) == []  # no output, no resume folder, no temp file


@pytest.mark.skipif(torch.cuda.is_available(), reason="this build has a GPU")
def test_device_cuda_on_a_cpu_build(inputs, tmp_path, capsys):
    code, err = _run(capsys, _animate(inputs, tmp_path / "o.mp4", "--device", "cuda"))
    assert code == 2 and "--device cuda:" in err and "--device cpu" in err, err


def test_device_errors_from_a_real_process(inputs, tmp_path):
    """The same through ``python -m sonic_core``: one line, exit 2."""
    argv = _animate(inputs, tmp_path / "o.mp4", "--device", "bogus")
    run = subprocess.run([sys.executable, "-m", "sonic_core", *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --device 'bogus' is not a device; use auto, cpu, cuda, cuda:1 or mps"]


def test_dangling_output_symlink_is_refused_first(inputs, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    out.symlink_to(tmp_path / "missing" / "target.mp4")
    code, err = _run(capsys, _animate(inputs, out))
    assert code == 2 and "is a symlink to" in err and "does not exist" in err, err
    assert out.is_symlink() and os.listdir(tmp_path) == ["o.mp4"]


def test_unwritable_output_folder_is_refused_first(inputs, tmp_path, capsys):
    if os.geteuid() == 0:
        out = Path("/sys/sonic_test_output.mp4")  # root ignores mode bits; /sys refuses new files
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "o.mp4"
    code, err = _run(capsys, _animate(inputs, out, models=tmp_path / "none"))
    assert code == 2 and f"cannot write the output {out}" in err and "writable folder" in err, err
    assert not out.exists()


def test_output_under_a_file_is_refused(inputs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _run(capsys, _animate(inputs, tmp_path / "file" / "o.mp4"))
    assert code == 2 and "is a file, not a folder" in err, err


def test_decompression_bomb_png(inputs, tmp_path, capsys):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)  # over Pillow's limit (below it only warns)
    Image.new("1", (side, side)).save(bomb)
    assert bomb.stat().st_size < 2**20  # a small file that would decode to >100 MP
    code, err = _run(capsys, _animate((bomb, inputs[1]), tmp_path / "o.mp4"))
    assert code == 2 and "bomb.png refused" in err and "decompression bomb" in err and "Resize it" in err, err
    assert sorted(os.listdir(tmp_path)) == ["bomb.png"]


def test_wide_image_working_size_is_refused_before_loading(tmp_path, inputs, capsys):
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.new("RGB", (4000, 100), (120, 90, 80)).save(wide)
    code, err = _run(capsys, _animate((wide, inputs[1]), tmp_path / "o.mp4"))
    assert code == 2, err
    assert "the 4000x100 image gives a 20480x512 px working size" in err and "crop the image" in err
    assert "lower min_resolution to" in err


def test_length_guard_refuses_what_cannot_fit_with_numbers(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.setattr(budget, "host_available_bytes", lambda: 3 * 2**20)  # 3 MiB free
    code, err = _run(capsys, _animate(inputs, tmp_path / "o.mp4"))
    assert code == 2, err
    assert "this run cannot fit" in err and "3.0 MiB is free" in err and "host memory" in err
    assert "audio tokens" in err and ("set max_seconds to" in err or "free memory first" in err)
    assert os.listdir(tmp_path) == []
