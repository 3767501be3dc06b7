"""The standalone CLI: selftest end to end, the missing-weights message, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sonic_core import pipeline, selftest
from tests._golden import REPO


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sonic_core", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_selftest_makes_a_playable_mp4_with_audio(tmp_path):
    out = tmp_path / "selftest.mp4"
    run = _cli("selftest", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "selftest ok" in run.stdout
    info = selftest.probe(out)
    assert info["frames"] == 2 * int(selftest.SELFTEST_SECONDS * 12.5) - 1
    assert info["fps"] == 25
    assert (info["width"], info["height"]) == (128, 128)
    assert abs(info["audio_seconds"] - info["frames"] / 25) < 1 / 25 + 1e-6


def test_missing_weights_message_lists_every_file(tmp_path):
    image = selftest.write_portrait(tmp_path / "p.png")
    voice = selftest.write_voice(tmp_path / "v.wav")
    run = _cli("animate", str(image), str(voice), "-o", str(tmp_path / "o.mp4"), "--models",
               str(tmp_path / "empty"))
    assert run.returncode == 3
    for w in pipeline.WEIGHTS:
        if w.path == "yoloface_v5m.pt":
            continue  # the portrait's transparent face replaces the detector
        assert w.path in run.stderr and w.source in run.stderr, f"{w.path} not named:\n{run.stderr}"
    assert "hf download LeonJoe13/Sonic" in run.stderr and "huggingface-cli" not in run.stderr
    assert "hf auth login" in run.stderr  # the SVD-xt repository is gated
    assert not (tmp_path / "o.mp4").exists()


def test_readme_weight_commands_are_the_ones_the_cli_gives():
    """README's download commands (run from ComfyUI/models) are the CLI's, with hf (huggingface_hub
    2.x has no huggingface-cli), name only files the pack reads, and say the SVD-xt repo is gated."""
    from nodes.nodes_svd import SonicSVDLoader

    readme = (REPO / "README.md").read_text()
    for d in pipeline.DOWNLOADS:
        assert d.command("sonic") in readme, f"README lacks: {d.command('sonic')}"
    assert "huggingface-cli download" not in readme and "hf auth login" in readme
    tooltip = SonicSVDLoader.INPUT_TYPES()["required"]["svd_folder"][1]["tooltip"]
    assert "hf download stabilityai/stable-video-diffusion-img2vid-xt" in tooltip and "hf auth login" in tooltip
    svd = next(d for d in pipeline.DOWNLOADS if d.repo == pipeline.SVD_REPO)
    assert svd.gated and not any(f.startswith("unet/") or f.endswith(".ckpt") or f.startswith("svd_xt")
                                 for f in svd.files)


def test_download_fetches_only_the_missing_files(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "Sonic").mkdir()
    (tmp_path / "Sonic" / "unet.pth").write_bytes(b"")
    (tmp_path / pipeline.WHISPER_FOLDER).mkdir()
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, local_dir: calls.append((repo, name, local_dir)))
    pipeline.download_weights(tmp_path)
    fetched = {(repo, name) for repo, name, _dir in calls}
    assert (pipeline.SONIC_REPO, "Sonic/unet.pth") not in fetched  # already there
    assert (pipeline.SONIC_REPO, "Sonic/audio2token.pth") in fetched
    assert not any(repo == pipeline.WHISPER_REPO for repo, _name in fetched)  # folder present
    svd = {name for repo, name in fetched if repo == pipeline.SVD_REPO}
    assert svd == set(next(d for d in pipeline.DOWNLOADS if d.repo == pipeline.SVD_REPO).files)
    assert all(d == str(tmp_path / pipeline.SVD_FOLDER) for repo, _n, d in calls if repo == pipeline.SVD_REPO)


def test_download_of_the_gated_repo_says_how_to_get_access(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    refused = GatedRepoError.__new__(GatedRepoError)  # its __init__ wants an HTTP response
    Exception.__init__(refused, "403 Client Error: access to this repo is restricted")

    def refuse(repo, name, local_dir):
        if repo == pipeline.SVD_REPO:
            raise refused

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(pipeline.MissingWeights, match="accept its licence") as err:
        pipeline.download_weights(tmp_path)
    assert "hf auth login" in str(err.value) and pipeline.SVD_REPO in str(err.value)


def test_missing_detector_is_listed_for_an_opaque_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (96, 96), (200, 150, 120)).save(tmp_path / "p.png")
    assert "yoloface_v5m.pt" in [w.path for w in pipeline.missing_weights(tmp_path, need_detector=True)]
    assert "yoloface_v5m.pt" not in [w.path for w in pipeline.missing_weights(tmp_path, need_detector=False)]


@pytest.mark.parametrize("args, message", [
    (("animate", "nope.png", "nope.wav", "-o", "x.mp4"), "does not exist"),
])
def test_bad_input_is_one_clear_line(args, message):
    run = _cli(*args)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_output_is_never_overwritten(tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"keep")
    image = selftest.write_portrait(tmp_path / "p.png")
    voice = selftest.write_voice(tmp_path / "v.wav")
    run = _cli("animate", str(image), str(voice), "-o", str(out))
    assert run.returncode == 2 and "exists" in run.stderr
    assert out.read_bytes() == b"keep"


def test_read_audio_decodes_stereo_and_rate(tmp_path):
    voice = selftest.write_voice(tmp_path / "v.wav")
    wave, rate = pipeline.read_audio(voice)
    assert rate == selftest.SELFTEST_SAMPLE_RATE
    assert wave.shape == (1, 1, int(selftest.SELFTEST_SECONDS * rate))
    assert 0.05 < wave.abs().max() <= 1.0


def test_read_image_alpha_becomes_face_mask(tmp_path):
    image, mask = pipeline.read_image(selftest.write_portrait(tmp_path / "p.png"))
    w, h = selftest.SELFTEST_IMAGE
    assert image.shape == (1, h, w, 3) and mask.shape == (1, h, w)
    assert mask[0, h // 2, w // 2] == 1 and mask[0, 2, 2] == 0


def test_cli_runs_from_another_folder_with_pythonpath_as_readme_says(tmp_path):
    import os

    readme = (REPO / "README.md").read_text()
    assert "PYTHONPATH=/path/to/ComfyUI-Sonic python -m sonic_core" in readme
    assert "--preview-method auto" in readme  # ComfyUI draws latent previews only with a method set
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bare = subprocess.run([sys.executable, "-m", "sonic_core", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "No module named sonic_core" in bare.stderr
    run = subprocess.run([sys.executable, "-m", "sonic_core", "--help"], cwd=tmp_path,
                         env=dict(env, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "animate" in run.stdout, run.stderr
