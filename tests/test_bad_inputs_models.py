"""Issue 29 item 9: a model input given another model's file or folder names both models.

Every loader (UNet, audio2token, audio2bucket, whisper folder, SVD folder, RIFE, face detector) is
given every other model of the pack, as real files written by sonic_core.selftest (tiny random
weights in the official formats and layouts) and a tiny TorchScript YOLO export: the error must say
which model the path looks like and which one the input loads (sonic_core.identify). The CLI's
``--svd`` at the whisper-tiny folder (the reported case) and the node loaders say it too.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from sonic_core import identify, selftest, weights
from sonic_core.models import rife, svd
from sonic_core.models.face_detector import YoloFaceDetector
from sonic_core.pipeline import SVD_FOLDER, WHISPER_FOLDER


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """{model name (identify.*): its file or folder}."""
    from tests import _yoloface

    root = selftest.write_tiny_models(tmp_path_factory.mktemp("tiny_models"))
    yolo = _yoloface.export(_yoloface.build(), root / "yoloface_v5m.pt")
    s = root / SVD_FOLDER
    return {identify.UNET: root / "Sonic" / "unet.pth", identify.AUDIO2TOKEN: root / "Sonic" / "audio2token.pth",
            identify.AUDIO2BUCKET: root / "Sonic" / "audio2bucket.pth", identify.WHISPER: root / WHISPER_FOLDER,
            identify.SVD: s, identify.SVD_VAE: s / "vae", identify.CLIP: s / "image_encoder",
            identify.RIFE: root / "RIFE" / "flownet.pkl", identify.DETECTOR: yolo}


def _says(given: str, expected: str) -> str:
    """The regex of the words every such error carries."""
    return re.escape(f"looks like {given}, not {expected}, which this input loads")


LOADERS = {identify.UNET: lambda p: weights.load_unet(p, torch.float32),
           identify.AUDIO2TOKEN: weights.load_audio2token, identify.AUDIO2BUCKET: weights.load_audio2bucket,
           identify.WHISPER: weights.load_whisper, identify.SVD: lambda p: svd.load_svd(p, torch.float32, "cpu"),
           identify.RIFE: rife.load_rife, identify.DETECTOR: lambda p: YoloFaceDetector.from_file(str(p), "cpu")}


def test_every_model_is_identified(models, tmp_path):
    for name, path in models.items():
        assert identify.identify(path) == name, path
    # a bare weights file too (whisper's model.safetensors, CLIP's), and the models folder itself
    assert identify.identify(models[identify.WHISPER] / "model.safetensors") == identify.WHISPER
    assert identify.identify(models[identify.CLIP] / "model.safetensors") == identify.CLIP
    assert identify.identify(models[identify.UNET].parents[1]) == identify.MODELS_FOLDER
    (tmp_path / "noise.pth").write_bytes(b"not a checkpoint")
    assert identify.identify(tmp_path / "noise.pth") is None and identify.identify(tmp_path / "gone") is None


@pytest.mark.parametrize("expected", list(LOADERS))
def test_every_loader_names_the_model_it_was_given(models, expected, caplog):
    caplog.set_level(logging.ERROR)  # diffusers' "config attributes ... ignored" noise
    for given, path in models.items():
        if given == expected:
            continue
        with pytest.raises((ValueError, OSError)) as e:
            LOADERS[expected](path)
        msg = str(e.value)
        assert f"{path} looks like {given}, not {expected}, which this input loads" in msg, (expected, given, msg)
        assert "download it again" not in msg.split("(the load failed:")[0]


def test_the_right_model_still_loads(models):
    for name, load in LOADERS.items():
        assert load(models[name]) is not None, name


def test_cli_svd_at_the_whisper_folder(models, tmp_path, capsys):
    """The reported case: `--svd whisper-tiny` said "...unexpected keyword argument 'dtype'; download it again"."""
    from sonic_core import cli

    root = models[identify.UNET].parents[1]
    portrait = selftest.write_portrait(tmp_path / "p.png")
    voice = selftest.write_voice(tmp_path / "v.wav")
    logger = logging.getLogger("sonic_core")
    handlers = list(logger.handlers)
    try:
        code = cli.main(["-q", "animate", str(portrait), str(voice), "-o", str(tmp_path / "o.mp4"), "--models",
                         str(root), "--svd", str(root / WHISPER_FOLDER), "--steps", "1", "--no-interpolate",
                         "--min-resolution", "64"])
    finally:
        logger.handlers[:] = handlers
    err = capsys.readouterr().err
    assert code == 2 and f"{root / WHISPER_FOLDER} looks like {identify.WHISPER}, not {identify.SVD}" in err, err
    code_file = cli.main(["-q", "animate", str(portrait), str(voice), "-o", str(tmp_path / "o.mp4"), "--models",
                          str(root), "--svd", str(models[identify.UNET])])
    logger.handlers[:] = handlers
    err = capsys.readouterr().err
    assert code_file == 2 and f"looks like {identify.UNET}, not {identify.SVD}" in err, err


def test_a_weight_path_holding_another_model_is_named(models, tmp_path):
    """models/sonic/Sonic/unet.pth that is really the whisper folder: said before any model loads."""
    from sonic_core.pipeline import missing_weights

    root = tmp_path / "models"
    (root / "Sonic").mkdir(parents=True)
    shutil.copytree(models[identify.WHISPER], root / "Sonic" / "unet.pth")
    with pytest.raises(OSError, match=_says(identify.WHISPER, identify.UNET)):
        missing_weights(root)


def test_node_loaders_name_the_model(models, monkeypatch, caplog):
    from nodes import runtime
    from nodes.nodes_loader import load_models
    from nodes.nodes_svd import SonicSVDLoader

    caplog.set_level(logging.ERROR)
    root = models[identify.UNET].parents[1]
    monkeypatch.setenv(runtime.MODELS_ENV, str(root))
    with pytest.raises(ValueError, match=_says(identify.AUDIO2BUCKET, identify.AUDIO2TOKEN)):
        load_models("Sonic/unet.pth", "Sonic/audio2bucket.pth", "Sonic/audio2bucket.pth", WHISPER_FOLDER, "fp32")
    with pytest.raises(OSError, match=_says(identify.SVD, identify.WHISPER)):
        load_models("Sonic/unet.pth", "Sonic/audio2token.pth", "Sonic/audio2bucket.pth", SVD_FOLDER, "fp32")
    with pytest.raises(ValueError, match=_says(identify.WHISPER, identify.SVD)):
        SonicSVDLoader().load(WHISPER_FOLDER)
    with pytest.raises(ValueError, match="is not a folder; .* " + _says(identify.UNET, identify.SVD)):
        SonicSVDLoader().load("Sonic/unet.pth")
