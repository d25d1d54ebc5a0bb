"""Parameter layouts of quantized linears, per checkpoint format, as serving engines
hold them (one tensor per checkpoint suffix; stacked and expert parameters concatenate
their shards along dim 0)."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import format_of
from ..rules import Split

#: Kimi-K2.5 names its language model ``language_model.model.*`` (some exports
#: ``language_model.layers.*``) and its head ``language_model.lm_head``: rewrite to the
#: plain DeepSeek-V3 names (first match wins).
KIMI_PREFIX_REWRITES = (
    ("language_model.model.", "model."),
    ("language_model.layers.", "model.layers."),
    ("language_model.", ""),
)

#: The TP split of the serving layouts (SGLang's and vLLM's names alike): heads and MLP
#: rows column-parallel, the projections back row-parallel, vocab-parallel embedding/head
SERVING_TP_RULES = (
    ("q_b_proj.", Split.COLUMN),
    ("q_proj.", Split.COLUMN),
    ("kv_b_proj.", Split.COLUMN),
    ("o_proj.", Split.ROW),
    ("gate_up_proj.", Split.COLUMN),
    ("down_proj.", Split.ROW),
    ("embed_tokens.", Split.COLUMN),
    ("lm_head.", Split.COLUMN),
)

#: A declared skip shared by every model: rope frequencies are recomputed, never loaded.
ROPE_IGNORE = (None, "rotary_emb.inv_freq", "rope frequencies are recomputed")

#: With ``tie_word_embeddings`` a stored head is not loaded (the head is the embedding).
TIED_IGNORE = ("lm_head.", None, "lm_head is tied to embed_tokens (tie_word_embeddings)")


def shard_shapes(fmt: str, out: int, inp: int, **kw: Any) -> dict[str, list[int]]:
    """Local shapes, per suffix, of one checkpoint linear ``[out, inp]`` on one TP rank
    (``split``, ``tp``, ``fp8_block``, ``group``: see :meth:`~kimi_loader.registry.Format.shard_shapes`).
    A compressed-tensors ``weight_shape`` has no destination: the planner checks it
    against the packed weight."""
    return format_of(fmt).shard_shapes(out, inp, **kw)


def stacked_shapes(
    fmt: str, shards: list[tuple[int, int]], **kw: Any
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Shapes of a parameter stacking ``shards`` (each ``(out, inp)``) along dim 0, and the
    rows each shard takes in each of them (what the planner checks every piece against)."""
    parts = [shard_shapes(fmt, o, i, **kw) for o, i in shards]
    out, rows = {}, {}
    for suffix in parts[0]:
        shapes = [p[suffix] for p in parts]
        out[suffix] = [sum(s[0] for s in shapes), *shapes[0][1:]]
        rows[suffix] = [s[0] for s in shapes]
    return out, rows


def empty_params(
    module: torch.nn.Module,
    fmt: str,
    shapes: dict[str, list[int]],
    dtype: torch.dtype,
    prefix: str = "",
    device: Any = None,
) -> None:
    """Registers one frozen parameter per suffix (``prefix + suffix``) on ``module``."""
    for suffix, shape in shapes.items():
        dt = format_of(fmt).suffix_dtypes[suffix] or dtype
        module.register_parameter(
            prefix + suffix, torch.nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False)
        )
