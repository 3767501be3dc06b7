"""Write a golden case's tiny models to real files, laid out like ComfyUI's models/sonic folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests._golden import Golden

NAMES = {"unet": "unet.safetensors", "audio2token": "audio2token.pth", "audio2bucket": "audio2bucket.pth",
         "whisper": "whisper-tiny"}


def write_golden_models(g: Golden, root: Path) -> dict[str, str]:
    """unet as .safetensors, the audio heads as .pth, each with its architecture .json beside it;
    whisper in Hugging Face layout (save_pretrained of a WhisperModel holding the golden encoder).
    Returns the loader inputs (paths relative to ``root``)."""
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in g.weights("unet").items()}, str(root / NAMES["unet"]))
    (root / "unet.json").write_text(json.dumps(g.models["unet"]))
    for name in ("audio2token", "audio2bucket"):
        torch.save(g.weights(name), root / NAMES[name])
        (root / f"{name}.json").write_text(json.dumps(g.models[name]))

    config = WhisperConfig(**g.models["whisper"])
    model = WhisperModel(config)
    model.load_state_dict(g.weights("whisper"), strict=False)  # encoder from the golden, decoder random
    assert torch.equal(model.encoder.conv1.weight, g.weights("whisper")["encoder.conv1.weight"])
    folder = root / NAMES["whisper"]
    model.save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(str(folder))
    return dict(NAMES)


def write_golden_svd_folder(g: Golden, root: Path,
                            vae_file: str = "diffusion_pytorch_model.safetensors") -> Path:
    """The golden VAE and image encoder in diffusers SVD layout: root/vae/, root/image_encoder/."""
    from sonic_core.weights import save_safetensors

    for sub, weights in (("vae", vae_file), ("image_encoder", "model.safetensors")):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(g.models[sub]))
        save_safetensors(g.weights(sub), root / sub / weights)
    return root
