"""SonicLoader: file choices, loading real files, model management hook, reuse, errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from nodes import runtime
from nodes.nodes_loader import SonicLoader


@pytest.fixture()
def sonic_dir(model_dir, monkeypatch):
    root, names = model_dir
    monkeypatch.setenv(runtime.MODELS_ENV, str(root))
    return root, names


def test_loader_choices_list_weights_and_whisper_folders(sonic_dir):
    root, names = sonic_dir
    required = SonicLoader.INPUT_TYPES()["required"]
    files = required["unet"][0]
    for name in ("unet", "audio2token", "audio2bucket"):
        assert names[name] in files and required[name][0] == files
    assert not any(f.startswith(names["whisper"] + "/") for f in files), "whisper's own weights are no choice"
    assert required["whisper"][0] == [names["whisper"]]
    assert required["dtype"][0] == ["auto", "fp16", "bf16", "fp32"]
    assert required["dtype"][1]["default"] == "auto"


def test_loader_builds_models_with_golden_weights(golden, sonic_dir):
    _, names = sonic_dir
    (models,) = SonicLoader().load(**names, dtype="fp32")
    for name, module in (("audio2token", models.audio2token), ("audio2bucket", models.audio2bucket)):
        sd = module.state_dict()
        for k, v in golden.weights(name).items():
            assert torch.equal(sd[k], v), f"{name}.{k} differs from the file"
    enc = models.whisper.state_dict()
    for k, v in golden.weights("whisper").items():
        assert torch.equal(enc[k[len("encoder."):]], v), f"whisper {k} differs from the file"
    unet = models.unet.state_dict()
    assert set(unet) == set(golden.weights("unet"))
    assert models.feature_extractor.feature_size == golden.models["whisper"]["num_mel_bins"]


def test_loader_hook_loads_through_model_management(sonic_dir):
    _, names = sonic_dir
    (models,) = SonicLoader().load(**names, dtype="fp32")
    assert models.load_hook is not None
    for name in ("unet", "audio2token", "audio2bucket", "whisper"):
        module = models.load(name)
        assert module is getattr(models, name)
        assert next(module.parameters()).device.type == runtime.load_device().type


def test_loader_dtype_applies_to_unet_only(sonic_dir):
    _, names = sonic_dir
    (models,) = SonicLoader().load(**names, dtype="bf16")
    assert models.dtype == torch.bfloat16
    assert next(models.unet.parameters()).dtype == torch.bfloat16
    for name in ("audio2token", "audio2bucket", "whisper"):
        assert next(getattr(models, name).parameters()).dtype == torch.float32, name


def test_loader_reuses_models_until_a_file_changes(model_dir, tmp_path, monkeypatch):
    src, names = model_dir
    root = tmp_path / "sonic"
    shutil.copytree(src, root)
    monkeypatch.setenv(runtime.MODELS_ENV, str(root))
    (first,) = SonicLoader().load(**names, dtype="fp32")
    (again,) = SonicLoader().load(**names, dtype="fp32")
    assert again is first, "same files and dtype must reuse the loaded models"
    path = root / names["audio2token"]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was replaced
    (reloaded,) = SonicLoader().load(**names, dtype="fp32")
    assert reloaded is not first


def test_loader_errors_name_the_problem(sonic_dir):
    root, names = sonic_dir
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        SonicLoader().load(**{**names, "unet": "nope.pth"}, dtype="fp32")
    with pytest.raises(ValueError, match="not a folder"):
        SonicLoader().load(**{**names, "whisper": names["audio2token"]}, dtype="fp32")
    with pytest.raises(ValueError, match="not a file"):
        SonicLoader().load(**{**names, "unet": names["whisper"]}, dtype="fp32")
    with pytest.raises(ValueError, match="outside the model folder"):
        SonicLoader().load(**{**names, "unet": "../../etc/passwd"}, dtype="fp32")
    with pytest.raises(ValueError, match="fp8"):
        SonicLoader().load(**names, dtype="fp8")
    with pytest.raises(Exception, match="audio2bucket"):  # wrong checkpoint for the slot: strict key check
        SonicLoader().load(**{**names, "audio2token": names["audio2bucket"]}, dtype="fp32")


def test_pickers_list_only_what_fits_each_input(tmp_path, monkeypatch):
    """The README layout plus a full SVD-xt folder: the weight pickers offer Sonic's files only (not
    SVD's vae/image_encoder/unet weights, the detector or RIFE), the whisper picker whisper folders only."""
    import json

    monkeypatch.setenv(runtime.MODELS_ENV, str(tmp_path))
    svd = "stable-video-diffusion-img2vid-xt"
    files = {
        "Sonic/unet.pth": b"", "Sonic/audio2token.pth": b"", "Sonic/audio2bucket.pth": b"",
        "yoloface_v5m.pt": b"", "RIFE/flownet.pkl": b"", "RIFE/flownet.safetensors": b"",
        "whisper-tiny/config.json": json.dumps({"model_type": "whisper"}).encode(),
        "whisper-tiny/model.safetensors": b"", "whisper-tiny/preprocessor_config.json": b"{}",
        "whisper-small-ft/config.json":
            json.dumps({"architectures": ["WhisperForConditionalGeneration"]}).encode(),
        f"{svd}/model_index.json": b"{}",
        f"{svd}/vae/config.json": json.dumps({"_class_name": "AutoencoderKLTemporalDecoder"}).encode(),
        f"{svd}/vae/diffusion_pytorch_model.fp16.safetensors": b"",
        f"{svd}/image_encoder/config.json": json.dumps({"model_type": "clip_vision_model"}).encode(),
        f"{svd}/image_encoder/model.fp16.safetensors": b"",
        f"{svd}/unet/config.json": b"{}", f"{svd}/unet/diffusion_pytorch_model.fp16.safetensors": b"",
        f"{svd}/svd_xt.safetensors": b"",
        "broken/config.json": b"not json",
        "my-unet-v2.safetensors": b"",
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    required = SonicLoader.INPUT_TYPES()["required"]
    expected = ["Sonic/audio2bucket.pth", "Sonic/audio2token.pth", "Sonic/unet.pth", "my-unet-v2.safetensors"]
    for name in ("unet", "audio2token", "audio2bucket"):
        assert required[name][0] == expected, name
    assert required["whisper"][0] == ["whisper-small-ft", "whisper-tiny"]


def test_each_managed_model_is_named_in_comfyui_log(sonic_dir, monkeypatch):
    """ComfyUI logs "Requested to load <class of the managed module>": each model gets a holder class
    of its own name instead of one "_Holder" for all."""
    from nodes import nodes_loader

    made = []
    real = runtime.ManagedModel

    class Recording(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(runtime, "ManagedModel", Recording)
    nodes_loader._cache.clear()
    _, names = sonic_dir
    (models,) = SonicLoader().load(**names, dtype="fp32")
    by_name = {type(m.holder).__name__: m for m in made}
    assert sorted(by_name) == ["SonicAudio2Bucket", "SonicAudio2Token", "SonicUNet", "WhisperEncoder"]
    assert by_name["SonicUNet"].holder.inner is models.unet
    assert isinstance(by_name["SonicUNet"].holder, torch.nn.Module)
    assert type(runtime.holder(torch.nn.Linear(1, 1))).__name__ == "Linear"  # default: the module's class
    assert type(runtime.holder(torch.nn.Identity(), "SonicUNet")) is type(by_name["SonicUNet"].holder)
    with pytest.raises(ValueError, match="identifier"):
        runtime.holder(torch.nn.Identity(), "not a name")
    nodes_loader._cache.clear()
