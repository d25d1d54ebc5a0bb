"""kimi-loader: inspect, plan and synthesize Kimi-K2.5 / DeepSeek-V3 checkpoints.

Exit codes: 0 success, 1 a problem with the input (one line on stderr, or a JSON object
on stdout with --json), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ._core import __version__
from .config import QUANT_FORMATS
from .errors import InvalidArgumentError, KimiLoaderError


def _inspect(args: argparse.Namespace) -> int:
    from .inspect import format_summary, summarize
    from .reader import open as open_checkpoint

    with open_checkpoint(args.path, threads=args.threads) as ck:
        summary = summarize(ck)
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
    from .synth import make_checkpoint, text_config

    known = set(text_config(args.preset))
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise InvalidArgumentError(
                f"--set {item!r}: expected KEY=JSON with KEY a text-config field of {args.preset} "
                f"({', '.join(sorted(known))})"
            )
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"--set {item!r}: the value is not JSON ({e.msg})") from None
    if os.path.exists(args.path) and not os.path.isdir(args.path):
        raise InvalidArgumentError(f"{args.path}: exists and is not a directory")
    path = make_checkpoint(
        args.path,
        preset=args.preset,
        quant=args.quant,
        seed=args.seed,
        num_shards=args.num_shards,
        progress=True,
        **overrides,
    )
    print(json.dumps({"path": path}) if args.json else path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import format_figures, run

    if args.repeat < 1 or args.max_bytes < 0:
        raise InvalidArgumentError("--repeat must be at least 1 and --max-bytes at least 0")
    figures = run(args.path, repeat=args.repeat, max_bytes=args.max_bytes, threads=args.threads)
    print(json.dumps(figures, indent=2) if args.json else format_figures(figures))
    return 0


MANIFEST_FORMAT = "kimi-loader-manifest/1"


def _verify(args: argparse.Namespace) -> int:
    """Writes (first time, or --write) or checks a manifest of per-tensor xxh3-64 (and,
    with --sha256, SHA-256) hashes."""
    from .reader import open as open_checkpoint

    manifest = args.manifest or os.path.join(
        args.path if os.path.isdir(args.path) else os.path.dirname(args.path), "kimi-loader-manifest.json"
    )
    write = args.write or not os.path.exists(manifest)
    want: dict = {}
    if not write:
        try:
            with open(manifest) as fh:
                want = json.load(fh)
            if (
                not isinstance(want, dict)
                or want.get("format") != MANIFEST_FORMAT
                or not isinstance(want.get("tensors"), dict)
                or not isinstance(want.get("sha256", {}), dict)
            ):
                raise ValueError(f"not a {MANIFEST_FORMAT} file")
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"{manifest}: cannot read the manifest: {e}") from None
        if args.sha256 and "sha256" not in want:
            raise InvalidArgumentError(f"{manifest}: has no sha256 hashes (write it with --write --sha256)")
    with open_checkpoint(args.path, threads=args.threads) as ck:
        hashes = {"tensors": ck.hash_tensors()}
        if args.sha256 or "sha256" in want:
            hashes["sha256"] = ck.hash_tensors(algorithm="sha256")
        nbytes = ck.data_bytes
    count = len(hashes["tensors"])
    if write:
        with open(manifest, "w") as fh:
            json.dump({"format": MANIFEST_FORMAT, "hash": "xxh3-64", **hashes}, fh, indent=1, sort_keys=True)
        result = {"manifest": manifest, "written": count, "bytes": nbytes, "sha256": "sha256" in hashes}
        kinds = "xxh3-64 and sha256" if "sha256" in hashes else "xxh3-64"
        print(
            json.dumps(result) if args.json else f"{manifest}: wrote {count} tensor {kinds} hashes ({nbytes:,} bytes)"
        )
        return 0
    mismatched: set[str] = set()
    for key, got in hashes.items():
        expected: dict[str, str] = want[key]
        mismatched |= {n for n in got if n in expected and expected[n] != got[n]}
    missing = sorted(set(want["tensors"]) - set(hashes["tensors"]))
    extra = sorted(set(hashes["tensors"]) - set(want["tensors"]))
    ok = not (mismatched or missing or extra)
    result = {
        "manifest": manifest,
        "checked": count,
        "hashes": sorted("xxh3-64" if k == "tensors" else k for k in hashes),
        "mismatched": sorted(mismatched),
        "missing": missing,
        "extra": extra,
        "ok": ok,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for label, items in (
            ("mismatched", sorted(mismatched)),
            ("missing", missing),
            ("not in the manifest", extra),
        ):
            for n in items:
                print(f"{label:<20}{n}")
        print(f"{manifest}: {count} tensors checked, " + ("all match" if ok else "PROBLEMS above"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    from .presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="kimi-loader", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kimi-loader {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    threads_help = "worker threads (1-256; default: $KIMI_LOADER_THREADS or the CPU count)"

    p = sub.add_parser("inspect", help="summarize a checkpoint and report problems")
    p.add_argument("path", help="checkpoint directory, index file or shard")
    p.add_argument("--json", action="store_true", help="print JSON (errors too)")
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("plan", help="build the copy plan for the serving-layout model; print its summary")
    p.add_argument("path", help="checkpoint directory, index file or shard")
    p.add_argument("--json", action="store_true", help="print JSON (errors too)")
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.add_argument("--tp-rank", type=int, default=0, help="this rank in the tensor-parallel group")
    p.add_argument(
        "--ep-rank",
        type=int,
        default=None,
        help="default: derived from --tp-rank (EP inside the TP group, as SGLang / vLLM)",
    )
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks (inside the TP group)")
    p.add_argument(
        "--independent-ep",
        action="store_true",
        help="TP and EP as separate axes (tp_size * ep_size ranks; experts both split and sliced)",
    )
    p.set_defaults(func=_plan)

    p = sub.add_parser("verify", help="write or check a manifest of per-tensor hashes (xxh3-64, optionally sha256)")
    p.add_argument("path", help="checkpoint directory, index file or shard")
    p.add_argument("--manifest", help="manifest file (default: kimi-loader-manifest.json beside the checkpoint)")
    p.add_argument("--write", action="store_true", help="(re)write the manifest instead of checking it")
    p.add_argument("--sha256", action="store_true", help="also write / require SHA-256 hashes (slower)")
    p.add_argument("--json", action="store_true", help="print JSON (errors too)")
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "bench", help="time open / plan / read / load of a checkpoint next to safetensors and a plain copy"
    )
    p.add_argument("path", help="checkpoint directory, index file or shard")
    p.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=2 << 30,
        help="read at most this many bytes of tensors; load only checkpoints this small (default 2 GiB)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (errors too)")
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.set_defaults(func=_bench)

    p = sub.add_parser("synth", help="write a synthetic checkpoint")
    p.add_argument("path", help="directory to write (created)")
    p.add_argument("--preset", default="kimi-k2.5-tiny", choices=sorted(PRESETS), help="model shape")
    p.add_argument("--quant", default="ct-int4", choices=list(QUANT_FORMATS), help="checkpoint format")
    p.add_argument("--seed", type=int, default=0, help="random seed of the values")
    p.add_argument("--num-shards", type=int, default=None, help="shard files (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print JSON (errors too)")
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
    except BrokenPipeError:  # `kimi-loader inspect ... | head -1`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KimiLoaderError as e:
        return _fail(args, type(e).__name__, str(e), file=e.file, tensor=e.tensor)
    except OSError as e:  # a file system problem the library did not wrap (e.g. writing synth output)
        return _fail(args, type(e).__name__, f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))


def _fail(args: argparse.Namespace, kind: str, message: str, **fields: object) -> int:
    """The one way a command reports a problem with its input: one line on stderr, or a
    JSON object on stdout with ``--json``; exit code 1."""
    if getattr(args, "json", False):
        print(json.dumps({"error": kind, "message": message, **fields}, indent=2))
    else:
        print(f"kimi-loader: {kind}: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
