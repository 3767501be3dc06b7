"""Image transforms (sonic_core/image.py): RGB conversion, working size, Lanczos resize, the
sampler's reference image and CLIP pixels (golden parity when ../shared fixtures are present)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sonic_core import config, image


def test_prepare_reference_parity_golden(golden):
    src = golden.t("input.image_rgb_u8")  # [h0, w0, 3] uint8
    mask_u8 = golden.t("pre.mask_fullres_u8")[..., 0]
    h0, w0 = src.shape[:2]
    min_res = golden.case.min_resolution
    want_img = golden.t("pre.image_resized_u8").numpy()
    H, W = want_img.shape[:2]
    assert image.working_size(w0, h0, min_res) == (W, H)
    if "resize" in golden.scalars:
        assert (golden.scalars["resize"]["new_w"], golden.scalars["resize"]["new_h"]) == (W, H)

    img_u8, mask = image.prepare_reference(src.float() / 255, mask_u8.float() / 255, min_res)
    assert img_u8.dtype == np.uint8 and img_u8.shape == (H, W, 3)
    assert np.array_equal(img_u8, want_img)
    assert mask.dtype == torch.float32 and mask.shape == (H, W)
    assert torch.equal((mask * 255).round().to(torch.uint8), golden.t("pre.mask_resized_u8")[..., 0])
    # SPEC §2.4 tensors, bit-exact
    ref_img = (torch.from_numpy(img_u8).permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # [3, H, W]
    # exact by construction: one IEEE division and subtraction per element (no FMA), as SPEC §2.4
    assert torch.equal(ref_img, golden.t("pre.ref_img"))
    assert torch.equal(mask, golden.t("pre.face_mask")[0])


def test_clip_pixels_parity_golden(golden):
    got = image.clip_pixels(golden.t("pre.image_resized_u8").numpy())
    want = golden.t("pre.clip_images")
    assert got.dtype == torch.float32 and got.shape == (3, config.CLIP_SIZE, config.CLIP_SIZE)
    assert (got - want).abs().max().item() <= 1e-6


def test_working_size_rounds_half_to_even_and_resize_noop():
    # scale 1: 96/64 = 1.5 -> 2 (even), 160/64 = 2.5 -> 2 (even), 224/64 = 3.5 -> 4
    assert image.working_size(96, 64, 64) == (128, 64)
    assert image.working_size(160, 64, 64) == (128, 64)
    assert image.working_size(64, 224, 64) == (64, 256)
    # 80x72 at 64: scale 0.888..; 71.1/64 -> 1, 64/64 -> 1
    assert image.working_size(80, 72, 64) == (64, 64)
    assert image.working_size(1000, 750, 512) == (704, 512)  # 682.7/64 = 10.67 -> 11
    with pytest.raises(ValueError, match="min_resolution"):
        image.working_size(100, 100, 16)
    a = (np.arange(64 * 80 * 3) % 251).astype(np.uint8).reshape(64, 80, 3)
    assert image.resize_lanczos(a, (80, 64)) is a
    assert image.resize_lanczos(a, (40, 32)).shape == (32, 40, 3)


def test_to_rgb_handles_rgba_gray_batch_and_small(caplog):
    rgba = torch.rand(1, 70, 80, 4)
    assert torch.equal(image.to_rgb(rgba), rgba[0, :, :, :3])
    gray = torch.rand(1, 70, 80, 1)
    out = image.to_rgb(gray)
    assert out.shape == (70, 80, 3) and torch.equal(out[..., 2], gray[0, ..., 0])
    with caplog.at_level(logging.WARNING, logger="sonic_core.image"):
        batch = torch.rand(3, 70, 80, 3)
        assert torch.equal(image.to_rgb(batch), batch[0])
    assert "first image" in caplog.text
    with pytest.raises(ValueError, match="at least 64 px"):
        image.to_rgb(torch.rand(1, 63, 200, 3))
    with pytest.raises(ValueError, match="channels"):
        image.to_rgb(torch.rand(1, 70, 80, 2))
