"""The benchmark bookkeeping (``benches/_common.py``'s record, ``benches/results.py``): the
figures of a run land in a dated results file with the machine and the commit, and the
compare step prints the change against the previous file."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys

import pytest
import torch

_HOUR = datetime.timedelta(hours=1)  # the second run is an hour later

BENCHES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benches")


@pytest.fixture
def bench_modules(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(BENCHES)
    record = tmp_path / "run.jsonl"
    monkeypatch.setenv("KIMI_LOADER_BENCH_RECORD", os.fspath(record))
    for m in ("_common", "results"):
        sys.modules.pop(m, None)
    common, results = importlib.import_module("_common"), importlib.import_module("results")
    monkeypatch.setattr(results, "RESULTS", os.fspath(tmp_path / "results"))
    monkeypatch.setattr(sys, "argv", ["bench_example.py"])
    yield common, results, record
    for m in ("_common", "results"):
        sys.modules.pop(m, None)


def test_a_run_is_recorded_written_and_compared(bench_modules, capsys, monkeypatch):
    common, results, record = bench_modules
    common.section("bf16")
    line = common.row("ours", 0.5, 1.0, "extra text", median=0.6, base_median=1.2)
    assert "2.00x" in line
    common.record("peak memory / dest", None, None, ratio=1.02)
    first = results.write(os.fspath(record))
    res = json.load(open(first))
    assert res["commit"] and res["machine"]["cpus"] == os.cpu_count()
    fig = res["figures"][0]
    assert (fig["bench"], fig["section"], fig["label"], fig["best_s"], fig["median_s"]) == (
        "bench_example",
        "bf16",
        "ours",
        0.5,
        0.6,
    )
    assert fig["ratio_best"] == pytest.approx(2.0) and fig["ratio_median"] == pytest.approx(2.0)
    md = open(first[: -len(".json")] + ".md").read()
    assert "## bench_example: bf16" in md and "| ours | 500.0 ms | 600.0 ms | 2.00x | 2.00x |" in md

    # a second run, 25% slower in the median: compare names the previous file and the change
    os.remove(record)
    common.section("bf16")
    common.row("ours", 0.6, median=0.75)
    monkeypatch.setattr(results, "commit", lambda: "second")
    monkeypatch.setattr(results, "_now", lambda: datetime.datetime.now(datetime.UTC) + _HOUR)
    second = results.write(os.fspath(record))
    capsys.readouterr()
    results.compare()
    out = capsys.readouterr().out
    assert os.path.basename(second) in out and os.path.basename(first) in out
    assert "+25.0%" in out


def test_nothing_recorded_without_the_environment_variable(bench_modules, monkeypatch):
    common, _, record = bench_modules
    monkeypatch.setattr(common, "RECORD", None)
    common.row("ours", 0.5, 1.0)
    assert not record.exists()


@pytest.mark.parametrize(
    ("name", "printed"),
    [
        (
            "bench_gpu_sync",
            ("quantize bf16 -> ct-int4", "mxfp4", "fp8-block", "kl64 hash", "load_weights", "update from"),
        ),
        (
            "bench_kernels",
            (
                "moe int4, 1 tokens",
                "moe int4, 8 tokens",
                "mla decode, 8 heads",
                "mla decode, 64 heads",
                "dequantize ct-int4",
                "dequantize quark-mxfp4",
                "dequantize fp8-block",
            ),
        ),
    ],
)
def test_the_gpu_benchmarks_run_on_the_cpu_in_smoke_mode(tmp_path, monkeypatch, capsys, name, printed):
    """A GPU benchmark's code on tiny sizes through the Triton interpreter (nothing is
    measured there, nothing written): the GPU run of `make gpu-check` meets code that has
    run before."""
    monkeypatch.syspath_prepend(BENCHES)
    monkeypatch.setenv("KIMI_LOADER_BENCH_DIR", os.fspath(tmp_path))
    results_dir = os.path.join(BENCHES, "results")
    before = set(os.listdir(results_dir))
    for m in ("_common", name):
        sys.modules.pop(m, None)
    bench = importlib.import_module(name)
    try:
        assert bench.main(["--smoke"]) == 0
    finally:
        for m in ("_common", name):
            sys.modules.pop(m, None)
    out = capsys.readouterr().out
    for what in printed:
        assert what in out, what
    assert set(os.listdir(results_dir)) == before


def test_a_gpu_benchmark_stopped_midway_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """On a GPU, each figure is written as it comes in (a run killed at its time limit
    keeps the figures before it), and a failure is recorded next to them and makes the
    exit status 1. (``torch.cuda`` is faked: the file is what is checked.)"""
    monkeypatch.syspath_prepend(BENCHES)
    sys.modules.pop("_common", None)
    try:
        common = importlib.import_module("_common")
        monkeypatch.setenv("KIMI_LOADER_GPU_RESULTS", os.fspath(tmp_path))  # as gpu_check.sh sets it
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a fake GPU")
        seen = []

        def run(device, smoke, out):
            assert device.type == "cuda" and not smoke
            out["copy_GBps"] = 4000.0
            out["rows"]["first"] = {"ours_s": 1.0}
            seen.append(json.load(open(path())))  # on disk before the next figure is measured
            out["rows"]["second"] = {"ours_s": 2.0, "tiles": {"32x32": 3.0}}
            raise AssertionError("the quantizer is wrong")

        def path():
            (name,) = os.listdir(tmp_path)
            return tmp_path / name

        assert common.gpu_main("test", run, []) == 1
    finally:
        sys.modules.pop("_common", None)
    assert seen[0]["rows"] == {"first": {"ours_s": 1.0}} and seen[0]["copy_GBps"] == 4000.0
    got = json.load(open(path()))
    assert got["gpu"] == "a fake GPU" and got["error"] == "AssertionError: the quantizer is wrong"
    assert got["rows"] == {"first": {"ours_s": 1.0}, "second": {"ours_s": 2.0, "tiles": {"32x32": 3.0}}}
    assert path().name.startswith("gpu-test-") and "failed after 2 figures" in capsys.readouterr().out
