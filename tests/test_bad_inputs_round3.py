"""Bad inputs, round 3 (issue 29 items 5, 6, 11, 14): image files Pillow reads wrong, photo-sized
memory, paste-back into another photo, a change of audio between segments."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from sonic_core import pipeline
from tests.test_long_nodes import env, models  # noqa: F401 (fixtures)


# ----------------------------------------------------------------------------------------------
# Image files (item 11)
# ----------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _short_png(width: int, height: int, rows: int) -> bytes:
    """A grey PNG whose header says width x height but whose (complete) zlib stream holds ``rows`` rows."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    data = zlib.compress(b"".join(b"\x00" + bytes([100]) * width for _ in range(rows)))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def _tiff(width: int, height: int, samples: int, photometric: int, extra: tuple[int, ...]) -> bytes:
    """An uncompressed little-endian one-strip TIFF of 8-bit samples (written by hand: Pillow
    cannot write CMYK with alpha)."""
    data = bytes((i * 7) % 256 for i in range(width * height * samples))
    tags = [(256, 3, [width]), (257, 3, [height]), (258, 3, [8] * samples), (259, 3, [1]),
            (262, 3, [photometric]), (273, 4, [0]), (277, 3, [samples]), (278, 3, [height]),
            (279, 4, [len(data)]), (284, 3, [1])] + ([(338, 3, list(extra))] if extra else [])
    ifd_size = 2 + 12 * len(tags) + 4
    blob, entries = b"", []
    for tag, kind, values in tags:
        payload = b"".join(struct.pack("<H" if kind == 3 else "<I", v) for v in values)
        entries.append((tag, kind, values, payload))
        if len(payload) > 4:
            blob += payload
    data_at = 8 + ifd_size + len(blob)
    out, at = b"", 8 + ifd_size
    for tag, kind, values, payload in entries:
        if tag == 273:
            payload = struct.pack("<I", data_at)
        if len(payload) > 4:
            out += struct.pack("<HHII", tag, kind, len(values), at)
            at += len(payload)
        else:
            out += struct.pack("<HHI", tag, kind, len(values)) + payload.ljust(4, b"\0")
    return b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + out + b"\0" * 4 + blob + data


def test_png_with_fewer_rows_than_its_header_is_refused(tmp_path):
    path = tmp_path / "short.png"
    path.write_bytes(_short_png(900, 700, 1))
    assert len(path.read_bytes()) < 200
    with Image.open(path) as im:  # Pillow itself accepts it: the rest is black
        im.load()
    with pytest.raises(ValueError, match=r"short.png is truncated.*900x700.*699 of the 700 rows"):
        pipeline.read_image(path)


def test_truncated_png_is_refused_even_when_another_pack_allows_truncated_images(tmp_path, monkeypatch):
    path = tmp_path / "cut.png"
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(good, "PNG")
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # the file cut in the middle of IDAT
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match=r"cut.png (is truncated|cannot be decoded)"):
        pipeline.read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for the other pack


def test_short_interlaced_png_and_bottom_up_bmp_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(1, 255, (120, 96, 3), dtype=np.uint8)
    bmp = io.BytesIO()
    Image.fromarray(pixels).save(bmp, "BMP")  # rows stored bottom-up: the top rows are lost
    (tmp_path / "cut.bmp").write_bytes(bmp.getvalue()[: len(bmp.getvalue()) - 96 * 3 * 30])
    with pytest.raises(ValueError, match=r"cut.bmp (is truncated|cannot be decoded)"):
        pipeline.read_image(tmp_path / "cut.bmp")
    # Adam7 (interlaced PNG): a stream that ends before the 7th pass leaves the odd rows unwritten
    header = struct.pack(">IIBBBBB", 96, 120, 8, 2, 0, 0, 1)  # 8-bit RGB, interlaced
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2)]  # y0, x0, dy, dx
    body = b"".join(b"\x00" + bytes(pixels[y, x0::dx].reshape(-1))
                    for y0, x0, dy, dx in passes for y in range(y0, 120, dy))
    data = zlib.compress(body)
    (tmp_path / "adam7.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                                         + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    with pytest.raises(ValueError, match=r"adam7.png is truncated.*60 of the 120 rows"):
        pipeline.read_image(tmp_path / "adam7.png")


def test_complete_image_with_black_border_rows_is_read(tmp_path):
    pixels = np.full((100, 80, 3), 200, np.uint8)
    pixels[:3] = 0
    pixels[-3:] = 0  # black border rows: the second decode runs and finds every row written
    Image.fromarray(pixels).save(tmp_path / "black_border.png")
    image, mask = pipeline.read_image(tmp_path / "black_border.png")
    assert image.shape == (1, 100, 80, 3) and mask is None
    assert float(image[0, 0].max()) == 0.0 and abs(float(image[0, 50, 40, 0]) - 200 / 255) < 1e-6


def test_cmyk_tiff_with_alpha_is_named_not_called_damaged(tmp_path):
    path = tmp_path / "cmyka.tif"
    path.write_bytes(_tiff(80, 80, 5, 5, (2,)))
    with pytest.raises(ValueError, match=r"cmyka.tif is a TIFF of CMYK with an alpha channel.*Pillow.*cannot "
                                         r"read.*Convert it to RGB or RGBA") as err:
        pipeline.read_image(path)
    assert "damaged" not in str(err.value)
    plain = tmp_path / "cmyk.tif"  # the same writer without alpha: Pillow reads it, so the file is sound
    plain.write_bytes(_tiff(80, 80, 4, 5, ()))
    assert pipeline.read_image(plain)[0].shape == (1, 80, 80, 3)


def test_tiff_whose_header_does_not_parse_is_still_called_damaged(tmp_path):
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\0" + struct.pack("<I", 10_000) + b"\0" * 40)  # first IFD past the end
    with pytest.raises(ValueError, match=r"bad.tif cannot be read: it starts like a TIFF file but its header is "
                                         r"damaged"):
        pipeline.read_image(path)


# ----------------------------------------------------------------------------------------------
# Photo-sized memory (items 5, 6)
# ----------------------------------------------------------------------------------------------
def _free(monkeypatch, nbytes: int) -> None:
    from sonic_core import budget

    monkeypatch.setattr(budget, "host_available_bytes", lambda: nbytes)


def test_image_too_large_for_free_memory_is_refused_from_its_header(tmp_path, monkeypatch):
    Image.new("RGB", (1200, 1000), (90, 120, 150)).save(tmp_path / "big.png")
    _free(monkeypatch, 10 * 2**20)  # 10 MiB free; the pixels and their float32 copy are 18 MB
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ValueError, match=r"big.png is 1200x1000 px.*needs at least 17.2 MiB of host memory.*"
                                         r"10.0 MiB is free: downscale it"):
        pipeline.read_image(tmp_path / "big.png")
    assert not decoded, "refused before decoding"


def test_read_image_holds_few_photo_sized_buffers(tmp_path):
    import tracemalloc

    w, h = 1000, 800
    rgba = np.full((h, w, 4), 200, np.uint8)
    rgba[300:500, 400:600, 3] = 0  # transparent face square: a transparency mask comes back too
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    tracemalloc.start()
    try:
        image, mask = pipeline.read_image(tmp_path / "rgba.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == (1, h, w, 3) and mask is not None
    assert abs(float(image[0, 0, 0, 0]) - 200 / 255) < 1e-7 and float(mask[0, 400, 500]) == 1.0
    # numpy's buffers and Pillow's bytes (tracemalloc sees them): the float32 RGB (12 B/px) and transparency
    # (4 B/px) it returns and the RGB bytes (3 B/px) they come from: 19.3 B/px; no float temporaries beside
    # them (32.2 B/px before issue 29: RGB / 255, alpha / 255 and 1 - alpha made copies)
    assert peak < 21 * w * h, f"{peak / (w * h):.1f} bytes a pixel"


def test_cli_estimate_counts_the_photo_sized_frames_and_refuses_with_what_to_do():
    import torch

    from sonic_core import budget, preflight

    settings = pipeline.AnimateSettings(crop=True, paste_back=True)
    est = preflight.estimate_run((8000, 8000), 16000 * 2, 16000, settings, torch.float32, torch.device("cpu"))
    assert est.photo_size == (8000, 8000)
    photo_part = sum(b for name, (b, _w) in est.parts.items() if name.startswith(("paste-back", "encoder")))
    # one pasted float32 frame, its float32 / uint8 / yuv copies and x264's frames of 3 B/px: its look-ahead (10
    # frames over 4K UHD, where video.py shortens it, else 40) and 7 more (b-frames, references, the one encoding)
    assert photo_part == 8000 * 8000 * (24 + 4.5 + (10 + 7) * 3)
    with pytest.raises(budget.MemoryBudgetError, match=r"4.7 GiB of it is paste-back into the 8000x8000 photo: "
                                                       r"give a smaller photo"):
        budget.check_fits(est, "cpu", "this run", host_free=3 * 2**30)
    budget.check_fits(est, "cpu", "this run", host_free=6 * 2**30)  # fits
    small = preflight.estimate_run((2000, 1500), 16000 * 2, 16000, settings, torch.float32, torch.device("cpu"))
    held = min(49, 40 + 7)  # 2 s: 25 generated frames, 49 after RIFE
    assert sum(b for name, (b, _w) in small.parts.items() if name.startswith("encoder")) == 2000 * 1500 * held * 3


def test_x264_look_ahead_is_shortened_for_frames_over_4k(tmp_path):
    import av

    from sonic_core import config, video

    for (w, h), want in (((3840, 2160), None), ((4000, 2200), str(config.X264_LARGE_LOOKAHEAD))):
        with av.open(str(tmp_path / "o.mp4"), "w") as c:
            stream = video._add_video_stream(c, video.FORMATS["h264-mp4"], 25, w, h, 18, "yuv420p")
            assert stream.options.get("rc-lookahead") == want and stream.options["crf"] == "18"
    with av.open(str(tmp_path / "o.webm"), "w") as c:  # other encoders keep their settings
        stream = video._add_video_stream(c, video.FORMATS["vp9-webm"], 25, 4000, 2200, 18, "yuv420p")
        assert "rc-lookahead" not in stream.options


def test_latent_to_video_refuses_a_photo_too_large_for_memory_before_decoding(env, monkeypatch):
    from nodes import nodes_long
    from sonic_core import face
    from tests.test_paste import smooth_photo

    vae, rife, latents, out, written = env
    photo = smooth_photo(97, 150)
    box = face.FaceBox(x=16.0, y=16.0, w=32.0, h=32.0, image_size=(64, 64), crop_xyxy=(40, 20, 104, 84),
                       source_size=(150, 97))
    _free(monkeypatch, 100 * 2**10)  # 100 KiB: one pasted frame and its copies alone are 415 kB
    with pytest.raises(ValueError, match=r"Latent To Video cannot fit: pasting back into the 150x97 photo needs "
                                         r"at least [\d.]+ MiB of host memory .*0.1 MiB is free: give a smaller photo"):
        nodes_long.SonicLatentToVideo().save({"samples": latents}, vae, 12.5, "RIFE/flownet.pkl", 2, "Sonic/x",
                                             photo=photo, face_box=box)
    assert not written and list(out.iterdir()) == []


def test_paste_back_node_checks_its_batch_before_allocating(monkeypatch):
    import torch

    from nodes import nodes_paste
    from sonic_core import face
    from tests.test_paste import smooth_photo

    photo = smooth_photo(300, 240)
    m = torch.zeros(photo.shape[:3])
    m[0, 100:170, 90:150] = 1
    found = face.detect_face_mask(photo, mask=m, crop=True)
    frames = torch.rand(25, 64, 64, 3)
    _free(monkeypatch, 3 * 2**20)  # 25 frames of 300x240x3 float32 are 21.6 MB
    allocated = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a) or real_empty(*a, **k))
    with pytest.raises(ValueError, match=r"Sonic Paste Back cannot fit: 25 frames of the 240x300 photo .* need "
                                         r"20.6 MiB of host memory .* 3.0 MiB is free \(room for about 3 frame\(s\)\): "
                                         r"paste fewer frames per call .*Latent To Video's photo and face_box"):
        nodes_paste.SonicPasteBack().paste(frames, photo, found.box, 0.1, "crop")
    assert not any(len(a) == 4 and a[0] == 25 for a in allocated), "refused before the batch was allocated"
    _free(monkeypatch, 2**30)
    assert nodes_paste.SonicPasteBack().paste(frames[:2], photo, found.box, 0.1, "crop")[0].shape == (2, 300, 240, 3)


# ----------------------------------------------------------------------------------------------
# Paste-back into another photo; a change of audio between segments (item 14)
# ----------------------------------------------------------------------------------------------
def _found(photo, x0=90, y0=100, x1=150, y1=170):
    import torch

    from sonic_core import face

    m = torch.zeros(photo.shape[:3])
    m[0, y0:y1, x0:x1] = 1
    return face.detect_face_mask(photo, mask=m, crop=True)


def test_paste_back_refuses_another_photo_of_the_same_size():
    from nodes import nodes_paste
    from sonic_core import image
    from tests.test_paste import smooth_photo

    photo, other = smooth_photo(300, 240, seed=0), smooth_photo(300, 240, seed=5)
    found = _found(photo)
    assert found.box.fingerprint is not None and len(found.box.fingerprint) == 16 * 16
    frames = found.image[None].expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match=r"the photo is 240x300 like the image the face box was found on, but it "
                                         r"is another picture \(\d+% of its 16x16 grid.*connect the image you gave "
                                         r"Face Mask Detect to photo"):
        nodes_paste.SonicPasteBack().paste(frames, other, found.box, 0.1, "crop")
    with pytest.raises(ValueError, match="another picture"):
        image.PasteBack(other.flip(1), found.box)  # the same picture upside down is another one too


def test_paste_back_accepts_the_same_photo_in_other_dtypes_edited_or_with_another_face_pasted():
    import torch

    from sonic_core import image
    from tests.test_paste import smooth_photo

    photo = smooth_photo(300, 240, seed=0)
    found = _found(photo)
    for same in (photo.half(), photo.bfloat16(), (photo * 255).round().to(torch.uint8),
                 (photo + 0.04).clamp(0, 1), photo[..., [0, 1, 2, 0]]):  # fp16/bf16/uint8/brighter/RGBA copies
        image.PasteBack(same, found.box)
    # a chain of paste-backs: face B is pasted into the output of face A's paste-back, whose crop moved
    other = _found(photo, 20, 20, 70, 80)
    animated = torch.rand(3, *other.image.shape[:2], 3, generator=torch.Generator().manual_seed(0))
    base = image.PasteBack(photo, other.box)(animated)  # [3, 300, 240, 3]: face A animated (noise)
    image.PasteBack(base, found.box)  # first base frame checked: face A's crop alone does not make it another
    assert float((base[0] - photo[0]).abs().max()) > 0.5
    from sonic_core import face

    old = face.FaceBox(**{k: v for k, v in vars(found.box).items() if k != "fingerprint"})  # a box without one
    image.PasteBack(smooth_photo(300, 240, seed=5), old)


def test_video_combine_refuses_a_change_of_audio_between_segments(env):
    from nodes import nodes_long, nodes_video
    from tests.test_long_nodes import CHUNK, SEGMENT, _audio, _files

    vae, rife, latents, out, written = env
    seg_node, combine = nodes_long.SonicLatentSegment(), nodes_video.SonicVideoCombine()
    first = _audio(1.0)
    seg0 = seg_node.decode({"samples": latents}, vae, SEGMENT, 0, CHUNK, unique_id="7")  # (images, info)
    seg1 = seg_node.decode({"samples": latents}, vae, SEGMENT, 1, CHUNK, unique_id="7")
    combine.combine(seg0[0], 12.5, "Sonic/audio", audio=first, segment=seg0[1])
    edited = {"waveform": first["waveform"].clone(), "sample_rate": first["sample_rate"]}
    edited["waveform"][0, 0, 8000] += 0.01  # one sample changed: another take of the same length
    with pytest.raises(ValueError, match=r"the audio changed between segments of one clip \(segment 1 had 16000 "
                                         r"samples at 16000 Hz, segment 2 has 16000 samples at 16000 Hz, other "
                                         r"samples\).*same audio for every segment, set segment_index to 0"):
        combine.combine(seg1[0], 12.5, "Sonic/audio", audio=edited, segment=seg1[1])
    assert not nodes_video._live and _files(out) == [], "the unfinished video is removed"
    combine.combine(seg0[0], 12.5, "Sonic/audio", audio=first, segment=seg0[1])
    with pytest.raises(ValueError, match=r"segment 1 had 16000 samples at 16000 Hz, segment 2 has no audio"):
        combine.combine(seg1[0], 12.5, "Sonic/audio", segment=seg1[1])
    # the same audio (ComfyUI's cache, or Load Audio run again) goes on
    combine.combine(seg0[0], 12.5, "Sonic/audio", audio=first, segment=seg0[1])
    again = {"waveform": first["waveform"].clone(), "sample_rate": first["sample_rate"]}
    combine.combine(seg1[0], 12.5, "Sonic/audio", audio=again, segment=seg1[1])
    assert len(nodes_video._live) == 1
    nodes_video._drop_live(next(iter(nodes_video._live)), "test over")
