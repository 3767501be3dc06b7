"""Issue 29 item 7: every path input says what a path that is not a regular file really is.

One rule (sonic_core.paths.describe_path / check_input) for the CLI's image, audio, --models, --svd
and --state-dir, the loaders (checkpoints, whisper and SVD folders, RIFE, the face detector) and the
node file inputs (nodes.runtime.resolve_path). Kinds: missing, folder, character device, FIFO,
socket, symlink loop, dangling symlink, empty file, permission denied. A FIFO is never opened (a
read would wait for a writer forever): every check here runs in a thread that must end in seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from sonic_core import cli, paths, selftest

FINISH_S = 20.0  # a check that has not returned by then is blocked (on a FIFO)
DEVICE = "/dev/zero"  # a character device present on every Linux/macOS host


@pytest.fixture(autouse=True)
def _cli_logging():
    """cli.main adds a stderr handler to the sonic_core logger per call; keep them from leaking."""
    logger = logging.getLogger("sonic_core")
    handlers, level = list(logger.handlers), logger.level
    logger.handlers[:] = []
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def _finishes(fn, *args, **kwargs):
    """``fn(*args)`` in a thread: its result or its exception, and a failure if it blocks."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(FINISH_S)
    assert not t.is_alive(), f"{fn.__name__}{args} blocked (a FIFO was opened?)"
    return out


@pytest.fixture
def odd(tmp_path) -> dict[str, Path]:
    """One path of every kind that is not a usable regular file."""
    if not hasattr(os, "mkfifo") or not os.path.exists(DEVICE):
        pytest.skip(f"needs os.mkfifo and {DEVICE} (POSIX)")
    kinds = {"missing": tmp_path / "missing.wav", "folder": tmp_path / "folder.wav",
             "FIFO": tmp_path / "fifo.wav",
             "symlink loop": tmp_path / "loop.wav", "dangling symlink": tmp_path / "dangling.wav",
             "empty file": tmp_path / "empty.wav", "character device": Path(DEVICE)}
    kinds["folder"].mkdir()
    os.mkfifo(kinds["FIFO"])
    kinds["symlink loop"].symlink_to(kinds["symlink loop"].name)
    kinds["dangling symlink"].symlink_to(tmp_path / "gone.wav")
    kinds["empty file"].write_bytes(b"")
    return kinds


WORDS = {"missing": "does not exist", "folder": "is a folder", "FIFO": "is a FIFO (named pipe)",
         "symlink loop": "is a symlink loop", "dangling symlink": "is a symlink to",
         "empty file": "is empty (0 bytes)", "character device": "is a character device"}
FOLDER_WORDS = {**WORDS, "empty file": "is a file, not a folder"}  # where a folder is wanted


def test_describe_path_names_every_kind(odd, tmp_path):
    for kind, p in odd.items():
        got = _finishes(paths.describe_path, p)["value"]
        assert got[0] == kind and WORDS[kind] in got[1], (kind, got)
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        assert paths.describe_path(sock_path) == ("socket", "is a socket, not a regular file")
    (tmp_path / "file.txt").write_text("x")
    assert paths.describe_path(tmp_path / "file.txt")[0] == "file"
    assert "is a file, not a folder" in paths.describe_path(tmp_path / "file.txt" / "below")[1]
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        paths.check_input(tmp_path / "file.txt", "models folder", paths.FOLDER)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every file")
def test_permission_denied_is_said(tmp_path):
    locked = tmp_path / "locked.wav"
    locked.write_bytes(b"RIFF")
    locked.chmod(0)
    with pytest.raises(PermissionError, match="permission denied"):
        paths.check_input(locked, "audio")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("media")
    return selftest.write_portrait(root / "p.png"), selftest.write_voice(root / "v.wav")


def _cli(capsys, *args) -> tuple[int, str]:
    out = _finishes(cli.main, ["-q", "animate", *map(str, args)])
    assert "error" not in out, out.get("error")
    err = capsys.readouterr().err
    assert "Traceback" not in err and "does not exist or" not in err
    return out["value"], err


@pytest.mark.parametrize("which", ["image", "audio"])
def test_cli_image_and_audio_say_what_the_path_is(which, odd, media, tmp_path, capsys):
    image, voice = media
    for kind, p in odd.items():
        args = (p, voice) if which == "image" else (image, p)
        code, err = _cli(capsys, *args, "-o", tmp_path / "o.mp4", "--models", tmp_path / "none")
        assert code == 2 and f"error: {which} {p} {WORDS[kind]}" in err, (kind, err)
    assert not (tmp_path / "o.mp4").exists()


def test_cli_models_svd_and_state_dir_say_what_the_path_is(odd, media, tmp_path, capsys):
    image, voice = media
    for kind, p in odd.items():
        if kind in ("missing", "folder", "dangling symlink"):
            continue  # a missing models folder lists the downloads; a folder is what these inputs want
        code, err = _cli(capsys, image, voice, "-o", tmp_path / "o.mp4", "--models", p)
        assert code == 2 and f"models folder {p} {FOLDER_WORDS[kind]}" in err, (kind, err)
        code, err = _cli(capsys, image, voice, "-o", tmp_path / "o.mp4", "--models", tmp_path, "--svd", p)
        assert code == 2 and f"--svd {p} {FOLDER_WORDS[kind]}" in err, (kind, err)
        code, err = _cli(capsys, image, voice, "-o", tmp_path / "o.mp4", "--models", tmp_path,
                         "--state-dir", p)
        assert code == 2 and f"--state-dir: {p} {FOLDER_WORDS[kind]}" in err, (kind, err)


def test_a_weight_path_holding_something_else_is_said(odd, media, tmp_path, capsys):
    """Sonic/unet.pth that is a FIFO is neither "missing" (a download would not fix it) nor opened."""
    image, voice = media
    models = tmp_path / "models"
    (models / "Sonic").mkdir(parents=True)
    os.mkfifo(models / "Sonic" / "unet.pth")
    code, err = _cli(capsys, image, voice, "-o", tmp_path / "o.mp4", "--models", models)
    assert code == 2 and f"{models / 'Sonic' / 'unet.pth'} is a FIFO (named pipe)" in err, err


def test_loaders_say_what_the_path_is(odd):
    from sonic_core import weights
    from sonic_core.models import rife, svd
    from sonic_core.models.face_detector import YoloFaceDetector

    files = {"checkpoint": weights.read_state_dict, "RIFE weights": rife.load_rife,
             "face detector": lambda p: YoloFaceDetector.from_file(str(p), "cpu")}
    folders = {"whisper folder": weights.load_whisper,
               "SVD-xt folder": lambda p: svd.load_svd(p, torch.float32, "cpu")}
    for kind, p in odd.items():
        for what, load in files.items():
            if kind == "empty file" and what == "checkpoint":
                continue  # read_state_dict's own message says the file is empty too (tests/test_weights.py)
            err = _finishes(load, p).get("error")
            assert err is not None and f"{what} {p} {WORDS[kind]}" in str(err), (what, kind, err)
        if kind == "folder":
            continue
        for what, load in folders.items():
            err = _finishes(load, p).get("error")
            assert err is not None and f"{what} {p} {FOLDER_WORDS[kind]}" in str(err), (what, kind, err)


def test_node_file_inputs_say_what_the_path_is(odd, tmp_path, monkeypatch):
    from nodes import runtime

    models = tmp_path / "node_models"
    models.mkdir()
    monkeypatch.setenv(runtime.MODELS_ENV, str(models))
    for kind, p in odd.items():
        if kind in ("missing",):
            continue
        name = f"{kind.replace(' ', '_')}.pth"
        (models / name).symlink_to(p)
        if kind in ("folder", "empty file"):  # a folder is a model folder; an empty file: its loader says so
            assert runtime.resolve_path(name) == str(models / name)
            continue
        err = _finishes(runtime.resolve_path, name).get("error")
        said = "is a symlink to" if kind == "dangling symlink" else WORDS[kind]
        assert err is not None and f"{name!r} in {models} {said}" in str(err), (kind, err)
        err = _finishes(runtime.resolve_path, str(p)).get("error")  # an absolute path: the same words
        assert err is not None and said in str(err), (kind, err)
        assert "outside the model folder" not in str(err)


def test_files_inside_model_folders_say_what_they_are(tmp_path):
    """config.json, the weights of a whisper / SVD folder and an architecture JSON that are FIFOs or
    folders are said as such, not "missing" (nor opened)."""
    from sonic_core import weights
    from sonic_core.models import svd

    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo (POSIX)")
    whisper = tmp_path / "whisper-tiny"
    whisper.mkdir()
    os.mkfifo(whisper / "config.json")
    err = _finishes(weights.load_whisper, whisper).get("error")
    assert err is not None and f"whisper config {whisper / 'config.json'} is a FIFO" in str(err), err
    vae = tmp_path / "svd" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").mkdir()
    err = _finishes(svd.load_vae, tmp_path / "svd", torch.float32, "cpu").get("error")
    assert err is not None and f"{vae / 'config.json'} is a folder" in str(err), err
    (tmp_path / "a.pth").write_bytes(b"x")
    os.mkfifo(tmp_path / "a.json")
    err = _finishes(weights.read_architecture, tmp_path / "a.pth").get("error")
    assert err is not None and f"architecture JSON {tmp_path / 'a.json'} is a FIFO" in str(err), err
