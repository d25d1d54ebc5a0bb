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
            print(json.dumps({"path": args.path, "error": type(e).__name__, "message": str(e),
                              "file": e.file, "tensor": e.tensor, "problems": [str(e)]}, indent=2))
        else:
            print(f"{args.path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 1 if summary["problems"] else 0


def _synth(args: argparse.Namespace) -> int:
    from .synth import make_checkpoint

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    path = make_checkpoint(args.path, preset=args.preset, quant=args.quant, seed=args.seed,
                           num_shards=args.num_shards, **overrides)
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

    p = sub.add_parser("synth", help="write a synthetic checkpoint")
    p.add_argument("path")
    p.add_argument("--preset", default="kimi-k2.5-tiny", choices=sorted(PRESETS))
    p.add_argument("--quant", default="ct-int4", choices=list(QUANT_FORMATS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=JSON",
                   help="override a text-config field, e.g. --set num_hidden_layers=2")
    p.set_defaults(func=_synth)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KimiLoaderError as e:
        print(f"kimi-loader: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
