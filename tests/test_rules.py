"""The remaining naming rules, on small hand-made checkpoints and custom models: scale
remaps, Python rename hooks, the ``language_model.layers.`` export variant, declared
skips."""

from __future__ import annotations

import pytest
import torch
from reference import rewrite
from safetensors.torch import save_file
from torch import nn

import kimi_loader
from kimi_loader.hooks import identity_hook
from kimi_loader.models import DeepseekV3ForCausalLM


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, 2), requires_grad=False)
        self.k_scale = nn.Parameter(torch.empty(()), requires_grad=False)
        self.v_scale = nn.Parameter(torch.empty(()), requires_grad=False)
        self.q_scale = nn.Parameter(torch.empty(()), requires_grad=False)


class TinyModel(nn.Module):
    """A custom model: its rules as data plus a Python rename hook."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].self_attn = nn.Module()
        self.model.layers[0].self_attn.attn = Attn()
        self.model.renamed = nn.Parameter(torch.empty(3), requires_grad=False)
        self.stacked_params_mapping = []
        self.expert_params_mapping = []
        self.post_loaded = False

    def mutate_weight_preload(self, name: str) -> str | None:
        if name.endswith("legacy_name"):
            return name.replace("legacy_name", "renamed")
        if name.endswith("drop_me"):
            return None
        return name

    @identity_hook
    def custom_scale_remap(self, name: str) -> str:
        return name

    def post_load_weights(self, layers=None):
        self.post_loaded = True

    def weight_rules(self):
        return {
            "rewrites": [
                ("language_model.model.", "model."),
                ("language_model.layers.", "model.layers."),
                ("language_model.", ""),
            ],
            "ignore": [(None, "rotary_emb.inv_freq", "rope frequencies are recomputed")],
            "num_hidden_layers": 1,
            "scale_remaps": [
                (".k_proj.k_scale", ".attn.k_scale"),
                (".v_proj.v_scale", ".attn.v_scale"),
                (".q_proj.output_scale", ".attn.q_scale"),
            ],
        }


def test_scale_remaps_python_hooks_variant_prefix_and_skips(tmp_path):
    tensors = {
        # the `language_model.layers.` export variant (no `.model.`)
        "language_model.layers.0.self_attn.attn.weight": torch.arange(4.0).reshape(2, 2),
        "language_model.layers.0.self_attn.k_proj.k_scale": torch.tensor(0.5),
        "language_model.layers.0.self_attn.v_proj.v_scale": torch.tensor(0.25),
        "language_model.layers.0.self_attn.q_proj.output_scale": torch.tensor(2.0),  # Quark
        "language_model.model.legacy_name": torch.ones(3),
        "language_model.model.drop_me": torch.zeros(1),
        "language_model.model.rotary_emb.inv_freq": torch.ones(4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    model = TinyModel()
    report = kimi_loader.load_weights(model, tmp_path)
    attn = model.model.layers[0].self_attn.attn
    assert (attn.k_scale.item(), attn.v_scale.item(), attn.q_scale.item()) == (0.5, 0.25, 2.0)
    assert torch.equal(attn.weight, tensors["language_model.layers.0.self_attn.attn.weight"])
    assert torch.equal(model.model.renamed, torch.ones(3))
    assert model.post_loaded
    assert report.ignored == {"skipped by the model's mutate_weight_preload": 1, "rope frequencies are recomputed": 1}


def test_a_layer_beyond_the_config_is_an_error_not_dropped(tmp_path):
    """A layer at or beyond num_hidden_layers (with no declared MTP layer there) has no
    place in the model: strict loads refuse it, naming it and the rule."""
    tensors = {
        "language_model.layers.0.self_attn.attn.weight": torch.ones(2, 2),
        "language_model.layers.1.self_attn.attn.weight": torch.ones(2, 2),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    model = TinyModel()
    with pytest.raises(kimi_loader.IncompleteLoadError, match="layer 1 is beyond") as e:
        kimi_loader.load_weights(model, tmp_path)
    assert [n for n, _ in e.value.unused] == ["language_model.layers.1.self_attn.attn.weight"]


def test_language_model_layers_variant_into_the_serving_model(synth_dir, tmp_path):
    """A Kimi export that writes `language_model.layers.*` (no `.model.`) loads the same."""
    import json

    src = synth_dir("kimi-k2.5-tiny", "bf16")
    dst = rewrite(
        src, tmp_path / "variant", rename=lambda n: n.replace("language_model.model.layers.", "language_model.layers.")
    )
    assert "language_model.layers.1.mlp.gate.weight" in kimi_loader.open(dst)
    cfg = json.load(open(f"{dst}/config.json"))["text_config"]
    a, b = DeepseekV3ForCausalLM(cfg), DeepseekV3ForCausalLM(cfg)
    kimi_loader.load_weights(a, src)
    kimi_loader.load_weights(b, dst)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), n


# -- typed rules (issue #10) ----------------------------------------------------------------
def test_rules_are_typed_and_typos_are_refused(tmp_path):
    """A misspelt rule key, an unknown TP split or expert shard id, or an ignore rule that
    matches nothing is an InvalidArgumentError naming it, never silently ignored; the
    extension itself rejects keys it does not know."""
    from kimi_loader.rules import ExpertShard, PlannerRules, Split, WeightRules

    save_file({"language_model.model.legacy_name": torch.ones(3)}, tmp_path / "model.safetensors")
    model = TinyModel()
    good = model.weight_rules()
    for bad, match in [
        ({**good, "num_hidden_layer": 1}, "num_hidden_layer"),
        ({**good, "tp_rules": [("o_proj.", "rows")]}, "rows"),
        ({**good, "ignore": [(None, None, "nothing")]}, "matches nothing"),
    ]:
        model.weight_rules = lambda bad=bad: bad
        with pytest.raises(kimi_loader.InvalidArgumentError, match=match):
            kimi_loader.load_weights(model, tmp_path)
    with pytest.raises(TypeError):
        WeightRules(num_hidden_layer=1)  # a typo in code fails at construction
    with pytest.raises(kimi_loader.InvalidArgumentError, match="w4"):
        ExpertShard.parse("w4")
    assert (ExpertShard.W3.order, ExpertShard.W2.tp_split) == (1, Split.ROW)
    core = PlannerRules(WeightRules(num_experts=8)).to_core() | {"tp_sizee": 2}
    with pytest.raises(kimi_loader.InvalidArgumentError, match="unknown rule key 'tp_sizee'"):
        kimi_loader._core.plan(kimi_loader.open(tmp_path).core, core, [])
