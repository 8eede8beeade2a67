"""
Memory per GPU under DDP and FSDP (--fsdp), Qwen2-VL-2B and Qwen2.5-VL-7B: CALCULATED, NOT MEASURED.

Per GPU: 2 prompts (so --batch-size 2 x GPUs), G = 8, 448x448 images, 256 new tokens, bf16
compute over fp32 master weights, AdamW. Parameter counts come from the real architectures
built on the meta device (nothing downloaded). A step's peak is the larger of its two phases:

- generation: the resident state (below) + the weights the decode reads in bf16 (DDP:
  autocast's bf16 copies of the fp32 trained weights; FSDP: every weight gathered whole in bf16,
  once per generate) + the KV cache;
- training: the resident state + the bf16 weights in use (DDP: autocast's copies; FSDP:
  the root's own weights, embeddings and LM head, whole, and two decoder layers at a time, one
  being used, one prefetched, and one layer's fp32 gradients before their reduce-scatter) +
  activations (bench/memory_2b.py's per-token estimate) + the LM head's logits chunk (1 GiB).

Resident: fp32 master weights, fp32 gradients and AdamW's two fp32 moments, 16 bytes per trained
parameter, and 2 per frozen one (visurf holds frozen weights in the compute dtype, bf16 here, and
autocast makes no copy of them), all of it divided by the number of GPUs under FSDP. DDP keeps its
gradient buckets through generation (docs/gpu.md); FSDP keeps sharded gradients. Activations are
the least certain figures.

    python bench/memory_fsdp.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_2b import IMAGE, NEW, TEXT, layer_bytes  # noqa: E402  (the same setting and estimate)
from memory_fit import build, vision_patch_bytes  # noqa: E402

GiB = 2**30
B, G = 2, 8                                   # per GPU
GPUS = (1, 2, 4, 8)
CARDS = (24, 40, 80)


def architecture(name):
    """-> (total, vision, root-owned parameters, one decoder layer's, text config, vision bytes per patch)."""
    model, tc, width, mlp, swiglu, depth = build(name)  # memory_fit.py's: the real architecture, on meta
    count = lambda m: sum(p.numel() for p in m.parameters())
    layers, blocks = model.model.language_model.layers, model.model.visual.blocks
    root = count(model) - sum(map(count, layers)) - sum(map(count, blocks))
    return (count(model), count(model.model.visual), root, count(layers[0]), tc, width * 4 * depth,
            vision_patch_bytes(width, mlp, swiglu, depth))


def per_gpu(arch, n, fsdp, frozen, ckpt):
    total, vis, root, layer, tc, boundary_patch, vis_patch = arch
    trained = total - vis if frozen else total
    h, i, L, kv = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_key_value_heads * 128
    patches = (IMAGE // 14) ** 2
    P, N = patches // 4 + TEXT, B * (G + 1)
    resident = (16 * trained + 2 * (total - trained)) / (n if fsdp else 1)
    kv_cache = B * G * (P + NEW) * L * 2 * kv * 2
    tokens_once, tokens_whole = B * P + N * NEW, N * (P + NEW)
    if ckpt:   # layer boundaries in fp32, and one layer's inside recomputed at a time
        act = tokens_whole * L * h * 4 + tokens_whole * layer_bytes(h, i, kv)
        act += 0 if frozen else B * patches * boundary_patch
    else:
        act = tokens_once * L * layer_bytes(h, i, kv)
        act += 0 if frozen else B * patches * vis_patch
    logits = min(N * NEW * tc.vocab_size * 4, GiB)
    if fsdp:
        generation = resident + 2 * total + kv_cache
        training = resident + 2 * root + 2 * 2 * layer + 4 * layer + act + logits
    else:  # autocast's copies: of the fp32 (trained) weights only
        generation = resident + 2 * trained + kv_cache
        training = resident + 2 * trained + act + logits
    return max(generation, training)


def main():
    print(__doc__.split("\n")[1] + "\n")
    print(f"Per GPU: B {B} prompts, G {G}, {IMAGE}x{IMAGE}, {NEW} new tokens. GiB = 2^30 bytes.\n")
    for name in ("Qwen2-VL-2B", "Qwen2.5-VL-7B"):
        arch = architecture(name)
        print(f"**{name}**: {arch[0] / 1e9:.2f}B parameters, {arch[1] / 1e9:.2f}B in the vision tower, "
              f"{arch[2] / 1e9:.2f}B owned by the root (embeddings, LM head, norms, patch embedding, merger)\n")
        print("| setting | 1 GPU | " + " | ".join(f"{e} {n} GPUs" for e in ("DDP", "FSDP") for n in GPUS[1:]) + " |")
        print("|---" * (2 * len(GPUS) - 1) + "|---|")
        for frozen in (False, True):
            for ckpt in (False, True):
                label = " ".join(f for f, on in (("--freeze-vision", frozen), ("--gradient-checkpointing", ckpt))
                                 if on) or "all trained"
                cells = [per_gpu(arch, 1, False, frozen, ckpt)]
                cells += [per_gpu(arch, n, e == "FSDP", frozen, ckpt) for e in ("DDP", "FSDP") for n in GPUS[1:]]
                print(f"| {label} | " + " | ".join(f"{c / GiB:.1f}{fits(c)}" for c in cells) + " |")
        print()
    print("Marks: the smallest card of " + ", ".join(f"{c} GiB" for c in CARDS) + " that holds it "
          "(a figure with no mark fits none).")


def fits(peak):
    card = next((c for c in CARDS if peak <= c * GiB), None)
    return f" ({card})" if card else ""


if __name__ == "__main__":
    main()
