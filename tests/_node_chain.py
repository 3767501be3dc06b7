"""The sampler node on the selftest's tiny models (no ../shared): the chain's inputs once per module,
then ``run_node`` runs SonicSampler with its state folder set (tests of resume states and kept results)."""

from __future__ import annotations

import pytest

from sonic_core import selftest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return (selftest.write_tiny_models(d / "models"), selftest.write_portrait(d / "p.png"),
            selftest.write_voice(d / "v.wav"))


@pytest.fixture(scope="module")
def chain(tiny):
    """The tiny models through the nodes up to the sampler's inputs (selftest models, no ../shared)."""
    from nodes.nodes_audio import SonicWhisperAudioEncode
    from nodes.nodes_loader import SonicLoader
    from nodes.nodes_motion import SonicMotionBucketPredict
    from nodes.nodes_svd import SonicSVDLoader
    from sonic_core.pipeline import SVD_FOLDER, WHISPER_FOLDER, read_audio, read_image

    models_dir, image_path, voice = tiny
    mp = pytest.MonkeyPatch()
    mp.setenv("SONIC_MODELS_DIR", str(models_dir))
    try:
        (models,) = SonicLoader().load("Sonic/unet.pth", "Sonic/audio2token.pth", "Sonic/audio2bucket.pth",
                                       WHISPER_FOLDER, "fp32")
        wave, rate = read_audio(voice)
        (audio,) = SonicWhisperAudioEncode().encode(models, {"waveform": wave, "sample_rate": rate}, 0.0)
        image, alpha = read_image(image_path)  # [1,H,W,3], the face from the transparent pixels [1,H,W]
        vae, clip = SonicSVDLoader().load(str(models_dir / SVD_FOLDER), "fp32", 4)
        (motion,) = SonicMotionBucketPredict().predict(models, audio, clip, image, 1.0, 1.0, 64)
    finally:
        mp.undo()
    return dict(sonic_model=models, vae=vae, clip_vision=clip, image=image, face_mask=alpha,
                sonic_audio=audio, sonic_motion=motion)


NODE_SETTINGS = dict(steps=2, min_resolution=64, frames_per_window=4, overlap=1, shift_offset=3)


def run_node(chain, monkeypatch, folder) -> tuple[dict, list[int]]:
    from nodes import runtime
    from nodes.nodes_sampler import SonicSampler

    monkeypatch.setenv(runtime.RESUME_ENV, str(folder))
    steps: list[int] = []
    latent, _fps = SonicSampler().sample(**chain, **NODE_SETTINGS, on_step=lambda i, x: steps.append(i))
    return latent, steps
