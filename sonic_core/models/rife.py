"""RIFE HDv3 IFNet (the variant Sonic ships as ``RIFE/flownet.pkl``), SPEC §12.

Three IFBlocks refine a bidirectional flow and a blend mask coarse to fine at scales (4, 2, 1);
the middle frame is the two warped inputs blended by ``sigmoid(mask)``. ``block_tea`` (the
training-time teacher) is part of the checkpoint, so it is built to load strictly, but it never
runs. The module computes in whatever dtype/device its parameters are on (the caller decides).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    RIFE_CHANNELS,
    RIFE_FLOW_CHANNELS,
    RIFE_IMAGE_CHANNELS,
    RIFE_PAD_MULTIPLE,
    RIFE_RESBLOCKS,
    RIFE_SCALES,
    RIFE_STATE_PREFIX,
    RIFE_TEACHER_IN_CHANNELS,
)
from ..weights import check_keys, read_state_dict

log = logging.getLogger(__name__)

RIFE_SUFFIXES = (".pkl", ".pth", ".pt", ".safetensors")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (bias) + per-channel PReLU; keys ``.0`` (conv) and ``.1`` (PReLU)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=True), nn.PReLU(cout))


def _upsample_head(c: int, cout: int) -> nn.Sequential:
    """Two stride-2 4x4 transposed convs (x4 in size) with a PReLU between them."""
    return nn.Sequential(nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.PReLU(c // 2),
                         nn.ConvTranspose2d(c // 2, cout, 4, 2, 1))


class IFBlock(nn.Module):
    """One pyramid level: (images, mask, flow) at 1/scale -> flow and mask residuals."""

    def __init__(self, in_planes: int, c: int = RIFE_CHANNELS):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(in_planes, c // 2, 2), _conv(c // 2, c, 2))
        for i in range(RIFE_RESBLOCKS):
            self.add_module(f"convblock{i}", nn.Sequential(_conv(c, c), _conv(c, c)))
        self.conv1 = _upsample_head(c, RIFE_FLOW_CHANNELS)  # flow head
        self.conv2 = _upsample_head(c, 1)  # mask head

    def forward(self, x: torch.Tensor, flow: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B,7,H,W], flow [B,4,H,W] -> flow [B,4,H,W], mask [B,1,H,W]
        down = 1.0 / scale
        x = F.interpolate(x, scale_factor=down, mode="bilinear", align_corners=False)
        flow = F.interpolate(flow, scale_factor=down, mode="bilinear", align_corners=False) * down
        feat = self.conv0(torch.cat((x, flow), 1))  # [B,11,h,w] -> [B,c,h/4,w/4]
        for i in range(RIFE_RESBLOCKS):
            feat = getattr(self, f"convblock{i}")(feat) + feat
        flow = self.conv1(feat)  # [B,4,h,w]
        mask = self.conv2(feat)  # [B,1,h,w]
        flow = F.interpolate(flow, scale_factor=scale, mode="bilinear", align_corners=False) * scale
        mask = F.interpolate(mask, scale_factor=scale, mode="bilinear", align_corners=False)
        return flow, mask


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp ``image [B,C,H,W]`` by ``flow [B,2,H,W]`` (pixels), border padding."""
    b, _, h, w = image.shape
    kw = {"device": flow.device, "dtype": flow.dtype}
    xs = torch.linspace(-1.0, 1.0, w, **kw).view(1, 1, 1, w).expand(b, -1, h, -1)  # [B,1,H,W]
    ys = torch.linspace(-1.0, 1.0, h, **kw).view(1, 1, h, 1).expand(b, -1, -1, w)  # [B,1,H,W]
    grid = torch.cat((xs, ys), 1)  # [B,2,H,W] (x, y) in [-1, 1]
    flow = torch.cat((flow[:, 0:1] / ((w - 1.0) / 2.0), flow[:, 1:2] / ((h - 1.0) / 2.0)), 1)  # [B,2,H,W]
    grid = (grid + flow).permute(0, 2, 3, 1)  # [B,H,W,2]
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _swap(flow: torch.Tensor) -> torch.Tensor:
    """Exchange the 0->1 and 1->0 flow halves: [B,4,H,W] channels (2,3,0,1)."""
    return torch.cat((flow[:, 2:4], flow[:, 0:2]), 1)


class IFNet(nn.Module):
    """RIFE HDv3 flow network; ``forward(img0, img1)`` returns the unclamped middle frame."""

    def __init__(self, channels: int = RIFE_CHANNELS):
        super().__init__()
        in_planes = 2 * RIFE_IMAGE_CHANNELS + 1 + RIFE_FLOW_CHANNELS  # 11: w0, w1, mask, flow
        self.block0 = IFBlock(in_planes, channels)
        self.block1 = IFBlock(in_planes, channels)
        self.block2 = IFBlock(in_planes, channels)
        self.block_tea = IFBlock(RIFE_TEACHER_IN_CHANNELS, channels)  # loaded, never run

    def forward(self, img0: torch.Tensor, img1: torch.Tensor,
                scales: tuple[float, ...] = RIFE_SCALES) -> torch.Tensor:
        # img0, img1 [B,3,H,W] in [0,1]; H and W must be multiples of 4 * max(scales)
        b, _, h, w = img0.shape
        flow = img0.new_zeros(b, RIFE_FLOW_CHANNELS, h, w)  # [B,4,H,W]: 0->1 (x,y), 1->0 (x,y)
        mask = img0.new_zeros(b, 1, h, w)
        w0, w1 = img0, img1
        for block, scale in zip((self.block0, self.block1, self.block2), scales):
            f0, m0 = block(torch.cat((w0[:, :3], w1[:, :3], mask), 1), flow, scale)  # [B,7,H,W] in
            f1, m1 = block(torch.cat((w1[:, :3], w0[:, :3], -mask), 1), _swap(flow), scale)
            flow = flow + (f0 + _swap(f1)) / 2
            mask = mask + (m0 + (-m1)) / 2
            w0 = warp(img0, flow[:, :2])
            w1 = warp(img1, flow[:, 2:4])
        weight = torch.sigmoid(mask)
        return w0 * weight + w1 * (1 - weight)


def pad_for_rife(frames: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Zero-pad ``[B,3,H,W]`` on the bottom/right to multiples of RIFE_PAD_MULTIPLE.

    Sonic's frames are multiples of 64 and pass unchanged (the official path never pads).
    Returns the padded frames and the original H, W for cropping the result back.
    """
    h, w = frames.shape[-2:]
    ph = -h % RIFE_PAD_MULTIPLE
    pw = -w % RIFE_PAD_MULTIPLE
    if ph or pw:
        frames = F.pad(frames, (0, pw, 0, ph))  # [B,3,H+ph,W+pw]
    return frames, h, w


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def rife_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the official load rule (SPEC §1): keep keys containing ``module.``, delete it.

    Entries without ``module.`` are dropped as the official loader does. A file with no
    ``module.`` key at all (e.g. an already stripped .safetensors copy) is taken as it is.
    """
    if not any(RIFE_STATE_PREFIX in k for k in state):
        return dict(state)
    kept = {k.replace(RIFE_STATE_PREFIX, ""): v for k, v in state.items() if RIFE_STATE_PREFIX in k}
    dropped = len(state) - len(kept)
    if dropped:
        log.info("RIFE: dropped %d entries without %r (official load rule)", dropped, RIFE_STATE_PREFIX)
    return kept


def build_rife(state: dict[str, torch.Tensor], what: str = "RIFE state dict") -> IFNet:
    """IFNet with ``state`` (keys without ``module.``) loaded strictly, in eval mode, float32."""
    width_key = "block0.conv0.1.0.weight"  # [c, c/2, 3, 3]
    channels = int(state[width_key].shape[0]) if width_key in state else RIFE_CHANNELS
    model = IFNet(channels)
    check_keys(model, state, f"{what} (RIFE HDv3 IFNet; use the official RIFE/flownet.pkl)")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


def load_rife(path: str, device: torch.device | str = "cpu") -> IFNet:
    """Load ``flownet.pkl`` (or .pth / .safetensors) onto ``device``; errors name the bad keys.

    Pickles are read with ``torch.load(weights_only=True)`` (sonic_core.weights.read_state_dict).
    """
    from .. import identify
    from ..paths import check_input

    with identify.expecting(path, identify.RIFE):  # another model's file: says which
        check_input(path, "RIFE weights", fix="download RIFE/flownet.pkl (see README 'Weights')")
        state = rife_state_dict(read_state_dict(path))
        model = build_rife(state, what=path)
    log.info("RIFE: loaded %s (%d tensors)", path, len(state))
    return model.to(device)
