"""Tensor and expert parallelism: which slice of every parameter one rank holds.

The default follows SGLang and vLLM: **expert parallelism lives inside the tensor-parallel
group**. With ``tp_size=8, ep_size=8`` there are 8 processes; attention, the dense MLP,
the shared expert, the embedding and the head are split 8 ways by ``tp_rank``; routed
experts are split 8 ways by expert (``ep_rank = tp_rank // (tp_size // ep_size)``) and
each expert is sliced ``moe_tp_size = tp_size // ep_size`` ways (here: not at all). With
``ep_size`` larger than ``tp_size`` (data-parallel attention, as vLLM's ``--enable-expert-
parallel`` with DP > 1) the group has ``ep_size`` ranks, ``ep_rank`` must be given and
``tp_rank = ep_rank % tp_size``; experts are not sliced.

``independent=True`` keeps the older convention where TP and EP are separate axes
(``tp_size * ep_size`` ranks; experts both split by ``ep_rank`` and sliced ``tp_size``
ways). Everything is validated up front, before any byte is read: :meth:`ParallelLayout.check`
names the dimension and the divisor that do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError
from .registry import format_of

__all__ = ["ParallelLayout"]


def _int(key: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidArgumentError(f"{key} must be an int >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class ParallelLayout:
    """One rank of a parallel layout (build it with :meth:`of`)."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    #: how many ways each routed expert is sliced, and this rank's slice
    moe_tp_size: int = 1
    moe_tp_rank: int = 0
    independent: bool = False

    @classmethod
    def of(
        cls,
        tp_rank: int = 0,
        tp_size: int = 1,
        ep_rank: int | None = None,
        ep_size: int = 1,
        *,
        independent: bool = False,
    ) -> ParallelLayout:
        """Validates the numbers and derives the expert-parallel rank and slice."""
        tp_size, ep_size = _int("tp_size", tp_size, 1), _int("ep_size", ep_size, 1)
        tp_rank = _int("tp_rank", tp_rank, 0)
        if ep_rank is not None:
            ep_rank = _int("ep_rank", ep_rank, 0)
        if tp_rank >= tp_size:
            raise InvalidArgumentError(f"tp_rank={tp_rank} is not a rank of tp_size={tp_size}")
        if ep_rank is not None and ep_rank >= ep_size:
            raise InvalidArgumentError(f"ep_rank={ep_rank} is not a rank of ep_size={ep_size}")
        if independent:
            return cls(tp_size, tp_rank, ep_size, ep_rank or 0, tp_size, tp_rank, True)
        if ep_size <= tp_size:
            if tp_size % ep_size:
                raise InvalidArgumentError(
                    f"ep_size={ep_size} must divide tp_size={tp_size}: expert parallelism lives inside the "
                    "tensor-parallel group (pass independent=True for separate axes)"
                )
            moe_tp = tp_size // ep_size
            derived = tp_rank // moe_tp
            if ep_rank is not None and ep_rank != derived:
                raise InvalidArgumentError(
                    f"ep_rank={ep_rank} does not match tp_rank={tp_rank}: with tp_size={tp_size} and "
                    f"ep_size={ep_size}, tp rank {tp_rank} holds expert group {derived} (or omit ep_rank)"
                )
            return cls(tp_size, tp_rank, ep_size, derived, moe_tp, tp_rank % moe_tp)
        if ep_size % tp_size:
            raise InvalidArgumentError(f"tp_size={tp_size} must divide ep_size={ep_size} (data-parallel attention)")
        if ep_rank is None:
            raise InvalidArgumentError(
                f"ep_size={ep_size} > tp_size={tp_size}: give ep_rank (this rank's place "
                "among the ep_size expert-parallel ranks)"
            )
        if ep_rank % tp_size != tp_rank:
            raise InvalidArgumentError(
                f"tp_rank={tp_rank} does not match ep_rank={ep_rank}: with data-parallel "
                f"attention it is ep_rank % tp_size = {ep_rank % tp_size}"
            )
        return cls(tp_size, tp_rank, ep_size, ep_rank, 1, 0)

    @classmethod
    def coerce(cls, value: Any) -> ParallelLayout:
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if isinstance(value, dict):
            return cls.of(**value)
        raise InvalidArgumentError(f"parallel must be a ParallelLayout or a dict of its arguments, got {value!r}")

    def check(
        self,
        config: dict[str, Any],
        *,
        formats: dict[str, str] | None = None,
        group: int = 32,
        fp8_block: tuple[int, int] = (128, 128),
    ) -> None:
        """Checks that the model described by the text ``config`` splits evenly on this
        layout: heads, vocabulary, the dense and shared MLPs by ``tp_size``, routed experts
        by ``ep_size``, the expert MLP by ``moe_tp_size``; and that every split dimension
        of a quantized part keeps whole quantization groups / FP8 blocks. ``formats`` maps
        ``attention`` / ``dense`` / ``experts`` / ``shared`` to a format name (default
        ``bf16``). Raises :class:`InvalidArgumentError` naming the dimension and divisor;
        the planner then checks every tensor's own slice."""
        formats = formats or {}
        tp, moe_tp, ep = self.tp_size, self.moe_tp_size, self.ep_size
        heads = config.get("num_attention_heads") or 0
        experts = config.get("n_routed_experts") or 0
        if experts and experts % ep:
            raise InvalidArgumentError(f"n_routed_experts ({experts}) is not divisible by ep_size={ep}")
        if not experts and ep > 1:
            raise InvalidArgumentError(f"ep_size={ep} for a model without routed experts")
        moe = config.get("moe_intermediate_size") if experts else None
        dense = config.get("intermediate_size") if (config.get("first_k_dense_replace") or not experts) else None
        shared = moe * config["n_shared_experts"] if moe and config.get("n_shared_experts") else None
        nope, rope, v = (config.get(k) or 0 for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))

        def align(part: str, column: bool) -> int:
            return format_of(formats.get(part, "bf16")).split_alignment(column, group=group, fp8_block=fp8_block)

        # (what, size, ways, divisor name, alignment of the local slice)
        dims = [
            ("num_attention_heads", heads, tp, "tp_size", 1),
            ("num_key_value_heads", config.get("num_key_value_heads") or heads, tp, "tp_size", 1),
            ("vocab_size", config.get("vocab_size") or 0, tp, "tp_size", 1),
            (
                "q_b_proj rows (num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim))",
                heads * (nope + rope),
                tp,
                "tp_size",
                align("attention", True),
            ),
            (
                "kv_b_proj rows (num_attention_heads * (qk_nope_head_dim + v_head_dim))",
                heads * (nope + v),
                tp,
                "tp_size",
                align("attention", True),
            ),
            ("o_proj columns (num_attention_heads * v_head_dim)", heads * v, tp, "tp_size", align("attention", False)),
        ]
        for what, size, part in (
            ("intermediate_size", dense, "dense"),
            ("moe_intermediate_size", moe, "experts"),
            ("shared expert intermediate size", shared, "shared"),
        ):
            if size:
                ways, name = (moe_tp, "moe_tp_size") if part == "experts" else (tp, "tp_size")
                dims.append((what, size, ways, name, max(align(part, True), align(part, False))))
        for what, size, ways, name, unit in dims:
            if ways == 1 or not size:
                continue
            if size % ways:
                raise InvalidArgumentError(f"{what} ({size}) is not divisible by {name}={ways}")
            if (size // ways) % unit:
                raise InvalidArgumentError(
                    f"{what} ({size}) split {name}={ways} ways gives {size // ways}, not a "
                    f"multiple of the quantization group / block {unit}"
                )
