"""The kimi-loader command line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from kimi_loader.cli import main


def test_inspect_text_and_json(synth_dir, capsys):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "quant format  ct-int4" in out and "KimiK25ForConditionalGeneration" in out
    assert "shared-expert fusion is not possible" in out and "problems      none" in out
    assert main(["inspect", path, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["quant_format"] == "ct-int4" and s["shards"] == 4 and s["problems"] == []
    assert s["routed_experts"] == {
        "config": 8,
        "per_layer_in_checkpoint": [8],
        "moe_layers": 2,
        "suffixes": ["weight_packed", "weight_scale", "weight_shape"],
    }
    assert s["layers"] == {"config": 3, "in_checkpoint": 3}
    assert s["dtypes"]["I32"] > 0 and s["tensors"] == sum(s["dtypes"].values())


def test_inspect_reports_mtp_and_problems(synth_dir, tmp_path, capsys):
    ds = synth_dir("deepseek-v3-tiny", "bf16")
    assert main(["inspect", ds, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert any("beyond num_hidden_layers" in n for n in s["notes"])
    # a config that disagrees with the tensors is a problem (exit status 1)
    bad = tmp_path / "bad"
    shutil.copytree(ds, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["n_routed_experts"] = 16
    json.dump(cfg, open(bad / "config.json", "w"))
    assert main(["inspect", os.fspath(bad), "--json"]) == 1
    s = json.loads(capsys.readouterr().out)
    assert any("has 8 routed experts, config says 16" in p for p in s["problems"])


def test_inspect_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{]")
    assert main(["inspect", os.fspath(tmp_path)]) == 1
    assert "HeaderError" in capsys.readouterr().err
    assert main(["inspect", os.fspath(tmp_path), "--json"]) == 1
    s = json.loads(capsys.readouterr().out)
    assert s["error"] == "HeaderError" and s["file"].endswith("model.safetensors")


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "ck"
    assert (
        main(
            [
                "synth",
                os.fspath(out),
                "--preset",
                "deepseek-v3-tiny",
                "--quant",
                "fp8-block",
                "--num-shards",
                "3",
                "--set",
                "num_hidden_layers=3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == os.fspath(out)
    assert main(["inspect", os.fspath(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["quant_format"], s["shards"], s["layers"]["config"]) == ("fp8-block", 3, 3)


def test_plan_command(synth_dir, capsys):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4", n_routed_experts=384, num_hidden_layers=2)
    assert main(["plan", path, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["missing"] == 0 and s["unused"] == 0 and s["problems"] == ""
    assert s["fused_shared_experts"] == 0 and "compressed-tensors" in s["fusion_reason"]
    assert s["tensors_used"] + sum(s["tensors_ignored"].values()) == len(__import__("kimi_loader").open(path))
    assert main(["plan", path, "--ep-rank", "1", "--ep-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "tensors_on_other_ranks  " in out and "every destination byte is written exactly once" in out


# -- the error contract (issue #15's CLI list) ----------------------------------------------
@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["plan", "{tiny}", "--tp-size", "0"], "InvalidArgumentError"),
        (["plan", "{tiny}", "--threads", "-1"], "InvalidArgumentError"),
        (["inspect", "{tiny}", "--threads", "100000"], "InvalidArgumentError"),
        (["synth", "{tmp}/a", "--set", "num_hidden_layers=abc"], "InvalidArgumentError"),
        (["synth", "{tmp}/b", "--set", "nonexistent_key=3"], "InvalidArgumentError"),
        (["synth", "{file}"], "InvalidArgumentError"),
        (["inspect", "{tmp}/missing"], "CheckpointNotFoundError"),
    ],
)
def test_every_failure_is_one_line_or_json(synth_dir, tmp_path, capsys, argv, kind):
    """Exit code 1 with one line `kimi-loader: <ErrorType>: <message>` on stderr, or the
    same as a JSON object on stdout with --json; never a traceback."""
    file = tmp_path / "existing.safetensors"
    file.write_bytes(b"x")
    subst = {"tiny": synth_dir("kimi-k2.5-tiny", "bf16"), "tmp": str(tmp_path), "file": str(file)}
    argv = [a.format(**subst) for a in argv]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith(f"kimi-loader: {kind}: "), err
    assert main([*argv, "--json"]) == 1
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["error"] == kind


def test_usage_errors_exit_2_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("kimi-loader ")


def test_a_closed_pipe_is_not_a_traceback(synth_dir):
    import subprocess
    import sys

    path = synth_dir("kimi-k2.5-tiny", "bf16")
    code = f"import sys; from kimi_loader.cli import main; sys.exit(main(['inspect', {path!r}, '--json']))"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.read(1)
        proc.stdout.close()  # like `| head -c1`
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert "Traceback" not in err, err


def test_verify_writes_then_checks_a_manifest(synth_dir, tmp_path, capsys):
    from reference import rewrite

    src = synth_dir("kimi-k2.5-tiny", "bf16")
    manifest = str(tmp_path / "m.json")
    assert main(["verify", src, "--manifest", manifest]) == 0  # first time: written
    capsys.readouterr()
    assert main(["verify", src, "--manifest", manifest, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    ck = __import__("kimi_loader").open(src)
    name = "language_model.model.norm.weight"
    changed = rewrite(src, tmp_path / "changed", change={name: ck.get_tensor(name) + 1})
    assert main(["verify", changed, "--manifest", manifest, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["mismatched"] == [name] and out["missing"] == [] and out["extra"] == []
    assert main(["verify", changed, "--manifest", str(tmp_path / "m.json")]) == 1
    assert f"mismatched          {name}" in capsys.readouterr().out


def test_verify_with_sha256_matches_hashlib(synth_dir, tmp_path, capsys):
    import hashlib

    from reference import rewrite

    import kimi_loader

    src = synth_dir("deepseek-v3-tiny", "fp8-block")
    manifest = tmp_path / "m.json"
    assert main(["verify", src, "--manifest", str(manifest)]) == 0  # xxh3 only
    assert main(["verify", src, "--manifest", str(manifest), "--sha256"]) == 1  # asked for, not there
    assert "no sha256 hashes" in capsys.readouterr().err
    assert main(["verify", src, "--manifest", str(manifest), "--write", "--sha256"]) == 0
    written = json.loads(manifest.read_text())
    with kimi_loader.open(src) as ck:
        for name in ck.keys():
            raw = ck.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert written["sha256"][name] == hashlib.sha256(raw).hexdigest()
        with pytest.raises(kimi_loader.InvalidArgumentError, match="algorithm"):
            ck.hash_tensors(algorithm="md5")
        name = ck.keys()[3]
        changed = rewrite(src, tmp_path / "changed", change={name: ck.get_tensor(name).clone().zero_()})
    capsys.readouterr()
    assert main(["verify", changed, "--manifest", str(manifest), "--json"]) == 1  # sha256 checked too
    out = json.loads(capsys.readouterr().out)
    assert out["mismatched"] == [name] and out["hashes"] == ["sha256", "xxh3-64"]


def test_bench_prints_figures_next_to_safetensors(synth_dir, capsys):
    src = synth_dir("deepseek-v3-tiny", "bf16")
    assert main(["bench", src, "--repeat", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in r["stages"]}
    assert list(stages) == ["open", "plan", "read", "load"] and r["skipped"] is None
    for s in stages.values():
        assert 0 < s["kimi_loader"]["best_s"] <= s["kimi_loader"]["median_s"]
    for name, peers in (("open", {"safetensors"}), ("read", {"safetensors", "ceiling"}), ("load", {"safetensors"})):
        for p in peers:
            assert stages[name][p]["ratio_median"] == pytest.approx(
                stages[name][p]["median_s"] / stages[name]["kimi_loader"]["median_s"]
            )
    assert stages["read"]["bytes"] == stages["load"]["bytes"] == r["bytes"] > 0
    # --max-bytes 1: one tensor is read, the load is skipped and says why
    assert main(["bench", src, "--repeat", "1", "--max-bytes", "1"]) == 0
    out = capsys.readouterr().out
    assert "read" in out and "load " not in out and "skipped load: the checkpoint is over --max-bytes" in out
    assert main(["bench", src, "--repeat", "0"]) == 1
    assert "kimi-loader: InvalidArgumentError: --repeat" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["kimi-k2.5-tiny", "deepseek-v3-tiny"])
def test_census_counts_what_the_name_patterns_say(synth_dir, preset):
    """The Rust census behind `inspect` against the regular expressions it replaced."""
    import re
    from collections import Counter

    import kimi_loader

    expert = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")
    shared = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.(\w+)$")
    layer = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    with kimi_loader.open(synth_dir(preset, "ct-int4")) as ck:
        infos = ck.infos()
        c = ck.core.census()
    experts: dict[int, set[int]] = {}
    layers, expert_suffixes, shared_suffixes = set(), set(), set()
    for i in infos:
        if m := expert.search(i.name):
            experts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            expert_suffixes.add(m.group(4))
        if m := shared.search(i.name):
            shared_suffixes.add(m.group(3))
        if m := layer.search(i.name):
            layers.add(int(m.group(1)))
    assert c["dtypes"] == dict(Counter(i.st_dtype for i in infos))
    assert c["prefixes"] == dict(Counter(i.name.split(".", 1)[0] for i in infos))
    assert c["layers"] == sorted(layers)
    assert c["experts"] == {k: len(v) for k, v in experts.items()} and c["experts"]
    assert c["expert_suffixes"] == sorted(expert_suffixes) and c["shared_suffixes"] == sorted(shared_suffixes)
