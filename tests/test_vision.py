"""Kimi-K2.5's vision tower and projector (models/vision.py) against transformers'
Kimi_K25ForConditionalGeneration loading the same synthetic checkpoint by itself (its own
conversion: wqkv split, q/k rows permuted for rotate-half RoPE, renames): float32
features for several image sizes (non-square, odd patch grids, resampled and native
position tables, a 2-frame clip, a batch of images of different sizes), full image + text
logits and greedy tokens; strict completeness, text_only, hot reload of vision weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

import kimi_loader
from kimi_loader.errors import IncompleteLoadError, InvalidArgumentError

pytest.importorskip("transformers")
from transformers import CompressedTensorsConfig, Kimi_K25ForConditionalGeneration

#: the synthetic tower: patch embedding (weight, bias, position table), 2 blocks of 12,
#: the final norm (2); the projector: pre-norm and two linears (6)
VISION_TENSORS = 3 + 2 * 12 + 2 + 6

GRIDS = [
    [[1, 8, 8]],  # the table's own size: no resampling
    [[1, 4, 6]],  # non-square, smaller
    [[1, 10, 14]],  # odd patch-merge grid (5 x 7), larger than the table
    [[2, 6, 4]],  # a 2-frame clip: frames pooled, time embedding
    [[1, 4, 6], [1, 12, 8], [1, 2, 2]],  # a batch of three sizes: attention must not mix them
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _pixels(grid: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.tensor(grid)
    n = int(g.prod(-1).sum())
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)), g


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(checkpoint, transformers' own load of it, ours) for a bf16 Kimi-K2.5 checkpoint."""
    from kimi_loader.synth import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("vision") / "k", quant="bf16")
    ref = Kimi_K25ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref, kimi_loader.from_pretrained(path)


def _theirs(ref, pv: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # (tower + projector: get_image_features cannot split clips)
        return ref.model.mm_projector(ref.model.vision_tower(pv, grid_thw=grid).pooler_output).squeeze(1)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "+".join("x".join(map(str, x)) for x in g))
def test_image_features_match_transformers(pair, grid):
    _path, ref, ours = pair
    pv, g = _pixels(grid, seed=len(grid) * 7 + grid[0][2])
    got = ours.image_features(pv, g)
    want = _theirs(ref, pv, g)
    assert got.shape == want.shape == (sum(t and h * w // 4 for t, h, w in grid), 64)
    assert _rel(got, want) < 1e-4


def test_images_in_a_batch_do_not_attend_to_each_other(pair):
    _path, _ref, ours = pair
    pv, g = _pixels([[1, 4, 6], [1, 8, 8]], seed=1)
    both = ours.image_features(pv, g)
    first = ours.image_features(pv[:24], g[:1])
    other = pv.clone()
    other[24:] = torch.randn(64, 3, 4, 4)  # another second image leaves the first's features alone
    # (equal up to GEMM blocking: images of other sizes change the matmul shapes)
    assert _rel(both[:6], first) < 1e-6
    assert _rel(ours.image_features(other, g)[:6], first) < 1e-6


def _prompt(n_features: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 250, (1, n_features + 9), generator=torch.Generator().manual_seed(seed))
    ids[0, 4 : 4 + n_features] = 255  # media_placeholder_token_id of the synthetic config
    return ids


def test_image_and_text_logits_and_greedy_tokens_match_transformers(pair):
    _path, ref, ours = pair
    pv, g = _pixels([[1, 4, 6], [1, 8, 4]], seed=3)
    ids = _prompt(6 + 8, seed=5)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv, image_grid_thw=g).logits
    got = ours(ids, pixel_values=pv, image_grid_thw=g)
    assert _rel(got, want) < 1e-4
    # greedy: transformers re-run on the whole sequence each step, ours with the KV cache
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = ref(input_ids=seq, pixel_values=pv, image_grid_thw=g).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(ours.generate(ids, 5, pixel_values=pv, image_grid_thw=g), seq)
    # the image changes the answer (the features really are spliced in)
    assert not torch.equal(ours(ids), got)


def test_int4_checkpoint_image_logits_match_transformers(synth_dir):
    from reference import hf_kimi_dequantized

    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    ref = hf_kimi_dequantized(path)
    pv, g = _pixels([[1, 6, 6]], seed=8)
    ids = _prompt(9, seed=2)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv, image_grid_thw=g).logits
    assert _rel(kimi_loader.from_pretrained(path)(ids, pixel_values=pv, image_grid_thw=g), want) < 1e-4


@pytest.mark.parametrize("quant", ["bf16", "fp8-block", "ct-int4", "quark-mxfp4"])
def test_every_format_keeps_the_tower_in_bf16_and_loads_it(synth_dir, quant):
    path = synth_dir("kimi-k2.5-tiny", quant)
    ck = kimi_loader.open(path)
    vision = [n for n in ck.keys() if n.startswith(("vision_tower.", "mm_projector."))]
    assert len(vision) == VISION_TENSORS
    assert {ck.tensor_info(n).st_dtype for n in vision} == {"BF16"}
    model = kimi_loader.from_pretrained(path)
    for name, p in [
        *model.vision_tower.named_parameters(prefix="vision_tower"),
        *model.mm_projector.named_parameters(prefix="mm_projector"),
    ]:
        assert torch.equal(p, ck.get_tensor(name).float()), name


def _without(path: str, drop: str, out: str) -> str:
    """A copy of checkpoint ``path`` without tensor ``drop``."""
    from safetensors.torch import save_file

    os.makedirs(out)
    ck = kimi_loader.open(path)
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shards: dict[str, dict] = {}
    for name, f in index["weight_map"].items():
        if name != drop:
            shards.setdefault(f, {})[name] = ck.get_tensor(name)
    for f, tensors in shards.items():
        save_file(tensors, os.path.join(out, f), metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if n != drop}
    json.dump(index, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    with open(os.path.join(path, "config.json")) as src, open(os.path.join(out, "config.json"), "w") as dst:
        dst.write(src.read())
    return out


@pytest.mark.parametrize(
    "drop",
    [
        "vision_tower.patch_embed.pos_emb.weight",
        "vision_tower.encoder.blocks.1.wqkv.bias",
        "vision_tower.encoder.final_layernorm.weight",
        "mm_projector.proj.2.bias",
    ],
)
def test_a_missing_vision_tensor_fails_the_load_naming_it(synth_dir, tmp_path, drop):
    path = _without(synth_dir("kimi-k2.5-tiny", "bf16"), drop, os.fspath(tmp_path / "cut"))
    with pytest.raises(IncompleteLoadError, match=drop.replace(".", r"\.")):
        kimi_loader.from_pretrained(path)
    # text_only=True: the vision tensors are skipped by a declared rule, listed in the report
    model = kimi_loader.from_pretrained(path, text_only=True)
    assert not hasattr(model, "vision_tower") and "text_only" in repr(model)
    report = kimi_loader.load_weights(model, path)
    tower = "vision tower: loaded text_only=True"
    projector = "multimodal projector: loaded text_only=True"
    dropped_projector = drop.startswith("mm_projector.")
    assert report.ignored == {tower: 29 - (not dropped_projector), projector: 6 - dropped_projector}
    with pytest.raises(InvalidArgumentError, match="text_only"):
        model.image_features(*_pixels([[1, 4, 4]], seed=0))


def test_hot_reload_updates_the_vision_weights(synth_dir, tmp_path):
    from kimi_loader.rl import WeightUpdater
    from kimi_loader.synth import make_checkpoint

    a = synth_dir("kimi-k2.5-tiny", "bf16")
    b = make_checkpoint(tmp_path / "b", quant="bf16", seed=1)
    model = kimi_loader.from_pretrained(a)
    pv, g = _pixels([[1, 4, 6]], seed=4)
    before = model.image_features(pv, g)
    ckb = kimi_loader.open(b)
    vision = [(n, ckb.get_tensor(n)) for n in ckb.keys() if n.startswith(("vision_tower.", "mm_projector."))]
    report = WeightUpdater(model, baseline=a).update_from_tensors(vision)
    assert report.changed_tensors == len(vision)
    want = kimi_loader.from_pretrained(b).image_features(pv, g)
    got = model.image_features(pv, g)
    assert torch.equal(got, want) and not torch.equal(got, before)


@pytest.mark.parametrize("quant", ["bf16", "ct-int4"])
def test_loading_into_transformers_class_equals_its_own_from_pretrained(synth_dir, quant):
    """The copy plan into transformers' Kimi_K25ForConditionalGeneration (wqkv cut into
    q/k/v_proj, q / k rows reordered per head, renames) gives every parameter bit for bit
    what transformers' own from_pretrained gives, vision tower and projector included."""
    from kimi_loader.models.hf import empty_model

    path = synth_dir("kimi-k2.5-tiny", quant)
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quant == "ct-int4" else {}
    want = Kimi_K25ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, **kw)
    ours = empty_model(path, dtype=torch.bfloat16, wrapper=True)
    report = kimi_loader.load_weights(ours, path)
    assert not report.skipped_destinations and not report.ignored
    theirs = dict(want.named_parameters())
    names = dict(ours.named_parameters())
    assert sorted(names) == sorted(theirs)
    vision = [n for n in names if ".vision_tower." in n or ".mm_projector." in n]
    assert len(vision) == VISION_TENSORS + 2 * 2 * 2  # wqkv weight and bias become three each
    for n, p in names.items():
        assert torch.equal(p.view(torch.int16), theirs[n].view(torch.int16)), n
