"""The naming rules a model declares, typed.

A model states how checkpoint names map to its parameters in two ways: the weight-hook
protocol (``stacked_params_mapping``, ``expert_params_mapping``, rename hooks; see
:mod:`kimi_loader.hooks`) and :class:`WeightRules`, the rest as data (prefix rewrites,
declared skips, layer counts, TP splits, ...). :func:`kimi_loader.loader.build_rules`
combines both with the parallel layout into :class:`PlannerRules`, the one object that
crosses into the Rust planner (``PlannerRules.to_core()``; the extension rejects any key
it does not know, naming it).

Nobody pops keys from a dict: a misspelt field is a ``TypeError`` at construction for
the dataclasses and an :class:`~kimi_loader.errors.InvalidArgumentError` naming the key
for a model that still returns a plain dict from ``weight_rules()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from .errors import InvalidArgumentError
from .parallel import ParallelLayout

__all__ = ["ExpertShard", "IgnoreRule", "PlannerRules", "Split", "WeightRules"]


class Split(StrEnum):
    """How a parameter is split across tensor-parallel ranks."""

    REPLICATED = "replicated"
    COLUMN = "column"  # the output dim (dim 0 of the stored tensor)
    ROW = "row"  # the input dim (dim 1)

    @classmethod
    def parse(cls, value: Any, where: str) -> Split:
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgumentError(
                f"{where}: unknown TP split {value!r} (one of {', '.join(s.value for s in cls)})"
            ) from None


class ExpertShard(StrEnum):
    """The shard ids of ``expert_params_mapping`` (vLLM / SGLang): ``w1`` (gate) and ``w3``
    (up) stack into ``w13`` as its first and second half, split on the output dim;
    ``w2`` (down) is split on the input dim."""

    W1 = "w1"
    W3 = "w3"
    W2 = "w2"

    @property
    def order(self) -> int:
        return {"w1": 0, "w3": 1, "w2": 0}[self.value]

    @property
    def tp_split(self) -> Split:
        return Split.ROW if self is ExpertShard.W2 else Split.COLUMN

    @classmethod
    def parse(cls, value: Any) -> ExpertShard:
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgumentError(f"expert_params_mapping: unknown shard id {value!r} (w1, w3 or w2)") from None


@dataclass(frozen=True)
class IgnoreRule:
    """Skips checkpoint names starting with ``prefix`` (after prefix rewrites) and/or
    containing ``contains``; ``reason`` is what the load report lists."""

    prefix: str | None
    contains: str | None
    reason: str

    def __post_init__(self) -> None:
        if self.prefix is None and self.contains is None:
            raise InvalidArgumentError(f"ignore rule {self.reason!r} matches nothing (no prefix, no contains)")


@dataclass(frozen=True)
class WeightRules:
    """What a model declares beyond the weight hooks (``model.weight_rules()``)."""

    #: ``(prefix, replacement)``, first match wins (e.g. Kimi's ``language_model.`` names)
    rewrites: tuple[tuple[str, str], ...] = ()
    #: declared skips; every skipped tensor is listed in the report with its reason
    ignore: tuple[IgnoreRule | tuple[str | None, str | None, str], ...] = ()
    #: layers at or beyond this (minus declared MTP layers) are errors
    num_hidden_layers: int | None = None
    #: DeepSeek MTP layers stored after the last decoder layer, skipped by a named rule
    num_nextn_predict_layers: int = 0
    #: suffix replacements, e.g. ``(".k_proj.k_scale", ".attn.k_scale")``
    scale_remaps: tuple[tuple[str, str], ...] = ()
    #: destination-name fragment -> TP split (first match wins; default replicated)
    tp_rules: tuple[tuple[str, Split], ...] = ()
    #: routed experts in the checkpoint (without a fused shared slot)
    num_experts: int | None = None
    #: when set, ``mlp.shared_experts.`` loads as ``mlp.experts.{slot}.``
    fused_shared_slot: int | None = None
    #: FP8 block of this model's layout (the checkpoint's config overrides it)
    fp8_block: tuple[int, int] = (128, 128)
    #: destination suffix -> extra suffix the loader also accepts (3-D expert params)
    dest_aliases: dict[str, str] = field(default_factory=dict)
    #: ``(destination prefix, reason)``: destinations no rule writes, on purpose
    skip_destinations: tuple[tuple[str, str], ...] = ()
    #: ``(fragment, ((replacement, rope heads), ...))``: a checkpoint tensor whose resolved
    #: name holds ``fragment`` and has no parameter of its own is cut into equal row blocks,
    #: block ``k`` going to the name with ``fragment`` replaced by ``replacement``; with
    #: ``rope heads > 0`` its rows are reordered per head from interleaved pairs to halves
    #: (rotate-half RoPE). E.g. a fused ``wqkv`` into transformers' ``q/k/v_proj``.
    unfused: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "ignore", tuple(r if isinstance(r, IgnoreRule) else IgnoreRule(*r) for r in self.ignore)
        )
        object.__setattr__(
            self, "tp_rules", tuple((frag, Split.parse(s, f"tp_rules[{frag!r}]")) for frag, s in self.tp_rules)
        )
        object.__setattr__(self, "rewrites", tuple(tuple(r) for r in self.rewrites))
        object.__setattr__(self, "scale_remaps", tuple(tuple(r) for r in self.scale_remaps))
        object.__setattr__(self, "fp8_block", tuple(self.fp8_block))

    @property
    def ignore_rules(self) -> tuple[IgnoreRule, ...]:
        """``ignore`` as :class:`IgnoreRule` (tuples are converted at construction)."""
        return cast(tuple[IgnoreRule, ...], self.ignore)

    @classmethod
    def coerce(cls, value: Any, where: str = "weight_rules()") -> WeightRules:
        """A :class:`WeightRules` from itself, ``None`` or a plain dict (older models);
        an unknown key is an :class:`InvalidArgumentError` naming it."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidArgumentError(f"{where} must return WeightRules or a dict, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidArgumentError(
                f"{where}: unknown rule key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})"
            )
        return cls(**value)

    def replace(self, **changes: Any) -> WeightRules:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PlannerRules:
    """Everything the Rust planner needs, typed; :meth:`to_core` is the only place that
    spells its keys."""

    model: WeightRules
    #: ``(param fragment, checkpoint fragment, shard order)``
    stacked: tuple[tuple[str, str, int], ...] = ()
    #: ``(param prefix, checkpoint fragment, expert, shard)``
    experts: tuple[tuple[str, str, int, ExpertShard], ...] = ()
    #: exact renames computed from the model's rename hooks (``None`` skips)
    renames: dict[str, str | None] = field(default_factory=dict)
    #: destination -> local rows of each stacked shard
    shard_rows: dict[str, list[int]] = field(default_factory=dict)
    #: this rank of the parallel layout
    parallel: ParallelLayout = field(default_factory=ParallelLayout)

    def to_core(self) -> dict[str, Any]:
        m = self.model
        out: dict[str, Any] = {
            "rewrites": list(m.rewrites),
            "ignore": [(r.prefix, r.contains, r.reason) for r in m.ignore_rules],
            "num_hidden_layers": m.num_hidden_layers,
            "num_nextn_predict_layers": m.num_nextn_predict_layers,
            "scale_remaps": list(m.scale_remaps),
            "tp_rules": [(frag, s.value) for frag, s in m.tp_rules],
            "num_experts": m.num_experts,
            "fused_shared_slot": m.fused_shared_slot,
            "stacked": list(self.stacked),
            "experts": [(p, frag, e, s.order, s.tp_split.value) for p, frag, e, s in self.experts],
            "tp_rank": self.parallel.tp_rank,
            "tp_size": self.parallel.tp_size,
            "ep_rank": self.parallel.ep_rank,
            "ep_size": self.parallel.ep_size,
            "moe_tp_rank": self.parallel.moe_tp_rank,
            "moe_tp_size": self.parallel.moe_tp_size,
        }
        if self.renames:
            out["renames"] = self.renames
        if self.shard_rows:
            out["shard_rows"] = self.shard_rows
        if m.unfused:
            out["unfused"] = [(frag, [(r, int(h)) for r, h in parts]) for frag, parts in m.unfused]
        return out
