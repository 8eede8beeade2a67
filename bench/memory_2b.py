"""
Qwen2-VL-2B's memory and time for one visurf step, by arithmetic: CALCULATED, NOT MEASURED.

The setting is the README's: B = 2 prompts, G = 8 rollouts (G+1 = 9 sequences per
prompt), 448x448 images, 256 new tokens, fp32 master weights with bf16 autocast, AdamW.
Parameter counts come from the real architecture built on the meta device (no weights,
no download); everything else is the formula printed beside it. Activation sizes are an
estimate of what autograd keeps per token and layer (listed in `layer_bytes`), not a
profile; they are the least certain numbers here.

    python bench/memory_2b.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vs_trl import ARCHS  # noqa: E402  (the same 2B architecture the speed bench builds)

GB = 1e9
B, G, IMAGE, NEW, TEXT = 2, 8, 448, 256, 70   # TEXT: the prompt's text tokens (chat template + question)
N = B * (G + 1)                              # sequences in the update
BANDWIDTH = {"A100 80GB (2.0 TB/s)": 2.0e12, "H100 SXM (3.35 TB/s)": 3.35e12}
BF16_FLOPS = {"A100 (312 TFLOP/s)": 312e12, "H100 SXM (989 TFLOP/s)": 989e12}


def counts():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    text, vision = (dict(x) for x in ARCHS["2b"])
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": text.pop("mrope_section")}
    config = Qwen2VLConfig(text_config=dict(vocab_size=151936, rope_parameters=rope, tie_word_embeddings=True, **text),
                           vision_config=dict(hidden_size=text["hidden_size"], **vision), tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    total, vis = (sum(p.numel() for p in m.parameters()) for m in (model, model.model.visual))
    return total, vis, config


def layer_bytes(h, i, kv, dtype=2):
    """What one decoder layer keeps per token for backward (bf16 under autocast, the
    residual stream and the RMSNorm inputs in fp32): norms' inputs and outputs, q/k/v
    before and after rotary, the attention output, o_proj, the MLP's gate, up, act(gate),
    their product."""
    return (2 * h * 4 + 2 * h * dtype) + 2 * (h + 2 * kv) * dtype + 2 * h * dtype + 4 * i * dtype


def main():
    total, vis, config = counts()
    lm = total - vis
    tc, vc = config.text_config, config.vision_config
    h, i, L, kv = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_key_value_heads * 128
    patches = (IMAGE // 14) ** 2                  # per image, before the 2x2 merge
    P = patches // 4 + TEXT                       # prompt tokens
    per_token = L * layer_bytes(h, i, kv)
    vis_per_patch = vc.depth * (2 * vc.embed_dim * 4 + 6 * vc.embed_dim * 2 + 3 * vc.embed_dim * vc.mlp_ratio * 2)
    tokens_once, tokens_whole = B * P + N * NEW, N * (P + NEW)   # prompt once (default) vs every sequence whole
    rows = {
        "weights, fp32": (4 * total, 4 * total),
        "gradients, fp32": (4 * total, 4 * lm),
        "AdamW state, 2 x fp32": (8 * total, 8 * lm),
        "bf16 weight copies (autocast)": (2 * total, 2 * total),
        "KV cache, generation (bf16)": (B * G * (P + NEW) * L * 2 * kv * 2,) * 2,
        "LM-head logits, fp32 (chunk budget)": (min(N * NEW * tc.vocab_size * 4, 2**30),) * 2,
    }
    act = {False: (tokens_once * per_token, B * patches * vis_per_patch),
           True: (tokens_whole * L * h * 4 + tokens_whole * layer_bytes(h, i, kv), B * patches * vc.embed_dim * 4 * vc.depth)}
    print(f"Qwen2-VL-2B: {total / 1e6:,.0f}M parameters, {vis / 1e6:,.0f}M in the vision tower, "
          f"{lm / 1e6:,.0f}M in the language model (incl. the tied embedding)")
    print(f"B {B}, G {G}, {IMAGE}x{IMAGE} ({patches} patches, {patches // 4} image tokens), prompt ~{P} tokens, "
          f"{NEW} new tokens; {N} sequences; training tokens: {tokens_once:,} with the prompt run once, "
          f"{tokens_whole:,} with every sequence whole (gradient checkpointing)\n")
    print("All figures CALCULATED, not measured (GB = 1e9 bytes).\n")
    print("| item | all trained | --freeze-vision |\n|---|---|---|")
    for k, (a, b) in rows.items():
        print(f"| {k} | {a / GB:.1f} | {b / GB:.1f} |")
    fixed = [sum(v[j] for v in rows.values()) for j in (0, 1)]
    for ckpt in (False, True):
        lang, visual = act[ckpt]
        name = "with" if ckpt else "without"
        print(f"| activations {name} --gradient-checkpointing: language model | {lang / GB:.1f} | {lang / GB:.1f} |")
        print(f"| activations {name} --gradient-checkpointing: vision tower | {visual / GB:.1f} | 0.0 |")
    print()
    print("| setting | peak GB | fits 40 GiB | fits 80 GiB |\n|---|---|---|---|")
    for frozen in (False, True):
        for ckpt in (False, True):
            lang, visual = act[ckpt]
            peak = fixed[frozen] + lang + (0 if frozen else visual)
            name = " ".join(f for f, on in (("--freeze-vision", frozen), ("--gradient-checkpointing", ckpt)) if on)
            print(f"| {name or 'defaults'} | {peak / GB:.1f} | {'yes' if peak < 40 * 2**30 else 'no'} | "
                  f"{'yes' if peak < 80 * 2**30 else 'no'} |")
    read = 2 * lm + B * G * (P + NEW) * L * 2 * kv * 2   # bf16 weights + the whole KV cache, per decode step
    print(f"\nDecode bound: every new token reads the language model's bf16 weights and the KV cache, "
          f"at most {read / GB:.2f} GB per step:")
    for name, bw in BANDWIDTH.items():
        print(f"- {name}: {read / bw * 1e3:.2f} ms per token, {NEW * read / bw:.2f} s for {NEW} tokens")
    visurf, grpo = step_flops(lm, vis, tc.vocab_size * h, patches, P, B, G, NEW)
    print(f"Compute, 2 FLOP per parameter and token forward, 6 forward and backward (attention's own "
          f"products left out): {visurf / 1e12:.0f} TFLOP per step:")
    for name, f in BF16_FLOPS.items():
        print(f"- {name}: {visurf / f:.2f} s at 100% utilisation, {visurf / f / 0.4:.2f} s at 40%")
    print(f"The same count for TRL's GRPO step on the same batch (G sequences per prompt, each with its image and "
          f"prompt, in generation and in training; the LM head at completion positions only): "
          f"{grpo / 1e12:.0f} TFLOP, so visurf's is {visurf / grpo:.2f}x of it.")


def step_flops(lm, vis, head, patches, P, B, G, NEW):
    """(visurf's ViSurf step, TRL's GRPO step) in FLOP. visurf runs the image and the prompt
    once per prompt, in generation and in training, and G+1 completions; TRL runs them once
    per sequence, and G completions. The LM head runs at completion positions only (and once
    per decode step), the rest of the language model (`body`) at every position."""
    body = lm - head
    decode = 2 * lm * B * G * NEW                       # the same G samples per prompt on both sides
    visurf = (2 * vis * B * patches + 2 * body * B * P + decode
              + 6 * vis * B * patches + 6 * body * B * P + 6 * lm * B * (G + 1) * NEW)
    grpo = (2 * vis * B * G * patches + 2 * body * B * G * P + decode
            + 6 * vis * B * G * patches + 6 * body * B * G * P + 6 * lm * B * G * NEW)
    return visurf, grpo


if __name__ == "__main__":
    main()
