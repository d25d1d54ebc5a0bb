"""Parameter layouts of quantized linears, per checkpoint format, as serving engines
hold them (one tensor per checkpoint suffix; stacked and expert parameters concatenate
their shards along dim 0)."""

from __future__ import annotations

import math
from typing import Any

import torch

#: Kimi-K2.5 names its language model ``language_model.model.*`` (some exports
#: ``language_model.layers.*``) and its head ``language_model.lm_head``: rewrite to the
#: plain DeepSeek-V3 names (first match wins).
KIMI_PREFIX_REWRITES = (("language_model.model.", "model."), ("language_model.layers.", "model.layers."),
                        ("language_model.", ""))

#: A declared skip shared by every model: rope frequencies are recomputed, never loaded.
ROPE_IGNORE = (None, "rotary_emb.inv_freq", "rope frequencies are recomputed")

#: With ``tie_word_embeddings`` a stored head is not loaded (the head is the embedding).
TIED_IGNORE = ("lm_head.", None, "lm_head is tied to embed_tokens (tie_word_embeddings)")

#: dtype of each quantized tensor suffix; ``None`` means the model's dtype
SUFFIX_DTYPES: dict[str, dict[str, torch.dtype | None]] = {
    "bf16": {"weight": None},
    "ct-int4": {"weight_packed": torch.int32, "weight_scale": torch.bfloat16, "weight_shape": torch.int32},
    "quark-mxfp4": {"weight": torch.uint8, "weight_scale": torch.uint8},
    "fp8-block": {"weight": torch.float8_e4m3fn, "weight_scale_inv": torch.float32},
}


def shard_shapes(fmt: str, out: int, inp: int, *, split: str = "replicated", tp: int = 1,
                 fp8_block: tuple[int, int] = (128, 128), group: int | None = None) -> dict[str, list[int]]:
    """Local shapes, per suffix, of one checkpoint linear ``[out, inp]`` on one TP rank
    (``group``: the int4 / MXFP4 group size, 32 by default). A compressed-tensors
    ``weight_shape`` has no destination: the planner checks it against the packed weight."""
    g = group or 32
    col, row = split == "column", split == "row"
    o = out // tp if col else out
    i = inp // tp if row else inp
    if fmt == "bf16":
        return {"weight": [o, i]}
    if fmt == "ct-int4":
        return {"weight_packed": [o, i // 8], "weight_scale": [o, i // g]}
    if fmt == "quark-mxfp4":
        return {"weight": [o, i // 2], "weight_scale": [o, i // g]}
    if fmt == "fp8-block":
        so, si = math.ceil(out / fp8_block[0]), math.ceil(inp / fp8_block[1])
        return {"weight": [o, i], "weight_scale_inv": [so // tp if col else so, si // tp if row else si]}
    raise ValueError(f"unknown format {fmt!r}")


def stacked_shapes(fmt: str, shards: list[tuple[int, int]], **kw: Any) -> tuple[dict[str, list[int]],
                                                                                  dict[str, list[int]]]:
    """Shapes of a parameter stacking ``shards`` (each ``(out, inp)``) along dim 0, and the
    rows each shard takes in each of them (what the planner checks every piece against)."""
    parts = [shard_shapes(fmt, o, i, **kw) for o, i in shards]
    out, rows = {}, {}
    for suffix in parts[0]:
        shapes = [p[suffix] for p in parts]
        out[suffix] = [sum(s[0] for s in shapes), *shapes[0][1:]]
        rows[suffix] = [s[0] for s in shapes]
    return out, rows


def empty_params(module: torch.nn.Module, fmt: str, shapes: dict[str, list[int]], dtype: torch.dtype,
                 prefix: str = "", device: Any = None) -> None:
    """Registers one frozen parameter per suffix (``prefix + suffix``) on ``module``."""
    for suffix, shape in shapes.items():
        dt = SUFFIX_DTYPES[fmt][suffix] or dtype
        module.register_parameter(prefix + suffix, torch.nn.Parameter(
            torch.empty(shape, dtype=dt, device=device), requires_grad=False))
