"""The runtime against transformers' DeepseekV3ForCausalLM (float32 logits, greedy
generation), shared-expert fusion equivalence, and per-layer post-load processing."""

from __future__ import annotations

import logging

import pytest
import torch

import kimi_loader
from kimi_loader.models.hf import empty_model

logging.getLogger("transformers").setLevel(logging.ERROR)


def _reference(path: str):
    """transformers' model holding the checkpoint's weights densely in float32 (quantized
    formats dequantized on load, bit-exactly as transformers / compressed-tensors do;
    tests/test_hf.py proves that equality)."""
    ref = empty_model(path, dtype=torch.float32)
    kimi_loader.load_weights(ref, path)
    return ref.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [
    ("deepseek-v3-tiny", "bf16"),
    ("kimi-k2.5-tiny", "bf16"),
    ("kimi-k2.5-tiny", "ct-int4"),
    ("deepseek-v3-tiny", "fp8-block"),
    ("kimi-k2.5-tiny", "quark-mxfp4"),
]


@pytest.mark.parametrize(("preset", "quant"), CASES)
def test_logits_match_transformers(synth_dir, preset, quant):
    path = synth_dir(preset, quant)
    ours = kimi_loader.from_pretrained(path)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = _reference(path)(ids).logits
    assert _rel(ours(ids), want) < 1e-4


def test_bf16_logits_match_transformers_own_from_pretrained(synth_dir):
    from transformers import DeepseekV3ForCausalLM

    path = synth_dir("deepseek-v3-tiny", "bf16")
    ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _rel(kimi_loader.from_pretrained(path)(ids), ref(ids).logits) < 1e-4


@pytest.mark.parametrize(("preset", "quant"), [("deepseek-v3-tiny", "bf16"), ("kimi-k2.5-tiny", "ct-int4")])
def test_greedy_generation_matches_transformers(synth_dir, preset, quant):
    path = synth_dir(preset, quant)
    ours = kimi_loader.from_pretrained(path)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(11))
    ref = _reference(path)
    want = ref.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=16)
    assert torch.equal(got, want)
    # the cache is what makes one-token steps right: step logits equal a full recompute
    cache = ours.new_cache()
    ours(got[:, :12], cache)
    step = ours(got[:, 12:13], cache)[:, -1]
    assert _rel(step, ours(got[:, :13])[:, -1]) < 1e-5


def test_fused_shared_expert_gives_the_same_logits(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "bf16", n_routed_experts=256, num_experts_per_tok=4, num_hidden_layers=2)
    ck = kimi_loader.open(path)
    assert kimi_loader.determine_num_fused_shared_experts(ck.config, ck)[0] == 1
    fused = kimi_loader.from_pretrained(path)
    assert fused.language_model.num_fused_shared_experts == 1
    unfused = kimi_loader.models.for_config(ck.config, dtype=torch.float32, num_fused_shared_experts=0)
    kimi_loader.load_weights(unfused, ck)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    assert _rel(fused(ids), unfused(ids)) < 1e-5
    with torch.no_grad():
        assert _rel(fused(ids), _reference(path)(ids).logits) < 1e-4


def test_post_load_weights_rebuilds_exactly_the_given_layers(synth_dir):
    model = kimi_loader.from_pretrained(synth_dir("deepseek-v3-tiny", "bf16"))
    layers = model.model.layers
    before = [(lay.self_attn.w_kc.clone(), lay.self_attn.w_vc.clone()) for lay in layers]
    for lay in layers:
        lay.self_attn.kv_b_proj.weight.mul_(2)
    model.post_load_calls.clear()
    model.post_load_weights(layers=[1])
    assert model.post_load_calls == [[1]]
    for i, lay in enumerate(layers):
        factor = 2 if i == 1 else 1  # only layer 1 was rebuilt from the doubled kv_b_proj
        assert torch.equal(lay.self_attn.w_kc, factor * before[i][0])
        assert torch.equal(lay.self_attn.w_vc, factor * before[i][1])
    c = model.config
    kv_b = layers[1].self_attn.kv_b_proj.weight.view(c["num_attention_heads"], -1, c["kv_lora_rank"])
    assert torch.equal(layers[1].self_attn.w_kc, kv_b[:, : c["qk_nope_head_dim"]])
    assert torch.equal(layers[1].self_attn.w_vc, kv_b[:, c["qk_nope_head_dim"] :].transpose(1, 2))


def test_logits_match_transformers_kimi_k25_class(synth_dir):
    """transformers' Kimi-K2.5 class as the reference (text-only input: its language model
    and head; the vision tower is declared not loaded)."""
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    ref = empty_model(path, dtype=torch.float32, wrapper=True)
    kimi_loader.load_weights(ref, path)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = ref.eval()(input_ids=ids).logits
    assert _rel(kimi_loader.from_pretrained(path)(ids), want) < 1e-4


def test_int4_logits_against_transformers_own_dequantization(synth_dir):
    """transformers loads and dequantizes the int4 checkpoint itself (in bf16, which is what
    `q * scale` produces anyway), then runs in float32."""
    from reference import hf_kimi_dequantized

    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    ref = hf_kimi_dequantized(path)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    assert _rel(kimi_loader.from_pretrained(path)(ids), want) < 1e-4


def test_mxfp4_logits_against_a_bf16_checkpoint_of_the_dequantized_weights(synth_dir, tmp_path):
    import json
    import os

    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from reference import load_all
    from safetensors.torch import save_file
    from transformers import DeepseekV3ForCausalLM

    path = synth_dir("deepseek-v3-tiny", "quark-mxfp4")
    out = tmp_path / "bf16"
    out.mkdir()
    tensors = load_all(path)
    dense = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        scale = tensors.get(name + "_scale")
        if scale is not None:  # an MXFP4 weight: dequantize with compressed-tensors' helpers
            rows, cols = t.shape[0], t.shape[1] * 2
            t = unpack_fp4_from_uint8(t, rows, cols, dtype=torch.bfloat16) * decompress_mx_scale(
                scale
            ).repeat_interleave(32, dim=1)
        dense[name] = t
    save_file(dense, out / "model.safetensors")
    config = json.load(open(os.path.join(path, "config.json")))
    config.pop("quantization_config")
    json.dump(config, open(out / "config.json", "w"))
    assert dense["model.layers.3.mlp.shared_experts.down_proj.weight"].shape == (64, 32)

    ref = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = ref(ids).logits
    assert _rel(kimi_loader.from_pretrained(path)(ids), want) < 1e-4


def test_generate_1d_eos_and_reprs(synth_dir):
    import kimi_loader
    from kimi_loader.rl import WeightUpdater

    path = synth_dir("kimi-k2.5-tiny", "bf16")
    model = kimi_loader.from_pretrained(path)
    ids = torch.tensor([3, 1, 4, 1, 5])
    full = model.generate(ids[None], 6)[0]
    flat = model.generate(ids, 6)
    assert flat.dim() == 1 and torch.equal(flat, full)
    eos = int(full[5 + 2])  # the third generated token
    stopped = model.generate(ids, 6, eos_token_id=eos)
    first = next(i for i in range(5, len(full)) if full[i] == eos)
    assert torch.equal(stopped, full[: first + 1])  # stops right after eos
    with pytest.raises(kimi_loader.InvalidArgumentError):
        model.generate(ids, -1)
    assert "layers" in repr(model) and "tp 0/1" in repr(model)
    report = kimi_loader.load_weights(kimi_loader.models.for_config(kimi_loader.open(path).config), path)
    assert repr(report).startswith("LoadReport(") and "GB/s" in repr(report)
    assert "version 0" in repr(WeightUpdater(model, baseline=path))


def test_post_load_of_a_layer_the_model_does_not_have(synth_dir):
    import kimi_loader

    model = kimi_loader.from_pretrained(synth_dir("kimi-k2.5-tiny", "bf16"))
    with pytest.raises(kimi_loader.InvalidArgumentError, match=r"\[3\] not layers of this model \(0\.\.2\)"):
        model.post_load_weights(layers=[3])
    model.post_load_weights(layers=[2])
