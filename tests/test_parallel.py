"""Parallel layouts (issue #10): engine semantics (EP inside the TP group), validated up
front. Each bad setting is a one-line typed error naming the dimension and the divisor,
raised before any byte is read: the model is never half-written."""

from __future__ import annotations

import json

import pytest
import torch

import kimi_loader
from kimi_loader.cli import main
from kimi_loader.errors import InvalidArgumentError
from kimi_loader.models import for_config
from kimi_loader.parallel import ParallelLayout


@pytest.mark.parametrize(
    ("tp_rank", "tp_size", "ep_rank", "ep_size", "want"),
    [
        (0, 8, None, 8, (8, 0, 8, 0, 1, 0)),  # SGLang --tp 8 --ep 8: 8 ranks, experts unsliced
        (5, 8, None, 2, (8, 5, 2, 1, 4, 1)),  # moe_tp = 4: rank 5 holds expert half 1, slice 1
        (3, 4, None, 1, (4, 3, 1, 0, 4, 3)),  # plain TP: experts sliced like everything else
        (1, 2, 5, 8, (2, 1, 8, 5, 1, 0)),  # ep > tp: data-parallel attention
    ],
)
def test_engine_semantics(tp_rank, tp_size, ep_rank, ep_size, want):
    p = ParallelLayout.of(tp_rank, tp_size, ep_rank, ep_size)
    assert (p.tp_size, p.tp_rank, p.ep_size, p.ep_rank, p.moe_tp_size, p.moe_tp_rank) == want


BAD_SETTINGS = [
    (dict(tp_size=0), "tp_size must be an int >= 1"),
    (dict(tp_size=-2), "tp_size must be an int >= 1"),
    (dict(tp_size="2"), "tp_size must be an int"),
    (dict(tp_rank=2, tp_size=2), "tp_rank=2 is not a rank of tp_size=2"),
    (dict(tp_size=4, ep_size=3), "ep_size=3 must divide tp_size=4"),
    (dict(tp_size=2, ep_size=3), "tp_size=2 must divide ep_size=3"),
    (dict(tp_size=2, ep_size=8), "give ep_rank"),
    (dict(tp_rank=0, tp_size=2, ep_rank=1, ep_size=2), "ep_rank=1 does not match tp_rank=0"),
    (dict(tp_size=3), r"num_attention_heads \(4\) is not divisible by tp_size=3"),
    (dict(tp_size=8, ep_size=8), r"num_attention_heads \(4\) is not divisible by tp_size=8"),
    (dict(tp_size=16, ep_size=16), r"n_routed_experts \(8\) is not divisible by ep_size=16"),
    (dict(tp_size=8, ep_size=8, _heads=8, _experts=12), r"n_routed_experts \(12\) is not divisible by ep_size=8"),
    (dict(tp_size=2, _vocab=255), r"vocab_size \(255\) is not divisible by tp_size=2"),
]
PRESETS = [
    ("kimi-k2.5-tiny", "ct-int4"),
    ("kimi-k2.5-tiny", "bf16"),
    ("deepseek-v3-tiny", "fp8-block"),
    ("kimi-k2.5-tiny", "quark-mxfp4"),
]


def _config(ck, overrides):
    config = json.loads(json.dumps(ck.config))
    text = config.get("text_config", config)
    for key, field in (("_heads", "num_attention_heads"), ("_experts", "n_routed_experts"), ("_vocab", "vocab_size")):
        if key in overrides:
            text[field] = overrides[key]
            if field == "num_attention_heads":
                text["num_key_value_heads"] = overrides[key]
    return config


@pytest.mark.parametrize(("preset", "quant"), PRESETS)
@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_bad_parallel_settings_fail_before_any_byte(synth_dir, preset, quant, setting, message):
    ck = kimi_loader.open(synth_dir(preset, quant))
    ranks = {k: v for k, v in setting.items() if not k.startswith("_")}
    with pytest.raises(InvalidArgumentError, match=message):
        for_config(_config(ck, setting), device="meta", **ranks)
    if any(k.startswith("_") for k in setting):
        return
    # a model built for one rank refuses a load for another layout, untouched
    model = for_config(ck.config)
    kimi_loader.load_weights(model, ck)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(InvalidArgumentError):  # its own message, or "the model was built for"
        kimi_loader.load_weights(model, ck, **ranks)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_the_load_takes_the_models_layout(synth_dir):
    ck = kimi_loader.open(synth_dir("deepseek-v3-tiny", "bf16"))
    model = for_config(ck.config, tp_rank=1, tp_size=2, ep_size=2)
    kimi_loader.load_weights(model, ck)  # ranks given once, when building the model
    assert model.parallel.ep_rank == 1
    with pytest.raises(InvalidArgumentError, match="the model was built for"):
        kimi_loader.load_weights(model, ck, tp_rank=0, tp_size=2, ep_size=2)


def test_readme_plan_examples(synth_dir, capsys):
    """The README's `plan` examples, on the synthetic checkpoint with Kimi-K2.5's head
    count and expert count (the tiny preset's 4 heads cannot be split 8 ways)."""
    path = synth_dir(
        "kimi-k2.5-tiny",
        "ct-int4",
        n_routed_experts=384,
        num_attention_heads=64,
        num_key_value_heads=64,
        num_hidden_layers=2,
        moe_intermediate_size=128,
    )
    assert main(["plan", path, "--tp-size", "8", "--tp-rank", "3", "--ep-size", "8", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tp"] == [3, 8] and s["ep"] == [3, 8] and s["moe_tp"] == [0, 1] and s["problems"] == ""
    assert main(["plan", path, "--tp-size", "8", "--tp-rank", "5", "--ep-size", "2", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["ep"] == [1, 2] and s["moe_tp"] == [1, 4] and s["problems"] == ""
    tiny = synth_dir("kimi-k2.5-tiny", "ct-int4")
    assert main(["plan", tiny, "--tp-size", "8", "--ep-size", "8"]) == 1
    assert "num_attention_heads (4) is not divisible by tp_size=8" in capsys.readouterr().err
