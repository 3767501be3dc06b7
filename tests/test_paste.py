"""Paste-back (issue 23): the animated crop blended into the whole photo at its own resolution.

sonic_core.image.PasteBack, the Sonic Paste Back node, Latent To Video's photo / face_box inputs
(streaming), the segment path, and ``python -m sonic_core animate --crop --paste-back``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from nodes import nodes_long, nodes_paste, nodes_video
from sonic_core import config, face, image, stream
from tests._golden import assert_same_math
from tests.test_long_nodes import CHUNK, SEGMENT, _audio, _one_pass, env, models  # noqa: F401 (fixtures)

# Lanczos up to the working size, then antialiased bicubic back to the crop: on the smooth photo
# below, 160 -> 512 -> 160 px differs by 0.73/255 at most (0.10/255 on average); a crop pasted one
# pixel off would differ by ~5/255 (the photo's waves change up to 0.022 a pixel)
ROUND_TRIP_TOL = 1.5 / 255
RESAMPLE_EPS = 1e-6  # a constant frame resized: its filter weights sum to 1 within float32 rounding (6e-8 seen)


def smooth_photo(h: int, w: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """A photo-like IMAGE ``[1, h, w, channels]`` of low-frequency colour waves, u8 / 255 (as loaded)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")  # [h, w] each
    planes = []
    for _ in range(channels):
        fx, fy, phase = (torch.rand(3, generator=g) * torch.tensor([3.0, 3.0, 6.28])).tolist()
        planes.append(0.5 + 0.35 * torch.sin(2 * math.pi * (fx * xx + fy * yy) + phase))
    img = torch.stack(planes, dim=-1)  # [h, w, channels]
    return (img * 255).round()[None] / 255


def face_at(photo: torch.Tensor, x0: int, y0: int, x1: int, y1: int, crop: bool = True):
    """Face Mask Detect on ``photo`` with a drawn mask marking the face ``[x0, x1) x [y0, y1)``."""
    m = torch.zeros(photo.shape[:3])
    m[0, y0:y1, x0:x1] = 1
    return face.detect_face_mask(photo, mask=m, crop=crop)


def working_frames(found, n: int = 1, min_resolution: int = 512) -> torch.Tensor:
    """The crop itself at the sampler's working size (Lanczos, as the sampler prepares it): ``[n, h, w, 3]``."""
    ch, cw = found.image.shape[:2]
    u8 = image.resize_lanczos(image.to_u8(found.image).numpy(), image.working_size(cw, ch, min_resolution))
    return (torch.from_numpy(u8).float() / 255)[None].expand(n, -1, -1, -1)


def outside(t: torch.Tensor, rect) -> torch.Tensor:
    """The pixels of ``[..., H, W, 3]`` outside ``rect = (x1, y1, x2, y2)``, flattened."""
    x1, y1, x2, y2 = rect
    keep = torch.ones(t.shape[-3:-1], dtype=torch.bool)
    keep[y1:y2, x1:x2] = False
    return t[..., keep, :]


# ----------------------------------------------------------------------------------------------
# the blend
# ----------------------------------------------------------------------------------------------
def test_unmodified_crop_gives_the_photo_back():
    photo = smooth_photo(457, 301)  # odd sizes
    found = face_at(photo, 100, 150, 180, 230)
    rect = found.box.crop_xyxy
    assert found.box.source_size == (301, 457)
    frames = working_frames(found, 3)  # [3, 512, 512, 3]
    assert frames.shape[1:3] == (512, 512)
    out = image.PasteBack(photo, found.box)(frames)
    assert out.shape == (3, 457, 301, 3)
    want = photo[0].expand(3, -1, -1, -1)
    assert torch.equal(outside(out, rect), outside(want, rect)), "outside the crop: the photo itself"
    x1, y1, x2, y2 = rect
    err = (out[:, y1:y2, x1:x2] - want[:, y1:y2, x1:x2]).abs()
    assert 0 < err.max() <= ROUND_TRIP_TOL, f"inside: resize rounding only, got {err.max() * 255:.2f}/255"
    # frames at the crop's own size are not resized: the photo back, every pixel
    exact = image.PasteBack(photo, found.box)(found.image[None])
    assert torch.equal(exact[0], photo[0])


def test_animated_crop_lands_on_its_rectangle_only():
    # geometry: constant frames, nothing like the photo, so without colour match (tests/test_paste_multi.py)
    photo = smooth_photo(300, 240)
    found = face_at(photo, 90, 100, 150, 170)
    x1, y1, x2, y2 = found.box.crop_xyxy
    frames = torch.ones(2, 256, 256, 3)  # white "generated" frames
    out = image.PasteBack(photo, found.box, feather=0.1, color_match=False)(frames)
    assert torch.equal(outside(out, found.box.crop_xyxy), outside(photo[0].expand(2, -1, -1, -1),
                                                                  found.box.crop_xyxy))
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    assert torch.allclose(out[:, cy, cx], torch.ones(2, 3), rtol=0, atol=RESAMPLE_EPS), "the centre: the frame's"
    # the soft edge: the crop's border pixels are mostly photo, rising towards the inside
    band = 0.1 * min(x2 - x1, y2 - y1)
    edge = out[0, cy, x1:x1 + int(band) + 2, 0] - photo[0, cy, x1:x1 + int(band) + 2, 0]
    assert edge[0] < 0.01 * (1 - photo[0, cy, x1, 0]) + 1e-6 and bool((edge[1:] >= edge[:-1] - 1e-6).all())
    hard = image.PasteBack(photo, found.box, feather=0.0, color_match=False)(
        torch.ones(1, y2 - y1, x2 - x1, 3))  # crop-sized
    assert torch.equal(hard[0, y1:y2, x1:x2], torch.ones(y2 - y1, x2 - x1, 3))


def test_face_region_keeps_the_photo_around_the_face():
    photo = smooth_photo(300, 240)
    found = face_at(photo, 90, 100, 150, 170)
    paste = image.PasteBack(photo, found.box, feather=0.1, region="face", color_match=False)
    rx1, ry1, rx2, ry2 = paste.region
    x1, y1, x2, y2 = paste.crop
    assert x1 < rx1 < rx2 < x2 and y1 < ry1 < ry2 < y2, "the face area lies inside the crop"
    out = paste(torch.ones(1, 256, 256, 3))
    assert torch.equal(outside(out, paste.region), outside(photo, paste.region))
    assert torch.allclose(out[0, (ry1 + ry2) // 2, (rx1 + rx2) // 2], torch.ones(3), rtol=0, atol=RESAMPLE_EPS)


def test_crop_at_the_photo_edge_and_off_by_one():
    # the face box of test_face's border case: crop [121, 110, 208, 198] is 87x88 and touches the right edge
    photo = torch.zeros(1, 208, 208, 3)
    found = face_at(photo, 150, 100, 208, 208)
    assert found.box.crop_xyxy == (121, 110, 208, 198)
    out = image.PasteBack(photo, found.box, feather=0.2, color_match=False)(torch.ones(1, 64, 64, 3))
    assert out.shape == (1, 208, 208, 3)
    assert torch.equal(outside(out, (121, 110, 208, 198)), outside(photo, (121, 110, 208, 198)))
    assert out[0, 154, 207].ge(1 - RESAMPLE_EPS).all(), "the side on the photo's border is not feathered"
    assert out[0, 154, 121].lt(0.01).all(), "the inner side is"
    # the top-left corner: both sides on the border stay the frame's own
    corner = face_at(torch.zeros(1, 160, 130, 3), 0, 0, 50, 50)
    x1, y1, x2, y2 = corner.box.crop_xyxy
    assert (x1, y1) == (0, 0)
    out = image.PasteBack(torch.zeros(1, 160, 130, 3), corner.box, color_match=False)(torch.ones(1, 64, 64, 3))
    assert out[0, 0, 0].ge(1 - RESAMPLE_EPS).all() and out[0, y2 - 1, x2 - 1].lt(0.01).all()


def test_rgba_gray_and_uint8_photos():
    rgba = torch.cat([smooth_photo(200, 160), torch.rand(1, 200, 160, 1)], dim=-1)  # [1, H, W, 4]
    found = face_at(rgba, 60, 70, 100, 120)
    out = image.PasteBack(rgba, found.box)(torch.rand(2, 128, 128, 3))
    assert out.shape == (2, 200, 160, 3)
    assert torch.equal(outside(out, found.box.crop_xyxy), outside(rgba[..., :3].expand(2, -1, -1, -1),
                                                                  found.box.crop_xyxy))
    gray = smooth_photo(200, 160, channels=1)
    out = image.PasteBack(gray, found.box)(torch.rand(1, 128, 128, 4))  # RGBA frames: alpha dropped
    assert torch.equal(outside(out, found.box.crop_xyxy)[..., 2], outside(gray, found.box.crop_xyxy)[..., 0])
    u8 = (smooth_photo(200, 160) * 255).round().to(torch.uint8)
    out = image.PasteBack(u8, found.box)(torch.rand(1, 128, 128, 3))
    assert torch.equal(outside(out, found.box.crop_xyxy), outside(u8.float() / 255, found.box.crop_xyxy))


def test_photo_of_4096_px():
    photo = torch.full((1, 4096, 2304, 3), 0.25)
    found = face_at(photo, 900, 1500, 1400, 2100)
    x1, y1, x2, y2 = found.box.crop_xyxy
    assert x2 - x1 == 1000
    out = image.PasteBack(photo, found.box, color_match=False)(torch.ones(2, 512, 512, 3))
    assert out.shape == (2, 4096, 2304, 3)
    assert out[:, :y1].eq(0.25).all() and out[:, y2:].eq(0.25).all() and out[:, :, :x1].eq(0.25).all()
    assert out[:, (y1 + y2) // 2, (x1 + x2) // 2].ge(1 - RESAMPLE_EPS).all()


def test_face_box_without_a_crop_passes_frames_through_and_says_so(caplog):
    photo = smooth_photo(200, 160)
    uncropped = face_at(photo, 60, 70, 100, 120, crop=False)
    whole = face.detect_face_mask(photo, on_no_face="whole_image")  # no detector, no mask: whole image
    frames = torch.rand(2, 256, 192, 3)
    for box in (uncropped.box, whole.box):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sonic_core.image"):
            assert image.plan_paste(photo, box) is None
            (out,) = nodes_paste.SonicPasteBack().paste(frames, photo, box, 0.1, "crop")
        assert out is frames and "pass through unchanged" in caplog.text
        with pytest.raises(ValueError, match="has no crop"):
            image.PasteBack(photo, box)


def test_bad_input_is_named_before_any_work():
    photo = smooth_photo(300, 240)
    found = face_at(photo, 90, 100, 150, 170)
    frames = torch.rand(1, 256, 256, 3)
    with pytest.raises(ValueError, match=r"photo is 200x300 but the face box was found on a 240x300 image"):
        image.PasteBack(smooth_photo(300, 200), found.box)
    with pytest.raises(ValueError, match=r"frames are 256x448 but the face box's crop is"):
        image.PasteBack(photo, found.box)(torch.rand(1, 448, 256, 3))
    with pytest.raises(ValueError, match="feather 0.7 must be 0..0.5"):
        image.PasteBack(photo, found.box, feather=0.7)
    with pytest.raises(ValueError, match="region 'hair' is not one of"):
        image.PasteBack(photo, found.box, region="hair")
    with pytest.raises(ValueError, match="expected the face box of Face Mask Detect"):
        nodes_paste.SonicPasteBack().paste(frames, photo, {"x": 1}, 0.1, "crop")
    with pytest.raises(ValueError, match="the IMAGE batch is empty"):
        nodes_paste.SonicPasteBack().paste(frames[:0], photo, found.box, 0.1, "crop")
    with pytest.raises(ValueError, match="NaN"):
        image.PasteBack(photo, found.box)(torch.full((1, 256, 256, 3), float("nan")))


def test_node_returns_the_photo_sized_batch():
    photo = smooth_photo(300, 240)
    found = face_at(photo, 90, 100, 150, 170)
    frames = working_frames(found, 4, 256)
    (out,) = nodes_paste.SonicPasteBack().paste(frames, photo, found.box, config.PASTE_FEATHER,
                                                config.PASTE_REGION)
    assert out.shape == (4, 300, 240, 3) and out.dtype == torch.float32
    assert_same_math(out, image.PasteBack(photo, found.box)(frames), "node vs core")


# ----------------------------------------------------------------------------------------------
# streaming: Latent To Video and the segment path give the one-pass node's frames
# ----------------------------------------------------------------------------------------------
def _tiny_case():
    """A 150x97 photo whose 64x64 crop the tiny VAE's 32x32 frames fill."""
    photo = smooth_photo(97, 150)
    box = face.FaceBox(x=16.0, y=16.0, w=32.0, h=32.0, image_size=(64, 64), crop_xyxy=(40, 20, 104, 84),
                       source_size=(150, 97))
    return photo, box


def test_latent_to_video_and_segments_paste_as_the_one_pass_node(env):
    vae, rife, latents, out, written = env
    photo, box = _tiny_case()
    want = nodes_paste.SonicPasteBack().paste(_one_pass(vae, rife, latents), photo, box, 0.1, "crop")[0]
    assert want.shape[1:] == (97, 150, 3)
    node = nodes_long.SonicLatentToVideo()
    result = node.save({"samples": latents}, vae, 12.5, "RIFE/flownet.pkl", 2, "Sonic/paste",
                       audio=_audio(1.0), decode_chunk_size=CHUNK, photo=photo, face_box=box, paste_feather=0.1,
                       paste_region="crop")
    assert_same_math(torch.cat(written), want, "Latent To Video with paste-back vs one pass")
    assert all(w.shape[1:3] == (97, 150) for w in written)
    import av

    with av.open(result["result"][0]) as c:  # odd photo sizes: yuv420p repeats the last row / column
        assert (c.streams.video[0].width, c.streams.video[0].height) == (150, 98)

    # segment path: Latent Segment -> Frame Interpolate -> Sonic Paste Back -> Video Combine
    written.clear()
    seg_node, rife_node, paste_node = (nodes_long.SonicLatentSegment(), nodes_video.SonicFrameInterpolate(),
                                       nodes_paste.SonicPasteBack())
    combine, k = nodes_video.SonicVideoCombine(), 0
    while True:
        images, info = seg_node.decode({"samples": latents}, vae, SEGMENT, k, CHUNK, unique_id="7")
        frames, fps = rife_node.interpolate(images, "RIFE/flownet.pkl", 2, 12.5, 4)
        (pasted,) = paste_node.paste(frames, photo, box, 0.1, "crop")
        combine.combine(pasted, fps, "Sonic/paste_seg", segment=info)
        k += 1
        if info.segment.last:
            break
    assert_same_math(torch.cat(written), want, "segments with paste-back vs one pass")


def test_latent_to_video_paste_inputs_refused_before_decoding(env):
    vae, rife, latents, out, written = env
    photo, box = _tiny_case()
    node = nodes_long.SonicLatentToVideo()
    with pytest.raises(ValueError, match="needs both photo and face_box; only photo is connected"):
        node.save({"samples": latents}, vae, 12.5, "none", 2, "Sonic/x", photo=photo)
    wide = face.FaceBox(x=16.0, y=16.0, w=32.0, h=32.0, image_size=(100, 50), crop_xyxy=(20, 20, 120, 70),
                        source_size=(150, 97))
    with pytest.raises(ValueError, match="frames are 32x32 but the face box's crop is 100x50"):
        node.save({"samples": latents}, vae, 12.5, "none", 2, "Sonic/x", photo=photo, face_box=wide)
    assert not written
    assert list(out.iterdir()) == []


def test_stream_holds_one_photo_frame_at_a_time():
    photo, box = _tiny_case()
    paste = image.PasteBack(photo, box)
    chunks = (torch.rand(5, 32, 32, 3) for _ in range(3))
    got = list(stream.paste_chunks(paste, chunks))
    assert len(got) == 15 and all(g.shape == (1, 97, 150, 3) for g in got)
    assert np.isfinite(float(torch.cat(got).sum()))


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------
CLI_PHOTO = (176, 256)  # (w, h): a non-square portrait, even sides (yuv420p keeps them)
CLI_FACE = (60, 70, 116, 140)  # transparent ellipse marking the face (x0, y0, x1, y1)
H264_MARGIN = 16  # px kept clear of the crop rectangle (one macroblock: the encoder mixes across it)
# u8 levels over what the photo alone, encoded the same way, is off: its saturated colour waves lose up
# to 16 levels of blue to yuv420p's halved chroma (2.04 on average); the paste-back video: 15 (1.88)
H264_EXTRA_MAX, H264_EXTRA_MEAN = 4, 0.5


def _decode(path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # [N, h, w, 3]


def _cli_photo(path) -> np.ndarray:
    from PIL import Image, ImageDraw

    w, h = CLI_PHOTO
    rgb = (smooth_photo(h, w, seed=3)[0].numpy() * 255).round().astype(np.uint8)  # [h, w, 3]
    im = Image.fromarray(rgb).convert("RGBA")
    ImageDraw.Draw(im).ellipse(CLI_FACE, fill=(225, 185, 150, 0))  # alpha 0: the face mask
    im.save(path)
    return np.asarray(im.convert("RGB"))


def _cli(*args: str):
    import subprocess
    import sys

    from tests._golden import REPO

    return subprocess.run([sys.executable, "-m", "sonic_core", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_cli_paste_back_without_crop_is_refused_before_loading(tmp_path):
    from sonic_core import selftest

    _cli_photo(tmp_path / "p.png")
    voice = selftest.write_voice(tmp_path / "v.wav")
    run = _cli("animate", str(tmp_path / "p.png"), str(voice), "-o", str(tmp_path / "o.mp4"), "--paste-back",
               "--models", str(tmp_path / "empty"))
    assert run.returncode == 2 and "--paste-back" in run.stderr and "needs --crop" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "missing" not in run.stderr, "refused before looking for weights"
    assert not (tmp_path / "o.mp4").exists()
    run = _cli("animate", str(tmp_path / "p.png"), str(voice), "-o", str(tmp_path / "o.mp4"), "--crop",
               "--paste-back", "--paste-feather", "0.9", "--models", str(tmp_path / "empty"))
    assert run.returncode == 2 and "--paste-feather 0.9 is out of range: must be a finite number from 0 to 0.5" in run.stderr, run.stderr


@pytest.mark.slow
def test_cli_paste_back_writes_the_photo_sized_video(tmp_path):
    from sonic_core import selftest, video

    photo = _cli_photo(tmp_path / "p.png")  # [h, w, 3] u8
    voice = selftest.write_voice(tmp_path / "v.wav")
    models = selftest.write_tiny_models(tmp_path / "models")
    out = tmp_path / "o.mp4"
    run = _cli("animate", str(tmp_path / "p.png"), str(voice), "-o", str(out), "--models", str(models), "--crop",
               "--paste-back", "--steps", "2", "--min-resolution", "128", "--max-seconds", "1", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    frames = _decode(out)  # [N, h, w, 3]
    video.write_video(torch.from_numpy(photo.copy()).float()[None].expand(5, -1, -1, -1) / 255,
                      str(tmp_path / "still.mp4"), 25.0)  # the photo alone, encoded the same way
    still_err = np.abs(_decode(tmp_path / "still.mp4").astype(np.int16) - photo.astype(np.int16))
    w, h = CLI_PHOTO
    assert frames.shape[1:] == (h, w, 3) and frames.shape[0] > 10
    # where the crop is: the face box marked by the alpha, expanded as Face Mask Detect does
    x1, y1, x2, y2 = face.process_bbox(CLI_FACE, config.CROP_EXPAND_RATIO, h, w)
    far = np.ones((h, w), dtype=bool)
    far[max(y1 - H264_MARGIN, 0):y2 + H264_MARGIN, max(x1 - H264_MARGIN, 0):x2 + H264_MARGIN] = False
    diff = np.abs(frames.astype(np.int16) - photo.astype(np.int16))  # [N, h, w, 3]
    assert far.sum() > 0.3 * h * w
    got, ref = diff[:, far], still_err[:, far]
    assert got.max() <= ref.max() + H264_EXTRA_MAX and got.mean() <= ref.mean() + H264_EXTRA_MEAN, \
        f"away from the face: the photo up to h264 ({got.max()} / {got.mean():.2f} vs {ref.max()} / {ref.mean():.2f})"
    moving = frames[:, y1 + 8:y2 - 8, x1 + 8:x2 - 8].astype(np.float32).std(axis=0).mean()  # over time
    still = frames[:, far].astype(np.float32).std(axis=0).mean()
    assert moving > 2.0 and still < 1.0, f"the face region moves ({moving:.2f}), the rest does not ({still:.2f})"
