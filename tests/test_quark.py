"""A real AMD Quark MXFP4 export (``amd-quark``'s ``ModelQuantizer`` + ``export_safetensors``,
on CPU), in the shape of amd/Kimi-K2.5-MXFP4: routed experts, shared expert and the dense
MLP in MXFP4 (uint8 E2M1 pairs, uint8 E8M0 scales), attention, router and head in BF16, the
``exclude`` list written by Quark as explicit module names (with the wrapper's
``language_model.`` prefix for a Kimi-K2.5 checkpoint). Oracles: Quark's own
``fake_quantized`` export of the same model (its dequantization), transformers' forward
and ``generate``.

Quark's exporter quantizes ``nn.Linear`` modules; transformers 5 holds experts as 3-D
parameters, so the per-expert module tree an exporter's model has is built from
transformers' ``save_pretrained`` output (and exporting transformers' own model is checked
too: Quark then leaves the fused experts in BF16)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from reference import load_all, module_tree, stack_experts
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedModel

import kimi_loader
from kimi_loader.inspect import summarize
from kimi_loader.models.hf import empty_model

# Quark JIT-builds a small C++ extension with ninja, which the venv holds (`make test`
# puts the venv first on PATH; a bare `.venv/bin/python -m pytest` does not)
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
quark_torch = pytest.importorskip("quark.torch", reason="amd-quark is installed by `make test`")
from quark.torch.quantization.config.config import OCP_MXFP4Spec, QConfig, QLayerConfig  # noqa: E402
from test_writers import _BASE, CONFIGS  # noqa: E402

#: amd/Kimi-K2.5-MXFP4's exclusions, as patterns; Quark writes the module names they match
EXCLUDE = ["*lm_head", "*self_attn*", "*mlp.gate"]


class _Exported(PreTrainedModel):
    """A transformers model whose modules are the checkpoint's per-expert linears."""

    config_class = DeepseekV3Config
    _supports_sdpa = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def __init__(self, config, tensors):
        super().__init__(config)
        for name, child in module_tree(tensors).named_children():
            self.add_module(name, child)


def _quantize(model, dst, weight_format: str) -> None:
    weight = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=False).to_quantization_spec()
    inputs = OCP_MXFP4Spec(ch_axis=-1, is_dynamic=True).to_quantization_spec()
    quantizer = quark_torch.ModelQuantizer(
        QConfig(global_quant_config=QLayerConfig(weight=weight, input_tensors=inputs), exclude=EXCLUDE)
    )
    model = quantizer.freeze(quantizer.quantize_model(model, None))
    quark_torch.export_safetensors(model, os.fspath(dst), weight_format=weight_format)


def _wrap_kimi(path) -> None:
    """The Kimi-K2.5 wrapper config around Quark's, ``quantization_config`` at the top."""
    with open(os.path.join(path, "config.json")) as fh:
        text = json.load(fh)
    qc = text.pop("quantization_config")
    config = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": {**text, "model_type": "kimi_k2"},
        "quantization_config": qc,
        "tie_word_embeddings": False,
    }
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    torch.manual_seed(5)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**_BASE, **CONFIGS["qlora-dense-yarn"]))
    path = tmp_path_factory.mktemp("quark-src")
    model.save_pretrained(path, save_original_format=True)
    return os.fspath(path)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """prefix -> (real MXFP4 export, Quark's fake-quantized twin)."""
    made = {}

    def get(prefix: str):
        if prefix not in made:
            tensors = {prefix + k: v.to(torch.bfloat16) for k, v in load_all(source).items()}
            config = DeepseekV3Config.from_pretrained(source)
            out = []
            for fmt in ("real_quantized", "fake_quantized"):
                path = tmp_path_factory.mktemp(f"quark-{fmt}")
                _quantize(_Exported(config, tensors), path, fmt)
                if prefix:
                    _wrap_kimi(path)
                out.append(os.fspath(path))
            made[prefix] = tuple(out)
        return made[prefix]

    return get


def _oracle(source: str, weights: dict[str, torch.Tensor]) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name] if name in weights else weights[name + ".weight"])
    return model


@pytest.mark.parametrize("prefix", ["", "language_model."])
def test_quark_mxfp4_export(source, exported, prefix):
    real, fake = exported(prefix)
    ck = kimi_loader.open(real)
    e0 = f"{prefix}model.layers.1.mlp.experts.0.gate_proj."
    for part in (e0, f"{prefix}model.layers.1.mlp.shared_experts.down_proj.", f"{prefix}model.layers.0.mlp.up_proj."):
        assert {ck.tensor_info(part + t).st_dtype for t in ("weight", "weight_scale")} == {"U8"}
    assert ck.tensor_info(f"{prefix}model.layers.1.self_attn.q_a_proj.weight").st_dtype == "BF16"
    with open(os.path.join(real, "config.json")) as fh:
        exclude = json.load(fh)["quantization_config"]["exclude"]
    assert f"{prefix}lm_head" in exclude and f"{prefix}model.layers.2.self_attn.o_proj" in exclude
    summary = summarize(ck)
    assert summary["quant_format"] == "quark-mxfp4" and summary["problems"] == []

    # dequantize-on-load into transformers' model == Quark's own fake-quantized export
    dequantized = stack_experts(
        {k[len(prefix) :]: v for k, v in load_all(fake).items() if not k.endswith("weight_scale")}
    )
    hf = empty_model(real, dtype=torch.bfloat16)
    report = kimi_loader.load_weights(hf, real)
    assert report.missing == [] and report.unused == []
    for name, v in hf.state_dict().items():
        want = dequantized[name] if name in dequantized else dequantized[name + ".weight"]
        assert torch.equal(v, want), name

    # the serving runtime keeps MXFP4 where the export has it and matches transformers
    # (float32) on Quark's dequantized weights; greedy decoding agrees
    ours = kimi_loader.from_pretrained(real)
    lm = getattr(ours, "language_model", ours)
    assert lm.model.layers[1].mlp.experts.format == "quark-mxfp4"
    assert lm.model.layers[1].mlp.shared_experts.gate_up_proj.format == "quark-mxfp4"
    assert lm.model.layers[0].self_attn.q_b_proj.format == "bf16"
    oracle = _oracle(source, {k: v.float() for k, v in dequantized.items()})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = oracle(ids).logits
        want_tokens = oracle.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert (ours(ids) - want).abs().max() / want.abs().max() < 1e-4
    assert torch.equal(ours.generate(ids[:1], 6), want_tokens)


def test_quark_export_of_transformers_model_leaves_fused_experts_bf16(source, tmp_path):
    """Quark on transformers' own model: the 3-D experts are not ``nn.Linear``, so the
    export keeps them fused and BF16 while the shared expert and dense MLP are MXFP4 (a
    mixed-precision checkpoint no config entry describes)."""
    model = DeepseekV3ForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    _quantize(model, tmp_path / "real", "real_quantized")
    model = DeepseekV3ForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    _quantize(model, tmp_path / "fake", "fake_quantized")
    real = os.fspath(tmp_path / "real")
    ck = kimi_loader.open(real)
    # open() presents the 3-D tensor as per-expert views
    assert ck.tensor_info("model.layers.1.mlp.experts.0.gate_proj.weight").st_dtype == "BF16"
    assert ck.tensor_info("model.layers.1.mlp.shared_experts.up_proj.weight").st_dtype == "U8"

    dequantized = stack_experts(
        {k: v for k, v in load_all(tmp_path / "fake").items() if not k.endswith("weight_scale")}
    )
    hf = empty_model(real, dtype=torch.bfloat16)
    report = kimi_loader.load_weights(hf, real)
    assert report.missing == [] and report.unused == []
    for name, v in hf.state_dict().items():
        want = dequantized[name] if name in dequantized else dequantized[name + ".weight"]
        assert torch.equal(v, want.to(v.dtype)), name

    ours = kimi_loader.from_pretrained(real)
    moe = ours.model.layers[1].mlp
    assert moe.experts.format == "bf16" and moe.shared_experts.gate_up_proj.format == "quark-mxfp4"
    oracle = _oracle(source, {k: v.float() for k, v in dequantized.items()})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = oracle(ids).logits
    assert (ours(ids) - want).abs().max() / want.abs().max() < 1e-4
