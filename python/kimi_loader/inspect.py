"""``kimi-loader inspect``: what a checkpoint holds and what looks wrong with it."""

from __future__ import annotations

from typing import Any

from .errors import KimiLoaderError
from .reader import Checkpoint


def text_config_of(config: dict[str, Any] | None) -> dict[str, Any]:
    """The language-model config: ``text_config`` of a wrapper, else the config itself."""
    if not config:
        return {}
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def summarize(ck: Checkpoint) -> dict[str, Any]:
    """A JSON-able summary of an open checkpoint, with a list of problems found."""
    config = ck.config
    tc = text_config_of(config)
    problems: list[str] = []
    notes: list[str] = []
    try:
        quant = ck.quant_format
    except KimiLoaderError as e:
        quant = None
        problems.append(str(e))

    census = ck.core.census()  # one pass over the names, in Rust
    layers: set[int] = set(census["layers"])
    experts: dict[int, int] = census["experts"]  # layer -> distinct routed expert ids
    expert_suffixes: set[str] = set(census["expert_suffixes"])
    shared_suffixes: set[str] = set(census["shared_suffixes"])
    n_layers = tc.get("num_hidden_layers")
    n_experts = tc.get("n_routed_experts")
    if n_layers is not None:
        extra = sorted(x for x in layers if x >= n_layers)
        missing = sorted(set(range(n_layers)) - layers)
        mtp = tc.get("num_nextn_predict_layers") or 0
        if extra:
            notes.append(
                f"layers {extra} are beyond num_hidden_layers={n_layers} "
                f"(num_nextn_predict_layers={mtp}: declared MTP layers are skipped, others refused)"
            )
        if missing:
            problems.append(f"layers {missing[:8]} of num_hidden_layers={n_layers} have no tensors")
    if n_experts is not None:
        for layer, count in sorted(experts.items()):
            if n_layers is not None and layer >= n_layers:
                continue
            if count != n_experts:
                problems.append(f"layer {layer} has {count} routed experts, config says {n_experts}")
    if expert_suffixes and shared_suffixes and expert_suffixes != shared_suffixes:
        notes.append(
            f"shared experts are stored as {sorted(shared_suffixes)} but routed experts as "
            f"{sorted(expert_suffixes)}: shared-expert fusion is not possible for this checkpoint"
        )

    plan = plan_problems(ck) if config is not None and quant is not None else None
    if plan is not None:
        problems.extend(plan["problems"])
        notes.extend(plan["notes"])

    arch = (config or {}).get("architectures") or []
    return {
        "path": ck.index_path or (ck.files[0] if ck.files else None),
        "architecture": arch[0] if arch else None,
        "model_type": (config or {}).get("model_type"),
        "text_model_type": tc.get("model_type"),
        "quant_format": quant,
        "shards": len(ck.files),
        "tensors": len(ck),
        "bytes": ck.data_bytes,
        "dtypes": census["dtypes"],
        "top_level_prefixes": census["prefixes"],
        "layers": {"config": n_layers, "in_checkpoint": len(layers)},
        "routed_experts": {
            "config": n_experts,
            "per_layer_in_checkpoint": sorted(set(experts.values())),
            "moe_layers": len(experts),
            "suffixes": sorted(expert_suffixes),
        },
        "shared_experts": {"config": tc.get("n_shared_experts"), "suffixes": sorted(shared_suffixes)},
        "problems": problems,
        "notes": notes,
    }


def plan_problems(ck: Checkpoint) -> dict[str, list[str]]:
    """What a load into the default serving layout would refuse: builds that model on the
    meta device from the checkpoint's config and tensors, plans it, and reports every
    error, missing range and unused tensor (nothing is read or allocated)."""
    from .loader import _format_problems, plan_for
    from .models import for_config

    problems: list[str] = []
    notes: list[str] = []
    try:
        if ck.config is None:
            raise KimiLoaderError("no config.json: cannot build the model a load would plan for")
        model = for_config(ck.config, device="meta", checkpoint=ck)
        planned = plan_for(model, ck)
    except KimiLoaderError as e:
        return {"problems": [f"a load would fail: {type(e).__name__}: {e}"], "notes": notes}
    target = getattr(model, "language_model", model)
    notes.extend(f"format decision: {d}" for d in target.format_decisions)
    notes.append(f"shared-expert fusion: {target.num_fused_shared_experts} ({target.fusion_reason})")
    if planned.plan.missing() or planned.plan.unused():
        problems.append(f"a strict load would refuse this checkpoint: {_format_problems(planned.plan)}")
    return {"problems": problems, "notes": notes}


def format_summary(s: dict[str, Any]) -> str:
    gib = s["bytes"] / 2**30
    lines = [
        f"checkpoint    {s['path']}",
        f"architecture  {s['architecture']} (model_type {s['model_type']}, text {s['text_model_type']})",
        f"quant format  {s['quant_format']}",
        f"shards        {s['shards']}",
        f"tensors       {s['tensors']}  ({s['bytes']:,} bytes, {gib:.3f} GiB)",
        "dtypes        " + ", ".join(f"{k} {v}" for k, v in s["dtypes"].items()),
        "prefixes      " + ", ".join(f"{k} {v}" for k, v in s["top_level_prefixes"].items()),
        f"layers        {s['layers']['in_checkpoint']} in checkpoint, num_hidden_layers={s['layers']['config']}",
        f"experts       {s['routed_experts']['config']} routed x {s['routed_experts']['moe_layers']} MoE layers "
        f"(found per layer: {s['routed_experts']['per_layer_in_checkpoint']}), "
        f"stored as {s['routed_experts']['suffixes']}; shared: {s['shared_experts']['config']} "
        f"stored as {s['shared_experts']['suffixes']}",
    ]
    for n in s["notes"]:
        lines.append(f"note          {n}")
    lines.append("problems      " + ("none" if not s["problems"] else ""))
    lines.extend(f"  - {p}" for p in s["problems"])
    return "\n".join(lines)
