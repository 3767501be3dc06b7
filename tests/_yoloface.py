"""A YOLOv5-face-style detector with random weights, in the official file's call format.

Written here from the public facts recorded in ``sonic_core/models/yoloface_manifest.json``
(the yolov5-face ``yolov5m.yaml`` layer list, anchors and strides, and the Sonic wrapper's call
``model(image, grids)`` returning decoded rows ``[1, N, 16]``). The widths and depths are tiny so
that scripting and tracing take a second; the layer kinds, the module tree (``model.0`` ...
``model.23``, ``Detect`` last with ``m.0..2`` output convolutions, ``anchors`` and ``anchor_grid``
buffers) and the head's decoding follow the real network.

Variants cover what a YOLOv5-face export can contain: StemBlock or Focus stem, C3 or
BottleneckCSP blocks, SPP or SPPF, SiLU / LeakyReLU / Hardswish activations (the torch modules or
the "export-friendly" formulas ``x * sigmoid(x)`` and ``x * hardtanh(x + 3, 0, 6) / 6``), and
BatchNorm folded into the convolutions (what ``model.fuse()`` does before an export). Each can be
scripted or traced (the official file is most likely traced: ``grids`` as an input is how a
traced YOLO head stays valid at every input size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MANIFEST = Path(__file__).resolve().parents[1] / "sonic_core" / "models" / "yoloface_manifest.json"


def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


@dataclass(frozen=True)
class Variant:
    stem: str = "stem"  # "stem" (StemBlock, yolov5m-face) or "focus"
    block: str = "c3"  # "c3" or "bcsp" (BottleneckCSP)
    pool: str = "spp"  # "spp" (k = 3, 5, 7) or "sppf"
    act: str = "silu"  # "silu", "silu_export", "leaky", "hardswish", "hardswish_export"
    fused: bool = False  # BatchNorm folded into the convolution (model.fuse())
    width: float = 1 / 16  # channel multiple on top of the yaml's widths (yolov5m: 0.75 of them)
    depth: int = 1  # blocks per C3 (yolov5m: 2 or 6)
    head: str = "decode"  # "decode" (sigmoid once, slices), "export_cat" (yolov5-face's export path:
    #                       full_like + cat, anchor grid from anchors * stride, .to(device)) or
    #                       "inplace" (its inference path: in-place writes into slices and a class index)
    scriptable: bool = False  # layers in a ModuleList (torch.jit.script cannot chain a Sequential of
    #                           mixed signatures); the yolov5 layout, traced, is an nn.Sequential


class ExportSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class ExportHardswish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardtanh(x + 3, 0.0, 6.0) / 6.0


def _act(kind: str) -> nn.Module:
    return {"silu": nn.SiLU, "silu_export": ExportSiLU, "leaky": lambda: nn.LeakyReLU(0.1, inplace=True),
            "hardswish": nn.Hardswish, "hardswish_export": ExportHardswish}[kind]()


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + activation; ``fuse()`` folds the norm into the conv."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, act: str = "silu"):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        w, b = self.conv.weight, self.bn
        scale = b.weight / torch.sqrt(b.running_var + b.eps)  # [c2]
        fused = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size,
                          self.conv.stride, self.conv.padding, bias=True)
        fused.weight.data = w * scale.view(-1, 1, 1, 1)  # [c2, c1, k, k]
        fused.bias.data = b.bias - b.running_mean * scale
        self.conv = fused
        self.bn = nn.Identity()


class StemBlock(nn.Module):
    def __init__(self, c1: int, c2: int, act: str):
        super().__init__()
        self.stem_1 = Conv(c1, c2, 3, 2, act=act)
        self.stem_2a = Conv(c2, c2 // 2, 1, 1, 0, act=act)
        self.stem_2b = Conv(c2 // 2, c2, 3, 2, 1, act=act)
        self.stem_2p = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.stem_3 = Conv(c2 * 2, c2, 1, 1, 0, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stem_1(x)
        return self.stem_3(torch.cat((self.stem_2b(self.stem_2a(s1)), self.stem_2p(s1)), 1))


class Focus(nn.Module):
    """Space-to-depth (four strided slices) then a conv; stride 2 here, plus one stride-2 conv."""

    def __init__(self, c1: int, c2: int, act: str):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, 3, 1, act=act)
        self.down = Conv(c2, c2, 3, 2, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        return self.down(self.conv(x))  # [B, c2, H/4, W/4]


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool, act: str):
        super().__init__()
        self.cv1 = Conv(c1, c2, 1, 1, act=act)
        self.cv2 = Conv(c2, c2, 3, 1, act=act)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int, shortcut: bool, act: str):
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c1, c_, 1, 1, act=act)
        self.cv3 = Conv(2 * c_, c2, 1, act=act)
        self.m = nn.Sequential(*[Bottleneck(c_, c_, shortcut, act) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class BottleneckCSP(nn.Module):
    def __init__(self, c1: int, c2: int, n: int, shortcut: bool, act: str):
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = nn.Conv2d(c1, c_, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(c_, c_, 1, 1, bias=False)
        self.cv4 = Conv(2 * c_, c2, 1, 1, act=act)
        self.bn = nn.BatchNorm2d(2 * c_)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.m = nn.Sequential(*[Bottleneck(c_, c_, shortcut, act) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        return self.cv4(self.act(self.bn(torch.cat((y1, self.cv2(x)), dim=1))))


class SPP(nn.Module):
    def __init__(self, c1: int, c2: int, k: tuple[int, ...], act: str):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1, act=act)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        pooled = [x]
        for pool in self.m:
            pooled.append(pool(x))
        return self.cv2(torch.cat(pooled, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int, act: str):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * 4, c2, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Detect(nn.Module):
    """Output convs and the in-module decoding: sigmoid, ``(2s - 0.5 + grid) * stride``,
    ``(2s)^2 * anchor``, landmarks ``raw * anchor + grid * stride``; rows ``[B, N, 15 + nc]``."""

    def __init__(self, nc: int, anchors: list, strides: list, ch: list[int]):
        super().__init__()
        self.nc = nc
        self.no = nc + 15  # box 4, objectness 1, landmarks 10, classes
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        a = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)  # [nl, na, 2] pixels
        stride = torch.tensor(strides, dtype=torch.float32)
        self.register_buffer("anchors", a / stride.view(-1, 1, 1))  # [nl, na, 2] in cells
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))  # [nl, 1, na, 1, 1, 2]
        self.stride = [float(s) for s in strides]
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor], grids: list[torch.Tensor]) -> torch.Tensor:
        z: list[torch.Tensor] = []
        for i, conv in enumerate(self.m):
            p = conv(xs[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()  # [B, na, ny, nx, no]
            s = p.sigmoid()
            grid, anchor, stride = grids[i], self.anchor_grid[i], self.stride[i]  # [1,1,ny,nx,2], [1,na,1,1,2]
            xy = (s[..., 0:2] * 2.0 - 0.5 + grid) * stride
            wh = (s[..., 2:4] * 2.0) ** 2 * anchor
            parts = [xy, wh, s[..., 4:5]]
            for k in range(5):
                parts.append(p[..., 5 + 2 * k:7 + 2 * k] * anchor + grid * stride)
            parts.append(s[..., 15:])
            y = torch.cat(parts, -1)  # [B, na, ny, nx, no]
            z.append(y.view(bs, -1, self.no))  # [B, na*ny*nx, no]
        return torch.cat(z, 1)  # [B, N, no]


class DetectExportCat(Detect):
    """The same rows, spelled as yolov5-face's export path spells them (other ops in the file)."""

    def forward(self, xs: list[torch.Tensor], grids: list[torch.Tensor]) -> torch.Tensor:
        z: list[torch.Tensor] = []
        for i, conv in enumerate(self.m):
            p = conv(xs[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()  # [B, na, ny, nx, no]
            stride = self.stride[i]
            grid = grids[i].to(p.device)  # [1, 1, ny, nx, 2]
            anchor = (self.anchors[i].clone() * stride).view(1, self.na, 1, 1, 2)  # [1, na, 1, 1, 2] pixels
            anchor = anchor.expand(1, self.na, ny, nx, 2).float()  # [1, na, ny, nx, 2]
            y = torch.full_like(p, 0)
            y = y + torch.cat((p[:, :, :, :, 0:5].sigmoid(),
                               torch.cat((p[:, :, :, :, 5:15], p[:, :, :, :, 15:].sigmoid()), 4)), 4)
            box_xy = (y[:, :, :, :, 0:2] * 2.0 - 0.5 + grid) * stride
            box_wh = (y[:, :, :, :, 2:4] * 2) ** 2 * anchor
            marks = [y[:, :, :, :, 5 + 2 * k:7 + 2 * k] * anchor + grid * stride for k in range(5)]
            y = torch.cat([box_xy, box_wh, y[:, :, :, :, 4:5]] + marks + [y[:, :, :, :, 15:]], -1)
            z.append(y.view(bs, -1, self.no))  # [B, na*ny*nx, no]
        return torch.cat(z, 1)  # [B, N, no]


class DetectInplace(Detect):
    """The same rows written into slices of one tensor (yolov5-face's inference spelling); trace
    only (TorchScript cannot script a tensor index after an ellipsis)."""

    def forward(self, xs: list[torch.Tensor], grids: list[torch.Tensor]) -> torch.Tensor:
        z: list[torch.Tensor] = []
        scored = list(range(5)) + list(range(15, self.no))  # box, objectness and class columns
        for i, conv in enumerate(self.m):
            p = conv(xs[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()  # [B, na, ny, nx, no]
            grid, anchor, stride = grids[i], self.anchor_grid[i], self.stride[i]
            y = torch.full_like(p, 0)
            y[..., scored] = p[..., scored].sigmoid()
            y[..., 5:15] = p[..., 5:15]
            y[..., 0:2] = (y[..., 0:2] * 2.0 - 0.5 + grid) * stride
            y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * anchor
            for k in range(5):
                y[..., 5 + 2 * k:7 + 2 * k] = y[..., 5 + 2 * k:7 + 2 * k] * anchor + grid * stride
            z.append(y.view(bs, -1, self.no))  # [B, na*ny*nx, no]
        return torch.cat(z, 1)  # [B, N, no]


class Model(nn.Module):
    """yolov5m-face's 24 layers (``model.0`` .. ``model.23``), called as ``model(image, grids)``."""

    def __init__(self, variant: Variant = Variant(), fact: dict | None = None):
        super().__init__()
        fact = fact or manifest()["network"]
        v = variant
        if tuple(fact["strides"]) != (8, 16, 32) or fact["outputs_per_anchor"] != fact["classes"] + 15:
            raise ValueError(f"the layer list below is yolov5m-face's; manifest facts {fact} do not match it")

        def c(ch: int) -> int:
            return max(4, int(ch * v.width) // 2 * 2)

        act = v.act
        block = {"c3": C3, "bcsp": BottleneckCSP}[v.block]
        stem = StemBlock(3, c(64), act) if v.stem == "stem" else Focus(3, c(64), act)
        pool = SPP(c(1024), c(1024), tuple(fact["spp_kernels"]), act) if v.pool == "spp" else \
            SPPF(c(1024), c(1024), 5, act)
        n = v.depth
        layers = [
            stem,  # 0  /4
            block(c(64), c(128), n, True, act),  # 1
            Conv(c(128), c(256), 3, 2, act=act),  # 2  /8
            block(c(256), c(256), n, True, act),  # 3  P3 skip
            Conv(c(256), c(512), 3, 2, act=act),  # 4  /16
            block(c(512), c(512), n, True, act),  # 5  P4 skip
            Conv(c(512), c(1024), 3, 2, act=act),  # 6  /32
            pool,  # 7
            block(c(1024), c(1024), n, False, act),  # 8
            Conv(c(1024), c(512), 1, 1, act=act),  # 9
            nn.Upsample(None, 2, "nearest"),  # 10
            Concat(1),  # 11 (10, 5)
            block(c(512) * 2, c(512), n, False, act),  # 12
            Conv(c(512), c(256), 1, 1, act=act),  # 13
            nn.Upsample(None, 2, "nearest"),  # 14
            Concat(1),  # 15 (14, 3)
            block(c(256) * 2, c(256), n, False, act),  # 16 P3 out
            Conv(c(256), c(256), 3, 2, act=act),  # 17
            Concat(1),  # 18 (17, 13)
            block(c(256) * 2, c(512), n, False, act),  # 19 P4 out
            Conv(c(512), c(512), 3, 2, act=act),  # 20
            Concat(1),  # 21 (20, 9)
            block(c(512) * 2, c(1024), n, False, act),  # 22 P5 out
            {"decode": Detect, "export_cat": DetectExportCat, "inplace": DetectInplace}[v.head](
                fact["classes"], fact["anchors"], fact["strides"], [c(256), c(512), c(1024)]),  # 23
        ]
        self.model = nn.ModuleList(layers) if v.scriptable else nn.Sequential(*layers)
        if v.fused:
            for m in self.modules():
                if isinstance(m, Conv):
                    m.fuse()

    def forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        m = self.model
        x3 = m[3](m[2](m[1](m[0](x))))
        x5 = m[5](m[4](x3))
        x9 = m[9](m[8](m[7](m[6](x5))))
        x13 = m[13](m[12](m[11]([m[10](x9), x5])))
        p3 = m[16](m[15]([m[14](x13), x3]))
        p4 = m[19](m[18]([m[17](p3), x13]))
        p5 = m[22](m[21]([m[20](p4), x9]))
        return m[23]([p3, p4, p5], grids)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (fresh ones are the identity), eval mode."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def build(variant: Variant = Variant(), seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return randomize(Model(variant), seed)


def plant_faces(model: Model, level: int = 2, anchor: int = 2, logit: float = 8.0) -> Model:
    """Detections that do not hang on a threshold: the output convs get small weights, objectness
    ``-logit`` everywhere except ``anchor`` of ``level`` (objectness and class ``+logit``), so that
    level predicts one face per cell, which NMS then thins out."""
    det = model.model[23]
    with torch.no_grad():
        for lvl, conv in enumerate(det.m):
            conv.weight.mul_(0.05)
            bias = conv.bias.view(det.na, det.no)  # [na, no]
            bias[:, 4] = -logit
            if lvl == level:
                bias[anchor, 4] = logit
                bias[anchor, 15:] = logit
    return model


def grids_for(height: int, width: int, strides=(8, 16, 32)) -> list[torch.Tensor]:
    out = []
    for s in strides:
        ny, nx = height // s, width // s
        yv, xv = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")  # [ny, nx] each
        out.append(torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2).float())  # [1, 1, ny, nx, 2]
    return out


def export(model: Model, path: str | Path, how: str = "trace", size: tuple[int, int] = (416, 416)) -> Path:
    """Save ``model`` as TorchScript like the official file: ``how`` is "trace" or "script"."""
    h, w = size
    with torch.no_grad():
        if how == "trace":
            x = torch.zeros(1, 3, h, w)
            sm = torch.jit.trace(model, (x, grids_for(h, w)), check_trace=False)
        else:
            if not isinstance(model.model, nn.ModuleList):
                raise ValueError("build the model with Variant(scriptable=True) to script it")
            sm = torch.jit.script(model)
    torch.jit.save(sm, str(path))
    return Path(path)


# the exports the parity and allowlist tests run: (name, variant, how)
EXPORTS = (
    ("stem_c3_spp_silu_trace", Variant(), "trace"),
    ("stem_c3_spp_silu_script", Variant(scriptable=True), "script"),
    ("focus_bcsp_sppf_leaky_exportcat_trace", Variant(stem="focus", block="bcsp", pool="sppf", act="leaky",
                                                      head="export_cat"), "trace"),
    ("fused_silu_export_trace", Variant(act="silu_export", fused=True), "trace"),
    ("hardswish_exportcat_script", Variant(act="hardswish", head="export_cat", scriptable=True), "script"),
    ("fused_hardswish_export_exportcat_trace", Variant(act="hardswish_export", fused=True, head="export_cat"),
     "trace"),
    ("inplace_trace", Variant(head="inplace"), "trace"),  # valid at its trace size only (416 x 416)
)
# scripted forms of the other activations: scripted F.* bodies name their in-place variants too
# (checked by the allowlist test, no detection run)
COVERAGE_EXPORTS = (
    ("focus_bcsp_sppf_leaky_script", Variant(stem="focus", block="bcsp", pool="sppf", act="leaky",
                                             scriptable=True), "script"),
    ("fused_hardswish_export_script", Variant(act="hardswish_export", fused=True, scriptable=True), "script"),
)
