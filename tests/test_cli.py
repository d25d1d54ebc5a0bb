"""The kimi-loader command line."""

from __future__ import annotations

import json
import os
import shutil

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
