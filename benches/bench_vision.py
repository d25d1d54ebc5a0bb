"""Vision encode time per image size, CPU, float32 (informational: the kernels issue owns
GPU speed): ``KimiK25ForConditionalGeneration.image_features`` (tower + projector in
checkpoint layout) vs transformers' ``Kimi_K25ForConditionalGeneration`` vision tower +
projector, both holding the same weights: a Kimi-K2.5-wide tower (1152 hidden, 16 heads,
MLP 4304, 14 x 14 patches, 64 x 64 position table) with 4 of its 27 blocks, written by
transformers' own ``save_pretrained(save_original_format=True)`` (its reverse conversion:
q / k rows back to interleaved pairs, fused ``wqkv``) and loaded by each.

Run: ``make bench`` or ``python benches/bench_vision.py``.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

import kimi_loader
from _common import interleaved, row, section

LAYERS = 4


def _checkpoint() -> str:
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    path = os.path.join(os.path.dirname(__file__), "..", ".bench", f"vision-{LAYERS}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from kimi_loader.synth import text_config

    text = {**text_config("kimi-k2.5-tiny"), "model_type": "deepseek_v3", "num_hidden_layers": 1}
    config = Kimi_K25Config(
        text_config=text,
        vision_config={
            "hidden_size": 1152,
            "num_attention_heads": 16,
            "num_hidden_layers": LAYERS,
            "intermediate_size": 4304,
            "patch_size": 14,
        },
        projection_hidden_size=1152,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(path, save_original_format=True)
    # transformers 5.23's reverse conversion misnames three things: its "blocks" -> "layers"
    # rename reversed also renames the language model's layers, the patch embedding lands
    # under "encoder." and the projector's pre-norm keeps its "model." prefix: put them back
    from safetensors.torch import load_file, save_file

    fixes = (
        ("language_model.model.blocks.", "language_model.model.layers."),
        ("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed."),
        ("model.mm_projector.", "mm_projector."),
    )
    f = os.path.join(path, "model.safetensors")
    tensors = {}
    for k, v in load_file(f).items():
        for old, new in fixes:
            k = new + k[len(old) :] if k.startswith(old) else k
        tensors[k] = v
    save_file(tensors, f, metadata={"format": "pt"})
    return path


def main() -> None:
    from transformers import Kimi_K25ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    path = _checkpoint()
    ours = kimi_loader.from_pretrained(path)
    ref = Kimi_K25ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    print(f"vision encode, float32, CPU ({torch.get_num_threads()} threads), {LAYERS}-block Kimi-K2.5-wide tower")
    g = torch.Generator().manual_seed(0)
    for h, w in ((16, 16), (32, 24), (40, 40)):  # patches: 224 x 224, 448 x 336, 560 x 560 pixels
        grid = torch.tensor([[1, h, w]])
        pv = torch.randn(h * w, 3, 14, 14, generator=g)

        def theirs(pv=pv, grid=grid):
            with torch.no_grad():
                return ref.model.mm_projector(ref.model.vision_tower(pv, grid_thw=grid).pooler_output)

        err = (ours.image_features(pv, grid) - theirs().squeeze(1)).abs().max() / theirs().abs().max()
        times = interleaved({"ours": lambda pv=pv, grid=grid: ours.image_features(pv, grid), "hf": theirs}, 5)
        print(f" {h * 14} x {w * 14} pixels ({h * w} patches), max rel diff {err:.1e}")
        section(f"{h * 14}x{w * 14}")
        hb, hm = times["hf"]
        print(row("transformers tower + projector (best)", hb, hb, f"median {hm * 1e3:.1f} ms", hm, hm))
        ob, om = times["ours"]
        print(row("kimi_loader image_features (best)", ob, hb, f"median {om * 1e3:.1f} ms", om, hm))


if __name__ == "__main__":
    main()
