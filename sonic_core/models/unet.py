"""The Sonic UNet: diffusers' SVD-xt ``UNetSpatioTemporalConditionModel`` plus audio attention.

Sonic adds an IP-adapter style key/value branch for the audio tokens to every cross-attention
(``attn2``) of the SVD UNet, spatial and temporal (SPEC §5). The branch lives in
:class:`SonicAudioAttnProcessor`, installed on the 32 ``attn2`` layers, so the state-dict keys
are exactly those of the official ``unet.pth``
(``<layer>.processor.to_k_ip.0.weight`` / ``.to_v_ip.0.weight``).

The audio tokens, the face mask and the audio scale do not travel through diffusers' forward
(which would hand temporal layers only frame 0 of each context). :meth:`SonicUNet.forward`
stores them in a :class:`AudioCallContext` shared by every audio processor for the duration of
one call, then runs the stock diffusers forward.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SVD_XT_UNET_CONFIG = CONFIG_DIR / "svd_xt_unet.json"
MASK_RESIZE_MODE = "bicubic"  # SPEC §5.5, F.interpolate mode of the face mask, align_corners False
TEMPORAL_MARKER = ".temporal_transformer_blocks."  # module-name part of temporal transformer blocks


# ----------------------------------------------------------------------------------------------
# Face mask -> token grid (SPEC §5.5)
# ----------------------------------------------------------------------------------------------
def mask_token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """Grid ``(mh, mw)`` the face mask is resized to for a layer with ``num_tokens`` queries.

    ``mh = int(sqrt(N / (W/H)))`` with the square root in float32 (SPEC §5.5: float64 differs,
    e.g. H=448, W=1152, level 3), ``mh += 1`` if it does not divide N, ``mw = N // mh``.
    """
    ratio = width / height
    root = np.sqrt(np.float32(num_tokens / ratio))  # float32 square root, correctly rounded
    mh = max(int(root), 1)  # the official rule divides by zero below 1; never reached for real sizes
    if num_tokens % mh != 0:
        mh += 1
    return mh, num_tokens // mh


def resize_face_mask(face_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Face mask ``[1, 1, H, W_img]`` -> per-token weights ``[num_tokens]`` (float32).

    Bicubic resize (no antialias, so values may leave [0, 1]) to :func:`mask_token_grid`,
    flattened row-major, zero-padded or truncated to ``num_tokens`` with a warning.
    """
    height, width = face_mask.shape[-2:]
    mh, mw = mask_token_grid(num_tokens, height, width)
    small = F.interpolate(face_mask.float(), size=(mh, mw), mode=MASK_RESIZE_MODE,
                          align_corners=False)  # [1, 1, mh, mw]
    flat = small.flatten()  # [mh*mw], row-major
    if flat.numel() != num_tokens:
        logger.warning("face mask grid %dx%d has %d cells for %d tokens (image %dx%d): %s",
                       mh, mw, flat.numel(), num_tokens, width, height,
                       "zero-padding" if flat.numel() < num_tokens else "truncating")
        flat = F.pad(flat, (0, num_tokens - flat.numel())) if flat.numel() < num_tokens \
            else flat[:num_tokens]
    return flat


# ----------------------------------------------------------------------------------------------
# Per-call side channel and the audio attention processor
# ----------------------------------------------------------------------------------------------
@dataclass
class AudioCallContext:
    """What the audio processors read during one :meth:`SonicUNet.forward` call.

    All fields are ``None`` outside a call; ``clear()`` runs in the forward's ``finally``.
    """

    batch: int = 0  # B, rows of the UNet batch (CFG rows x stacked windows)
    groups: int = 1  # independent equal groups stacked along B (windows); see GroupedLinear
    audio_frames: torch.Tensor | None = None  # [B*W, K, D] per-frame tokens (spatial layers)
    audio_window: torch.Tensor | None = None  # [B, K, D] tokens mean-pooled over W (temporal)
    clip: torch.Tensor | None = None  # [B, T, D] CLIP context per row (temporal layers)
    face_mask: torch.Tensor | None = None  # [1 or G, 1, H, W_img] or None (no mask)
    audio_scale: float = 1.0
    mask_cache: dict[int, torch.Tensor] = field(default_factory=dict)  # N -> [1 or G, 1, N, 1]

    def clear(self) -> None:
        self.batch, self.groups, self.audio_scale = 0, 1, 1.0
        self.audio_frames = self.audio_window = self.clip = self.face_mask = None
        self.mask_cache = {}

    def token_mask(self, num_tokens: int, like: torch.Tensor) -> torch.Tensor | None:
        """Face mask at ``num_tokens`` query tokens as ``[G, 1, N, 1]`` in ``like``'s dtype/device
        (G = 1: one mask for every row; G = groups: one per group of rows, e.g. windows of
        different faces sharing a call). Each mask is resized on its own, as when it runs alone."""
        if self.face_mask is None:
            return None
        mask = self.mask_cache.get(num_tokens)
        if mask is None:
            mask = torch.stack([resize_face_mask(m[None], num_tokens) for m in self.face_mask])  # [G, N]
            mask = mask.to(device=like.device, dtype=like.dtype).view(-1, 1, num_tokens, 1)  # [G, 1, N, 1]
            self.mask_cache[num_tokens] = mask
        return mask


class GroupedLinear(nn.Linear):
    """A Linear that runs each stacked group (window) of its input separately.

    BLAS picks different kernels for different row counts, so a small GEMM over 3 rows and the
    same rows inside an 18-row GEMM can round differently. The UNet's small projections (time and
    motion embeddings, ``time_emb_proj``, the frame-position MLP, cross-attention context
    projections) are made of this class, so a window's output is the same whether it runs alone or
    stacked with others (``SonicUNet.forward(groups=...)``). Every UNet batch axis is window-major,
    so a group is a contiguous slice of dim 0. Same parameters and state-dict keys as ``nn.Linear``.
    """

    call_context: AudioCallContext | None = None  # set when installed (class attribute default)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.call_context.groups if self.call_context is not None else 1
        if groups <= 1 or x.shape[0] % groups:
            return super().forward(x)
        return torch.cat([super(GroupedLinear, self).forward(c) for c in x.chunk(groups)])  # same shape as x


def _attend(attn: Attention, query: torch.Tensor, to_k: nn.Module, to_v: nn.Module,
            context: torch.Tensor) -> torch.Tensor:
    """Multi-head ``softmax(q k^T * scale) v`` of projected ``query [n, L, C]`` over ``context [n, T, D]``.

    Returns ``[n, L, C]``. With a single context token the softmax is exactly 1, so the result is
    ``to_v(context)`` broadcast over the queries (a view, no attention kernel).
    """
    n, length, channels = query.shape
    tokens = context.shape[1]
    value = to_v(context)  # [n, T, C]
    if tokens == 1:
        return value.expand(n, length, channels)
    heads = attn.heads
    head_dim = channels // heads
    key = to_k(context)  # [n, T, C]
    q = query.view(n, length, heads, head_dim).transpose(1, 2)  # [n, heads, L, hd]
    k = key.view(n, tokens, heads, head_dim).transpose(1, 2)  # [n, heads, T, hd]
    v = value.view(n, tokens, heads, head_dim).transpose(1, 2)  # [n, heads, T, hd]
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # [n, heads, L, hd]
    return out.transpose(1, 2).reshape(n, length, channels)  # [n, L, C]


class SonicAudioAttnProcessor(nn.Module):
    """Cross-attention with an extra audio key/value branch (SPEC §5.3, §5.4).

    ``out = to_out(Attn(q, K(clip), V(clip)) + audio_scale * M * Attn(q, K_ip(audio), V_ip(audio)))``.
    Spatial layers: per-frame audio tokens, ``M`` = face mask at the layer's token grid.
    Temporal layers: window-mean audio tokens (§5.6), no mask. The sum is taken before ``to_out``.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, temporal: bool,
                 call_context: AudioCallContext):
        super().__init__()
        self.to_k_ip = nn.ModuleList([nn.Linear(cross_attention_dim, hidden_size, bias=False)])
        self.to_v_ip = nn.ModuleList([nn.Linear(cross_attention_dim, hidden_size, bias=False)])
        self.temporal = temporal
        self.call_context = call_context  # shared, not a module: no state-dict entries

    def extra_repr(self) -> str:
        return f"temporal={self.temporal}"

    def forward(self, attn: Attention, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.call_context
        if ctx.audio_frames is None:
            raise RuntimeError("the Sonic audio attention needs audio tokens: call SonicUNet.forward("
                               "..., audio_tokens=...) instead of the plain diffusers forward")
        if attention_mask is not None:
            raise ValueError("SonicAudioAttnProcessor does not support attention_mask; pass None")
        query = attn.to_q(hidden_states)  # [rows, L, C]
        rows, length, channels = query.shape
        mask = None
        if self.temporal:
            # rows are batch-major then spatial position, L = W frames; the audio/CLIP context is the
            # same for every position of a batch row, so attend with one row per batch row.
            query = query.view(ctx.batch, rows // ctx.batch * length, channels)  # [B, hw*W, C]
            context, audio = ctx.clip, ctx.audio_window  # [B, T, D], [B, K, D]
        else:
            if encoder_hidden_states is None:
                raise RuntimeError("spatial Sonic cross-attention called without a CLIP context")
            context, audio = encoder_hidden_states, ctx.audio_frames  # [B*W, T, D], [B*W, K, D]
            mask = ctx.token_mask(length, query)  # [G, 1, L, 1] or None
        out = _attend(attn, query, attn.to_k, attn.to_v, context)  # [n, L', C]
        audio_out = _attend(attn, query, self.to_k_ip[0], self.to_v_ip[0], audio)  # [n, L', C]
        # same operation order as the official processor: out + scale * (audio_out * M)
        if mask is not None and mask.shape[0] == 1:
            audio_out = audio_out * mask[0]  # [rows, L, C] x [1, L, 1]
        elif mask is not None:  # one mask per group: rows are group-major, each group rows // G of them
            grouped = audio_out.view(mask.shape[0], -1, length, channels)  # [G, rows/G, L, C]
            audio_out = (grouped * mask).view(rows, length, channels)  # [rows, L, C]
        if ctx.audio_scale != 1.0:
            audio_out = audio_out * ctx.audio_scale
        out = out + audio_out
        out = attn.to_out[1](attn.to_out[0](out))  # Linear + dropout
        return out.view(rows, length, channels)  # [rows, L, C]


def _check_plain_attention(name: str, attn: Attention) -> None:
    """The processor implements the plain SVD attention only; refuse anything else."""
    extras = {"spatial_norm": attn.spatial_norm is not None, "group_norm": attn.group_norm is not None,
              "norm_cross": attn.norm_cross is not None, "norm_q": attn.norm_q is not None,
              "norm_k": attn.norm_k is not None, "residual_connection": attn.residual_connection,
              "rescale_output_factor": attn.rescale_output_factor != 1.0}
    used = [k for k, v in extras.items() if v]
    if used:
        raise NotImplementedError(f"{name}: Sonic audio attention does not support {used}; "
                                  "use an SVD-xt style UNet config")


# ----------------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------------
class SonicUNet(UNetSpatioTemporalConditionModel):
    """SVD-xt spatio-temporal UNet with Sonic's audio cross-attention on every ``attn2``.

    Same constructor arguments as ``UNetSpatioTemporalConditionModel`` (so ``from_config``
    works); the 32 audio processors are installed at construction. ``attn1`` layers keep
    diffusers' default SDPA processor.
    """

    @functools.wraps(UNetSpatioTemporalConditionModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.audio_context = AudioCallContext()
        self._install_audio_processors()

    def _install_audio_processors(self) -> None:
        installed = 0
        for name, module in self.named_modules():
            if not (isinstance(module, Attention) and name.endswith("attn2")):
                continue
            _check_plain_attention(name, module)
            proc = SonicAudioAttnProcessor(
                hidden_size=module.to_k.out_features, cross_attention_dim=module.to_k.in_features,
                temporal=TEMPORAL_MARKER in f".{name}.", call_context=self.audio_context,
            ).to(device=module.to_k.weight.device, dtype=module.to_k.weight.dtype)
            with torch.no_grad():  # official initialisation; the Sonic checkpoint overwrites it
                proc.to_k_ip[0].weight.copy_(module.to_k.weight)
                proc.to_v_ip[0].weight.copy_(module.to_v.weight)
            module.set_processor(proc)
            installed += 1
        if installed == 0:
            raise ValueError("this UNet config has no cross-attention (attn2) layers for the audio branch")
        self._group_small_linears()

    def _group_small_linears(self) -> None:
        """Make the row-count-sensitive small projections window-invariant (see GroupedLinear)."""
        small = [self.time_embedding.linear_1, self.time_embedding.linear_2, self.add_embedding.linear_1,
                 self.add_embedding.linear_2]
        for name, module in self.named_modules():
            if name.endswith("time_emb_proj") and isinstance(module, nn.Linear):
                small.append(module)
            elif name.endswith("time_pos_embed"):  # frame-position MLP over B*W rows
                small += [module.linear_1, module.linear_2]
            elif isinstance(module, Attention) and name.endswith("attn2"):
                small += [module.to_k, module.to_v, module.processor.to_k_ip[0], module.processor.to_v_ip[0]]
        for linear in small:
            linear.__class__ = GroupedLinear  # same weights and keys; only forward changes
            linear.call_context = self.audio_context

    def audio_processors(self) -> dict[str, SonicAudioAttnProcessor]:
        """Name -> audio processor, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``."""
        return {name: mod.processor for name, mod in self.named_modules()
                if isinstance(mod, Attention) and isinstance(mod.processor, SonicAudioAttnProcessor)}

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        *,
        audio_tokens: torch.Tensor,
        face_mask: torch.Tensor | None = None,
        audio_scale: float = 1.0,
        groups: int = 1,
    ) -> torch.Tensor:
        """Predict v for a batch of windows.

        Args:
            sample: ``[B, W, 8, h, w]`` scaled noisy latents ++ image latents. B is any number of
                rows (3 CFG rows per window, several windows may be stacked).
            timestep: float scalar tensor (or float) or ``[B]``.
            encoder_hidden_states: ``[B, 1, D]`` CLIP image context, one token per row (repeated
                for every frame).
            added_time_ids: ``[B, 3]`` ``[fps, bucket0, bucket1]``.
            audio_tokens: ``[B, W, K, D]`` audio tokens per frame.
            face_mask: ``[1, 1, H, W_img]`` float face mask at pixel resolution, or None (no mask);
                ``[groups, 1, H, W_img]``: one mask per group (windows of different faces in one call).
            audio_scale: weight of the audio branch in every ``attn2`` (official ip_audio_scale).
            groups: B holds this many independent equal groups (stacked windows): small
                projections run per group so each group's output equals running it alone.

        Returns:
            ``[B, W, 4, h, w]`` model output (v-prediction).
        """
        self._check_inputs(sample, encoder_hidden_states, added_time_ids, audio_tokens, face_mask)
        batch, frames = sample.shape[:2]
        encoder_hidden_states = encoder_hidden_states.to(device=sample.device, dtype=sample.dtype)
        audio_tokens = audio_tokens.to(device=sample.device, dtype=sample.dtype)
        ctx = self.audio_context
        try:
            ctx.batch = batch
            if groups < 1 or batch % groups:
                raise ValueError(f"groups={groups} must divide the batch {batch}")
            if face_mask is not None and face_mask.shape[0] not in (1, groups):
                raise ValueError(f"face_mask has {face_mask.shape[0]} masks for groups={groups}: give one "
                                 "mask [1, 1, H, W_img] or one per group")
            ctx.groups = int(groups)
            ctx.audio_frames = audio_tokens.flatten(0, 1)  # [B*W, K, D], batch-major
            ctx.audio_window = audio_tokens.mean(dim=1)  # [B, K, D], mean over the window's frames
            ctx.clip = encoder_hidden_states  # [B, T, D]
            ctx.face_mask = None if face_mask is None else face_mask.to(sample.device)
            ctx.audio_scale = float(audio_scale)
            return super().forward(sample, timestep, encoder_hidden_states, added_time_ids,
                                   return_dict=False)[0]
        finally:
            ctx.clear()

    @staticmethod
    def _check_inputs(sample, encoder_hidden_states, added_time_ids, audio_tokens, face_mask) -> None:
        if sample.ndim != 5:
            raise ValueError(f"sample must be [B, W, C, h, w], got shape {tuple(sample.shape)}")
        batch, frames = sample.shape[:2]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states must be [B={batch}, 1, D] (one CLIP row per batch "
                             f"row), got shape {tuple(encoder_hidden_states.shape)}")
        if audio_tokens.ndim != 4 or tuple(audio_tokens.shape[:2]) != (batch, frames):
            raise ValueError(f"audio_tokens must be [B={batch}, W={frames}, K, D], "
                             f"got shape {tuple(audio_tokens.shape)}")
        if audio_tokens.shape[-1] != encoder_hidden_states.shape[-1]:
            raise ValueError(f"audio_tokens width {audio_tokens.shape[-1]} != CLIP context width "
                             f"{encoder_hidden_states.shape[-1]}")
        if added_time_ids.ndim != 2 or added_time_ids.shape[0] != batch:
            raise ValueError(f"added_time_ids must be [B={batch}, 3], got shape {tuple(added_time_ids.shape)}")
        if face_mask is not None and (face_mask.ndim != 4 or face_mask.shape[1] != 1):
            raise ValueError("face_mask must be [1, 1, H, W_img] or [groups, 1, H, W_img] (or None for no "
                             f"mask), got shape {tuple(face_mask.shape)}")


# ----------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None) -> dict:
    """UNet config dict: the shipped SVD-xt config (None), a ``config.json``, or a folder holding one."""
    p = SVD_XT_UNET_CONFIG if path is None else Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"UNet config {p} not found; pass a diffusers unet config.json, its "
                                "folder, or None for the built-in SVD-xt config")
    return json.loads(p.read_text())


def build_sonic_unet(config: dict | None = None) -> SonicUNet:
    """A :class:`SonicUNet` from a diffusers config dict (None = SVD-xt), randomly initialised.

    Keys that are not constructor arguments (``_class_name``, ``_diffusers_version``, ...) are
    dropped. Build under ``with torch.device("meta"):`` to allocate nothing before loading weights.
    """
    config = load_config(None) if config is None else config
    accepted = set(inspect.signature(UNetSpatioTemporalConditionModel.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if k not in accepted and not k.startswith("_"))
    if unknown:
        logger.warning("ignoring UNet config keys that are not constructor arguments: %s", unknown)
    return SonicUNet(**{k: v for k, v in config.items() if k in accepted})
