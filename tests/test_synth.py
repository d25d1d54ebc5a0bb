"""The synthetic checkpoints have the real structure, naming and configs."""

from __future__ import annotations

import json
import os

import pytest

import kimi_loader
from conftest import QUANTS
from kimi_loader.synth import PRESETS, expected_tensor_count, make_checkpoint, text_config


@pytest.mark.parametrize("quant", QUANTS)
def test_kimi_tiny_structure(synth_dir, quant):
    path = synth_dir("kimi-k2.5-tiny", quant)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["architectures"] == ["KimiK25ForConditionalGeneration"] and cfg["model_type"] == "kimi_k25"
    tc = cfg["text_config"]
    assert tc["model_type"] == "kimi_k2" and tc["first_k_dense_replace"] == 1
    # the exporters write the wrapper's quantization_config at the top level
    assert ("quantization_config" in cfg) == (quant != "bf16") and "quantization_config" not in tc
    with kimi_loader.open(path) as ck:
        keys = set(ck.keys())
        assert len(keys) == expected_tensor_count("kimi-k2.5-tiny", quant)
        assert all(k.startswith(("language_model.", "vision_tower.", "mm_projector.")) for k in keys)
        assert (
            "language_model.model.layers.0.mlp.gate_proj." + ("weight_scale" if quant == "quark-mxfp4" else "weight")
            in keys
        )
        assert "language_model.model.layers.0.mlp.experts.0.gate_proj.weight" not in keys  # dense layer 0
        for layer in (1, 2):
            p = f"language_model.model.layers.{layer}.mlp"
            assert f"{p}.gate.e_score_correction_bias" in keys and f"{p}.gate.weight" in keys
            assert (
                sum(
                    1
                    for k in keys
                    if k.startswith(f"{p}.experts.")
                    and k.endswith("down_proj." + ("weight_packed" if quant == "ct-int4" else "weight"))
                )
                == tc["n_routed_experts"]
            )
            assert any(k.startswith(f"{p}.shared_experts.") for k in keys)
        assert "language_model.lm_head.weight" in keys and "language_model.model.norm.weight" in keys
        assert ck.files[0].endswith("model-00001-of-000004.safetensors")


def test_deepseek_tiny_has_mtp_layer_and_plain_names(synth_dir):
    path = synth_dir("deepseek-v3-tiny", "bf16")
    with kimi_loader.open(path) as ck:
        n = ck.config["num_hidden_layers"]
        assert ck.config["model_type"] == "deepseek_v3" and "text_config" not in ck.config
        assert f"model.layers.{n}.eh_proj.weight" in ck and f"model.layers.{n}.shared_head.head.weight" in ck
        assert "lm_head.weight" in ck and not any(k.startswith("language_model.") for k in ck.keys())
        assert ck.files[0].endswith("model-00001-of-00004.safetensors")


def test_same_seed_same_bytes_and_overrides(tmp_path):
    a = make_checkpoint(
        tmp_path / "a", preset="deepseek-v3-tiny", quant="ct-int4", seed=3, num_hidden_layers=3, num_shards=2
    )
    b = make_checkpoint(
        tmp_path / "b", preset="deepseek-v3-tiny", quant="ct-int4", seed=3, num_hidden_layers=3, num_shards=2
    )
    for f in sorted(os.listdir(a)):
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    with kimi_loader.open(a) as ck:
        assert ck.config["num_hidden_layers"] == 3 and len(ck.files) == 2


def test_fullcount_has_kimi_k25_real_tensor_count():
    cfg = text_config("kimi-k2.5-fullcount")
    assert (cfg["num_hidden_layers"], cfg["n_routed_experts"], PRESETS["kimi-k2.5-fullcount"][1]) == (61, 384, 64)
    n = expected_tensor_count("kimi-k2.5-fullcount", "ct-int4")
    # 60 MoE layers x 384 experts x 3 projections x 3 tensors, plus the rest
    assert 60 * 384 * 9 < n < 210_000


def test_fullcount_layout_at_reduced_depth(tmp_path):
    path = make_checkpoint(tmp_path / "fc", preset="kimi-k2.5-fullcount", num_hidden_layers=2)
    with kimi_loader.open(path) as ck:
        assert len(ck.files) == 64 and len(ck) == expected_tensor_count("kimi-k2.5-fullcount", num_hidden_layers=2)
        assert ck.files[-1].endswith("model-00064-of-000064.safetensors")


def test_bad_arguments(tmp_path):
    with pytest.raises(kimi_loader.InvalidArgumentError):
        make_checkpoint(tmp_path / "x", preset="llama")
    with pytest.raises(kimi_loader.InvalidArgumentError):
        make_checkpoint(tmp_path / "x", quant="gptq")
    with pytest.raises(kimi_loader.InvalidArgumentError):
        make_checkpoint(tmp_path / "x", quant="ct-int4", hidden_size=48)


def test_real_ignore_and_exclude_conventions(synth_dir):
    """Kimi-K2.5 (compressed-tensors) lists patterns; amd's Quark export lists every
    unquantized module by its full, prefixed name; both sit at the wrapper's top level."""
    ct = kimi_loader.open(synth_dir("kimi-k2.5-tiny", "ct-int4")).config
    assert "quantization_config" not in ct["text_config"]
    assert r"re:.*mlp\.(gate|up|gate_up|down)_proj.*" in ct["quantization_config"]["ignore"]
    ck = kimi_loader.open(synth_dir("kimi-k2.5-tiny", "quark-mxfp4"))
    exclude = ck.config["quantization_config"]["exclude"]
    bf16 = {
        n[: -len(".weight")]
        for n in ck.keys()
        if n.endswith(".weight")
        and ck.tensor_info(n).st_dtype == "BF16"
        and len(ck.tensor_info(n).shape) >= 2
        and "embed_tokens" not in n
    }
    assert set(exclude) == bf16 and not any(e.startswith("re:") for e in exclude)
    assert {
        "language_model.lm_head",
        "language_model.model.layers.0.self_attn.kv_b_proj",
        "language_model.model.layers.1.mlp.gate",
        "vision_tower.encoder.blocks.0.wqkv",
    } <= set(exclude)


def test_a_missing_optional_dependency_names_its_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors.pack_quantized.helpers", None)
    with pytest.raises(kimi_loader.UnsupportedFormatError, match=r"kimi-loader\[synth\]"):
        make_checkpoint(tmp_path / "x", quant="ct-int4")
