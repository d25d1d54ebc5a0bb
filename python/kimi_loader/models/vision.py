"""Kimi-K2.5's vision side in checkpoint layout: the MoonViT tower and the patch-merger
projector, their parameters named exactly as the checkpoint names them (so the copy plan
is plain copies / conversions: fused ``wqkv`` with bias, interleaved-pair 2-D RoPE, as
vLLM and SGLang hold them), and their forward pass.

- patch embedding: ``Conv2d(3 -> D, p x p)`` applied to each flattened patch
  (``pixel_values`` ``[patches, 3, p, p]``), plus the learned ``[H0, W0, D]`` position table
  resampled bicubically (``align_corners=False``) to each image's ``(h, w)`` grid, plus a
  fixed sin/cos table per frame for clips of more than one frame;
- pre-LayerNorm blocks: bidirectional attention within each image / clip (never across
  images), 2-D RoPE on interleaved pairs (pair ``j`` rotates by column x ``f[j // 2]`` when
  ``j`` is even, row x ``f[j // 2]`` when odd; ``f = theta^(-4k / head_dim)``), GELU-tanh MLP;
- final LayerNorm, 2x2 merge with the frames averaged, projector ``LayerNorm -> Linear ->
  GELU(erf) -> Linear`` to the language model's hidden size: one language token per
  merged patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InvalidArgumentError

__all__ = ["KimiProjector", "MoonViT", "VisionConfig", "encode_images"]


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    patch_size: int
    pos_emb_height: int
    pos_emb_width: int
    pos_emb_time: int
    merge_kernel: tuple[int, int]
    projector_eps: float
    text_hidden_size: int
    rope_theta: float = 10000.0

    @classmethod
    def parse(cls, raw: dict[str, Any], text_hidden_size: int) -> VisionConfig:
        """From a Kimi-K2.5 ``config.json``: the hub's ``vision_config`` keys (``vt_*``,
        ``init_pos_emb_*``, ``projector_ln_eps``) first, transformers' names as the fallback."""
        vc = raw.get("vision_config")
        if not isinstance(vc, dict):
            raise ConfigError("a Kimi-K2.5 config needs a 'vision_config' object (or load with text_only=True)")

        def key(*names: str, default: Any = None) -> Any:
            for n in names:
                if vc.get(n) is not None:
                    return vc[n]
            if default is None:
                raise ConfigError(f"vision_config: none of {', '.join(names)} is set")
            return default

        merge = key("merge_kernel_size", default=[2, 2])
        merge = (merge, merge) if isinstance(merge, int) else (int(merge[0]), int(merge[1]))
        rope = vc.get("rope_parameters") or {}
        out = cls(
            hidden_size=int(key("vt_hidden_size", "hidden_size")),
            num_heads=int(key("vt_num_attention_heads", "num_attention_heads")),
            num_layers=int(key("vt_num_hidden_layers", "num_hidden_layers")),
            intermediate_size=int(key("vt_intermediate_size", "intermediate_size")),
            patch_size=int(key("patch_size", default=14)),
            pos_emb_height=int(key("init_pos_emb_height", "pos_emb_height", default=64)),
            pos_emb_width=int(key("init_pos_emb_width", "pos_emb_width", default=64)),
            pos_emb_time=int(key("init_pos_emb_time", "pos_emb_time", default=4)),
            merge_kernel=merge,
            projector_eps=float(vc.get("projector_ln_eps") or raw.get("projection_layer_norm_eps") or 1e-5),
            text_hidden_size=text_hidden_size,
            rope_theta=float(rope.get("rope_theta") or vc.get("rope_theta") or 10000.0),
        )
        head_dim = out.hidden_size // max(out.num_heads, 1)
        if out.hidden_size % out.num_heads or head_dim % 4:
            raise ConfigError(
                f"vision_config: hidden size {out.hidden_size} over {out.num_heads} heads must give a head dim "
                "divisible by 4 (2-D RoPE)"
            )
        return out


class _Params(nn.Module):
    """Holds parameters named as the checkpoint names them."""


def _param(m: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> None:
    m.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False))


def _linear(out: int, inp: int, dtype: torch.dtype, device: Any, bias: bool = True) -> _Params:
    m = _Params()
    _param(m, "weight", (out, inp), dtype, device)
    if bias:
        _param(m, "bias", (out,), dtype, device)
    return m


def _layer_norm(n: int, dtype: torch.dtype, device: Any) -> _Params:
    m = _Params()
    _param(m, "weight", (n,), dtype, device)
    _param(m, "bias", (n,), dtype, device)
    return m


class MoonViT(nn.Module):
    """The tower's parameters (``vision_tower.*`` in the checkpoint)."""

    def __init__(self, vc: VisionConfig, dtype: torch.dtype, device: Any = None) -> None:
        super().__init__()
        d, p = vc.hidden_size, vc.patch_size
        self.patch_embed = _Params()
        self.patch_embed.proj = _linear(d, 3 * p * p, dtype, device)
        self.patch_embed.proj.weight = nn.Parameter(
            torch.empty(d, 3, p, p, dtype=dtype, device=device), requires_grad=False
        )
        self.patch_embed.pos_emb = _Params()
        _param(self.patch_embed.pos_emb, "weight", (vc.pos_emb_height, vc.pos_emb_width, d), dtype, device)
        self.encoder = _Params()
        self.encoder.blocks = nn.ModuleList()
        for _ in range(vc.num_layers):
            b = _Params()
            b.norm0 = _layer_norm(d, dtype, device)
            b.norm1 = _layer_norm(d, dtype, device)
            b.wqkv = _linear(3 * d, d, dtype, device)
            b.wo = _linear(d, d, dtype, device)
            b.mlp = _Params()
            b.mlp.fc0 = _linear(vc.intermediate_size, d, dtype, device)
            b.mlp.fc1 = _linear(d, vc.intermediate_size, dtype, device)
            self.encoder.blocks.append(b)
        self.encoder.final_layernorm = _layer_norm(d, dtype, device)


class KimiProjector(nn.Module):
    """The patch-merger projector's parameters (``mm_projector.*``): ``pre_norm``,
    ``proj.0`` and ``proj.2`` (a GELU between them)."""

    def __init__(self, vc: VisionConfig, dtype: torch.dtype, device: Any = None) -> None:
        super().__init__()
        merged = vc.hidden_size * vc.merge_kernel[0] * vc.merge_kernel[1]
        self.pre_norm = _layer_norm(vc.hidden_size, dtype, device)
        self.proj = nn.ModuleList(
            [_linear(merged, merged, dtype, device), nn.GELU(), _linear(vc.text_hidden_size, merged, dtype, device)]
        )


# -- transformers' layout ------------------------------------------------------------------
#: checkpoint name -> transformers' ``Kimi_K25ForConditionalGeneration`` name (regex, first
#: match wins); the fused ``wqkv`` becomes ``attn.wqkv`` and is cut by
#: :func:`transformers_unfused`
TRANSFORMERS_RENAMES = (
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.norm0\.", r"model.vision_tower.layers.\1.norm1."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.norm1\.", r"model.vision_tower.layers.\1.norm2."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc0\.", r"model.vision_tower.layers.\1.mlp.fc1."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc1\.", r"model.vision_tower.layers.\1.mlp.fc2."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.wo\.", r"model.vision_tower.layers.\1.attn.proj."),
    (r"^vision_tower\.encoder\.blocks\.(\d+)\.wqkv\.", r"model.vision_tower.layers.\1.attn.wqkv."),
    (r"^vision_tower\.encoder\.final_layernorm\.", "model.vision_tower.final_layernorm."),
    (r"^vision_tower\.patch_embed\.pos_emb\.weight$", "model.vision_tower.patch_embed.pos_emb.position_embeddings"),
    (r"^vision_tower\.patch_embed\.proj\.", "model.vision_tower.patch_embed.proj."),
    (r"^mm_projector\.pre_norm\.", "model.mm_projector.pre_norm."),
    (r"^mm_projector\.proj\.0\.", "model.mm_projector.in_proj."),
    (r"^mm_projector\.proj\.2\.", "model.mm_projector.out_proj."),
)


def transformers_name(name: str) -> str:
    """A checkpoint vision / projector name as transformers names it (others unchanged)."""
    import re

    for pattern, repl in TRANSFORMERS_RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def transformers_unfused(heads: int) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """The unfuse rule of ``wqkv``: q and k rows reordered per head for rotate-half RoPE
    (transformers' layout), v as it is."""
    return ((".attn.wqkv.", ((".attn.q_proj.", heads), (".attn.k_proj.", heads), (".attn.v_proj.", 0))),)


# -- the forward pass ------------------------------------------------------------------------
def _check_grid(pixel_values: torch.Tensor, grid_thw: torch.Tensor, vc: VisionConfig) -> list[tuple[int, int, int]]:
    p = vc.patch_size
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
        raise InvalidArgumentError(f"pixel_values must be [patches, 3, {p}, {p}], got {tuple(pixel_values.shape)}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise InvalidArgumentError(f"image_grid_thw must be [images, 3] (t, h, w), got {tuple(grid_thw.shape)}")
    grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]
    kh, kw = vc.merge_kernel
    for t, h, w in grids:
        if t < 1 or h < 1 or w < 1 or h % kh or w % kw:
            raise InvalidArgumentError(
                f"image grid (t={t}, h={h}, w={w}): each must be >= 1 and h, w multiples of the merge kernel {kh}x{kw}"
            )
    total = sum(t * h * w for t, h, w in grids)
    if total != pixel_values.shape[0]:
        raise InvalidArgumentError(f"image_grid_thw covers {total} patches, pixel_values has {pixel_values.shape[0]}")
    return grids


def _positions(tower: Any, grids: list[tuple[int, int, int]], vc: VisionConfig) -> torch.Tensor:
    """The learned table resampled per image, plus the per-frame sin/cos of clips."""
    table = tower.patch_embed.pos_emb.weight
    d = table.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=table.device) / d))
    out = []
    for t, h, w in grids:
        if (h, w) == (vc.pos_emb_height, vc.pos_emb_width):
            grid = table.float()
        else:
            grid = F.interpolate(
                table.float().permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False
            )[0].permute(1, 2, 0)
        pos = grid.reshape(1, h * w, d).expand(t, h * w, d)
        if t > 1:  # frame f adds sin/cos(f)
            f = torch.outer(torch.arange(t, dtype=torch.float32, device=table.device), inv)
            pos = pos + torch.cat([f.sin(), f.cos()], dim=-1)[:, None, :]
        out.append(pos.reshape(t * h * w, d))
    return torch.cat(out)


def _rope_angles(grids: list[tuple[int, int, int]], head_dim: int, theta: float, device: Any) -> torch.Tensor:
    """``[patches, head_dim / 2]`` angles: pair ``j`` turns by column (j even) or row (j
    odd) times ``theta^(-4 (j // 2) / head_dim)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32, device=device) / head_dim))
    out = []
    for t, h, w in grids:
        rows = torch.arange(h, device=device).repeat_interleave(w).float()
        cols = torch.arange(w, device=device).repeat(h).float()
        ang = torch.stack([cols[:, None] * freqs, rows[:, None] * freqs], dim=-1).reshape(h * w, -1)
        out.append(ang.repeat(t, 1))
    return torch.cat(out)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs of ``x`` ``[n, heads, head_dim]`` (float32), in place of
    each pair."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def _ln(x: torch.Tensor, m: Any, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), m.weight, m.bias, eps)


def _lin(x: torch.Tensor, m: Any) -> torch.Tensor:
    return F.linear(x, m.weight, m.bias)


def encode_images(
    tower: Any, projector: Any, vc: VisionConfig, pixel_values: torch.Tensor, grid_thw: torch.Tensor
) -> torch.Tensor:
    """Language-model embeddings ``[merged patches, text hidden]`` of the images / clips in
    ``pixel_values`` (``[patches, 3, p, p]``, image after image, frame after frame, rows of
    patches) with grids ``grid_thw`` ``[n, 3]``, in the tower's dtype."""
    grids = _check_grid(pixel_values, grid_thw, vc)
    w = tower.patch_embed.proj.weight
    dtype, d, heads = w.dtype, vc.hidden_size, vc.num_heads
    hd = d // heads
    x = F.linear(pixel_values.to(dtype).flatten(1), w.flatten(1), tower.patch_embed.proj.bias)
    x = (x.float() + _positions(tower, grids, vc)).to(dtype)
    ang = _rope_angles(grids, hd, vc.rope_theta, x.device)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    lengths = [t * h * w for t, h, w in grids]
    for blk in tower.encoder.blocks:
        q, k, v = _lin(_ln(x, blk.norm0, 1e-5), blk.wqkv).view(-1, 3, heads, hd).unbind(1)
        q = _rope(q.float(), cos, sin).to(dtype)
        k = _rope(k.float(), cos, sin).to(dtype)
        outs = []
        for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
            # each image / clip attends within itself only (bidirectional)
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            outs.append(o.transpose(0, 1))
        x = x + _lin(torch.cat(outs).reshape(-1, d), blk.wo)
        hmid = F.gelu(_lin(_ln(x, blk.norm1, 1e-5), blk.mlp.fc0), approximate="tanh")
        x = x + _lin(hmid, blk.mlp.fc1)
    x = _ln(x, tower.encoder.final_layernorm, 1e-5)
    kh, kw = vc.merge_kernel
    merged = []
    for seq, (t, h, w) in zip(x.split(lengths), grids, strict=True):
        g = seq.view(t, h // kh, kh, w // kw, kw, d).permute(1, 3, 0, 2, 4, 5)
        merged.append(g.reshape((h // kh) * (w // kw), t, kh * kw, d).mean(dim=1))
    y = _ln(torch.cat(merged), projector.pre_norm, vc.projector_eps).reshape(-1, kh * kw * d)
    return _lin(F.gelu(_lin(y, projector.proj[0])), projector.proj[2])


def splice(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, placeholder: int) -> torch.Tensor:
    """``embeds`` ``[B, T, H]`` with the positions of ``placeholder`` tokens replaced, in
    order, by the rows of ``features``; their counts must match."""
    mask = input_ids == placeholder
    n = int(mask.sum())
    if n != features.shape[0]:
        raise InvalidArgumentError(
            f"the input has {n} image placeholder tokens (id {placeholder}), the images give "
            f"{features.shape[0]} features (one per merged patch)"
        )
    return embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))
