"""The benchmark figures of one ``make bench`` run, recorded rather than copied by hand.

``python results.py write RECORD``: turns the run's record (JSON lines written by every
bench script through ``_common.record``) into ``results/bench-<date>-<commit>.json`` and
a Markdown table next to it, with the machine and the commit.

``python results.py compare [NEW [OLD]]``: prints every figure of NEW (default: the
newest results file) next to OLD (default: the one before it): best and median, and the
change in the median (negative: faster).
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    thp = "?"
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    import torch

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "transparent_hugepage": thp,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short=9", "HEAD") or "unknown"
    # (files the benchmarks write themselves, under results/, do not count)
    # (pathspecs are relative to the working directory unless marked `top`)
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benches/results")
    return sha + ("-dirty" if dirty else "")


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.2f} s"


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"# Benchmarks {res['date']} at {res['commit']}",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, Linux {m['kernel']}, THP "
        f"`{m['transparent_hugepage']}`; Python {m['python']}, torch {m['torch']}. "
        "Written by `make bench` (`benches/results.py`); ratios: > 1 is faster than the row's "
        "baseline (the first row of its section unless the label says otherwise).",
    ]
    last = None
    for f in res["figures"]:
        key = (f["bench"], f.get("section", ""))
        if key != last:
            title = f["bench"] + (f": {f['section']}" if f.get("section") else "")
            lines += ["", f"## {title}", "", "| figure | best | median | ratio (best) | ratio (median) | other |"]
            lines.append("|---|---|---|---|---|---|")
            last = key
        other = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in f.items()
            if k not in ("bench", "section", "label", "best_s", "median_s", "ratio_best", "ratio_median")
        )
        lines.append(
            f"| {f['label']} | {_fmt(f.get('best_s'))} | {_fmt(f.get('median_s'))} | "
            f"{_ratio(f.get('ratio_best'))} | {_ratio(f.get('ratio_median'))} | {other} |"
        )
    return "\n".join(lines) + "\n"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def write(record: str) -> str:
    figures = [json.loads(ln) for ln in open(record) if ln.strip()]
    if not figures:
        sys.exit(f"{record}: no figures recorded")
    now = _now()
    res = {
        "date": now.date().isoformat(),
        "time": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "figures": figures,
    }
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"bench-{res['date']}-{res['commit']}")
    with open(base + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(base + ".md", "w") as fh:
        fh.write(markdown(res))
    print(f"wrote {base}.json and .md ({len(figures)} figures)")
    return base + ".json"


def runs() -> list[str]:
    """Every results file, oldest first (by the time recorded in it)."""
    files = glob.glob(os.path.join(RESULTS, "bench-*.json"))
    return sorted(files, key=lambda p: json.load(open(p))["time"])


def compare(new: str | None = None, old: str | None = None) -> None:
    files = runs()
    new = new or (files[-1] if files else None)
    if new is None:
        sys.exit("no results files yet: run `make bench`")
    if old is None:
        older = [f for f in files if f != new and json.load(open(f))["time"] < json.load(open(new))["time"]]
        old = older[-1] if older else None
    a = json.load(open(new))
    print(f"{os.path.basename(new)} ({a['commit']})", end="")
    if old is None:
        print(": no earlier results file to compare with")
        before: dict = {}
    else:
        b = json.load(open(old))
        print(f" vs {os.path.basename(old)} ({b['commit']})")
        before = {(f["bench"], f.get("section", ""), f["label"]): f for f in b["figures"]}
    for f in a["figures"]:
        key = (f["bench"], f.get("section", ""), f["label"])
        prev = before.get(key)
        now_s = f.get("median_s") or f.get("best_s")
        ratio = f.get("ratio_median") or f.get("ratio")
        shown = _fmt(now_s) if now_s else _ratio(ratio)
        line = f"  {f['bench']:<16} {(f.get('section') or '')[:28]:<28} {f['label'][:52]:<52} {shown:>10}"
        if prev is not None:
            was = prev.get("median_s") or prev.get("best_s")
            was_ratio = prev.get("ratio_median") or prev.get("ratio")
            if now_s and was:
                line += f"  was {_fmt(was):>10}  {100 * (now_s - was) / was:+6.1f}%"
            elif ratio and was_ratio and not now_s:
                line += f"  was {_ratio(was_ratio):>10}"
        print(line)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "write":
        compare(write(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "compare":
        compare(*sys.argv[2:4])
    else:
        sys.exit(__doc__)
