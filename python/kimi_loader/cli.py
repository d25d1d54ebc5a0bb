"""The ``kimi-loader`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from . import QUANT_FORMATS
from .errors import KimiLoaderError


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import format_summary, summarize
    from .reader import open as open_checkpoint

    try:
        with open_checkpoint(args.path, threads=args.threads) as ck:
            summary = summarize(ck)
    except KimiLoaderError as e:
        if args.json:
            print(
                json.dumps(
                    {
                        "path": args.path,
                        "error": type(e).__name__,
                        "message": str(e),
                        "file": e.file,
                        "tensor": e.tensor,
                        "problems": [str(e)],
                    },
                    indent=2,
                )
            )
        else:
            print(f"{args.path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 1 if summary["problems"] else 0


def _plan(args: argparse.Namespace) -> int:
    import time

    from .loader import _format_problems, plan_for
    from .models import for_config
    from .reader import open as open_checkpoint

    with open_checkpoint(args.path, threads=args.threads) as ck:
        if ck.config is None:
            print(f"{args.path}: no config.json: cannot build the model to plan for", file=sys.stderr)
            return 1
        import torch

        from .parallel import ParallelLayout

        layout = ParallelLayout.of(
            args.tp_rank, args.tp_size, args.ep_rank, args.ep_size, independent=args.independent_ep
        )
        model = for_config(ck.config, device="meta", parallel=layout, checkpoint=ck)
        target = getattr(model, "language_model", model)
        t = time.perf_counter()
        planned = plan_for(model, ck, threads=args.threads)
        plan, dests = planned.plan, planned.dests
        seconds = time.perf_counter() - t
        ignored: dict[str, int] = {}
        for _, reason in plan.ignored():
            ignored[reason] = ignored.get(reason, 0) + 1
        summary = {
            "checkpoint": ck.index_path or ck.files[0],
            "model": type(model).__name__,
            "quant_format": target.quant_format,
            "tp": [layout.tp_rank, layout.tp_size],
            "ep": [layout.ep_rank, layout.ep_size],
            "moe_tp": [layout.moe_tp_rank, layout.moe_tp_size],
            "destinations": len(dests),
            "destination_bytes": sum(t.numel() * t.element_size() for t in dests.values()),
            "ops": len(plan),
            "op_counts": plan.op_counts(),
            "tensors_used": plan.used,
            "tensors_ignored": ignored,
            "tensors_on_other_ranks": plan.other_rank,
            "bytes_read": plan.bytes_read,
            "bytes_written": plan.bytes_written,
            "unused": len(plan.unused()),
            "missing": len(plan.missing()),
            "fused_shared_experts": target.num_fused_shared_experts,
            "fusion_reason": target.fusion_reason,
            "plan_seconds": round(seconds, 4),
        }
        problems = _format_problems(plan)
        del torch
    if args.json:
        print(json.dumps({**summary, "problems": problems}, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k:<24}{v}")
        print(f"{'problems':<24}{problems or 'none: every destination byte is written exactly once'}")
    return 1 if problems else 0


def _synth(args: argparse.Namespace) -> int:
    from .synth import make_checkpoint

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    path = make_checkpoint(
        args.path, preset=args.preset, quant=args.quant, seed=args.seed, num_shards=args.num_shards, **overrides
    )
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .synth import PRESETS

    parser = argparse.ArgumentParser(prog="kimi-loader", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="summarize a checkpoint and report problems")
    p.add_argument("path", help="checkpoint directory, index file or shard")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("plan", help="build the copy plan for the serving-layout model; print its summary")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tp-rank", type=int, default=0)
    p.add_argument(
        "--ep-rank",
        type=int,
        default=None,
        help="default: derived from --tp-rank (EP inside the TP group, as SGLang / vLLM)",
    )
    for opt in ("tp-size", "ep-size"):
        p.add_argument(f"--{opt}", type=int, default=1)
    p.add_argument(
        "--independent-ep",
        action="store_true",
        help="TP and EP as separate axes (tp_size * ep_size ranks; experts both split and sliced)",
    )
    p.set_defaults(func=_plan)

    p = sub.add_parser("synth", help="write a synthetic checkpoint")
    p.add_argument("path")
    p.add_argument("--preset", default="kimi-k2.5-tiny", choices=sorted(PRESETS))
    p.add_argument("--quant", default="ct-int4", choices=list(QUANT_FORMATS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=JSON",
        help="override a text-config field, e.g. --set num_hidden_layers=2",
    )
    p.set_defaults(func=_synth)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KimiLoaderError as e:
        print(f"kimi-loader: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
