"""
Which settings fit one 24, 40 or 80 GiB GPU: Qwen2-VL-2B and Qwen2.5-VL-7B, full training,
--freeze-vision and --lora 8, with and without --gradient-checkpointing. CALCULATED, NOT MEASURED.

The setting is bench/memory_2b.py's (B 2, G 8, 448x448, 256 new tokens, bf16 autocast, AdamW)
and so are its estimates of what autograd keeps per token (`layer_bytes`); what is new is what
stays fp32 and what is bf16 since frozen weights are held in the compute dtype:
- weights: trained ones fp32 (AdamW's masters), frozen ones bf16 (the vision tower under
  --freeze-vision; everything but the adapters under --lora);
- gradients and AdamW's two moments: fp32, for what trains only;
- autocast's bf16 copies: of the trained fp32 weights only (a bf16 weight needs none);
- activations: the language model's as in memory_2b.py for every setting (gradients reach
  every layer's adapters, so each layer keeps what it kept before; the residual stream is bf16
  under --lora, where the embedding is frozen in bf16, fp32 otherwise); the vision tower's only
  when it trains;
- the KV cache of generation and the LM head's fp32 logits (at most its 1 GiB chunk budget),
  counted as if all of it were alive at once, as memory_2b.py does.
Parameter counts come from the real architectures built on the meta device (no download).
A reference model (--beta > 0, not ViSurf's setting) would add a full copy of the weights,
frozen and so bf16, without --lora and nothing with it (the base, adapters off); it is listed,
not summed.

    python bench/memory_fit.py
"""
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from memory_2b import B, G, IMAGE, NEW, TEXT, N, layer_bytes  # noqa: E402

GiB = 2**30
RANK = 8
LORA_MODULES = r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"  # visurf's default


def build(name):
    """The architecture on the meta device -> (model, text config, vision width, vision MLP width, SwiGLU vision)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    if name == "Qwen2-VL-2B":
        text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
        cls, config = Qwen2VLForConditionalGeneration, Qwen2VLConfig(text_config=text, vision_config=vision,
                                                                       tie_word_embeddings=True)
        width, mlp, swiglu = 1280, 4 * 1280, False
    else:  # Qwen2.5-VL-7B-Instruct's config.json
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
        cls, config = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                             tie_word_embeddings=False)
        width, mlp, swiglu = 1280, 3420, True
    with torch.device("meta"):
        model = cls(config)
    return model, config.text_config, width, mlp, swiglu, config.vision_config.depth


def vision_patch_bytes(d, i, swiglu, depth):
    """What one vision block keeps per patch (bf16 products, fp32 norm inputs), times the depth."""
    mlp = 4 * i * 2 if swiglu else 3 * i * 2   # SwiGLU: gate, up, act(gate), product; GELU MLP: fc1, act, fc2 in
    return depth * (2 * d * 4 + 6 * d * 2 + mlp)


def rows(name):
    model, tc, vd, vi, swiglu, depth = build(name)
    total = sum(p.numel() for p in model.parameters())
    vis = sum(p.numel() for p in model.model.visual.parameters())
    lm = total - vis
    adapters = sum(RANK * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and re.fullmatch(LORA_MODULES, n))
    h, i, L, kv = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_key_value_heads * 128
    patches = (IMAGE // 14) ** 2
    P = patches // 4 + TEXT
    tokens_once, tokens_whole = B * P + N * NEW, N * (P + NEW)
    kv_cache = B * G * (P + NEW) * L * 2 * kv * 2
    logits = min(N * NEW * tc.vocab_size * 4, GiB)
    out = {}
    for setting, trained, frozen in (("full", total, 0), ("--freeze-vision", lm, vis), (f"--lora {RANK}", adapters, total)):
        lora = setting.startswith("--lora")
        residual = 2 if lora else 4
        fixed = {"weights (trained fp32, frozen bf16)": 4 * (0 if lora else trained) + 2 * frozen,
                 "adapters, fp32": 4 * adapters if lora else 0,
                 "gradients, fp32": 4 * trained, "AdamW state, 2 x fp32": 8 * trained,
                 "autocast's bf16 copies of trained weights": 2 * trained,
                 "KV cache, generation (bf16)": kv_cache, "LM-head logits, fp32 (chunk budget)": logits}
        for ckpt in (False, True):
            lang = (tokens_whole * L * h * residual + tokens_whole * layer_bytes(h, i, kv) if ckpt
                    else tokens_once * L * layer_bytes(h, i, kv))
            visual = 0 if setting != "full" else (B * patches * vd * 4 * depth if ckpt
                                                   else B * patches * vision_patch_bytes(vd, vi, swiglu, depth))
            out[setting + (" --gradient-checkpointing" if ckpt else "")] = dict(
                fixed, **{"activations, language model": lang, "activations, vision tower": visual},
                reference=0 if lora else 2 * total)  # frozen whole: bf16
    return out, total, vis, adapters


def main():
    print(f"B {B}, G {G}, {IMAGE}x{IMAGE}, {NEW} new tokens, bf16 autocast; LoRA rank {RANK} on every linear layer of "
          f"the language model. All figures CALCULATED, not measured, in GiB (2^30 bytes).\n")
    for name in ("Qwen2-VL-2B", "Qwen2.5-VL-7B"):
        table, total, vis, adapters = rows(name)
        print(f"{name}: {total / 1e9:.2f}B parameters, {vis / 1e9:.2f}B in the vision tower; "
              f"{adapters / 1e6:.1f}M adapter parameters at rank {RANK}\n")
        settings = list(table)
        print("| item | " + " | ".join(settings) + " |\n|---|" + "---|" * len(settings))
        items = [k for k in table[settings[0]] if k != "reference"]
        for k in items:
            print(f"| {k} | " + " | ".join(f"{table[s][k] / GiB:.1f}" for s in settings) + " |")
        peaks = {s: sum(v for k, v in table[s].items() if k != "reference") for s in settings}
        print("| **peak** | " + " | ".join(f"**{peaks[s] / GiB:.1f}**" for s in settings) + " |")
        for cap in (24, 40, 80):
            print(f"| fits {cap} GiB | " + " | ".join("yes" if peaks[s] < cap * GiB else "no" for s in settings) + " |")
        print("| (not summed) reference model, --beta > 0 | "
              + " | ".join(f"{table[s]['reference'] / GiB:.1f}" for s in settings) + " |\n")


if __name__ == "__main__":
    main()
