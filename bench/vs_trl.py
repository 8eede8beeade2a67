"""
visurf's training step next to TRL's GRPOTrainer step, like for like, in one run.

Both sides load the same saved weights, take the same prompts and images, sample G
completions of exactly --new-tokens tokens (min_new_tokens = max_new_tokens, since
random weights never stop at EOS), use beta = 0, one update per generation batch and
the same optimizer (torch's fused AdamW). Each side runs in its own process, so its peak
memory is its own; the sides are interleaved over --reps repetitions with the order
rotated each time, the thread count pinned, and the machine's load average recorded.

Memory on CPU is the process's peak RSS, which also counts freed memory that glibc's
allocator keeps for reuse (it raises its mmap threshold up to 32 MiB as blocks are freed),
where a GPU's max_memory_allocated counts live tensors only. So on CPU every side also runs
once more with MALLOC_MMAP_THRESHOLD_=131072: glibc then maps every block of 128 KiB or more
on its own and unmaps it when it is freed, and the peak RSS is the live memory plus the
interpreter and libraries. That pass is for memory only (fresh pages cost it time).

TRL is run two ways. "TRL as shipped" is GRPOTrainer unchanged. "TRL GPU path" is the
same trainer with its fused LM head scoring completion positions only, as it does on
CUDA/XPU; on CPU, TRL 1.16 projects every prompt and completion position through the
vocabulary (trl/trainer/utils.py, `compact = _use_triton(device)`). The patch sets
that one name to True; the tiles themselves stay torch code, as on any device without
Triton.

    pip install trl==1.16.0                       # bench only, not in requirements.txt
    python bench/vs_trl.py                        # tiny model, CPU
    python bench/vs_trl.py --arch mid --image-size 448 --new-tokens 64 --reps 3   # compute-bound CPU scale
    python bench/vs_trl.py --arch 2b --image-size 448 --new-tokens 256            # on a GPU

--arch mid is a 0.2B Qwen2-VL with the real vocabulary size (151,936), --arch 2b the
Qwen2-VL-2B architecture (SPEC §7), both with random weights built in code: nothing is
downloaded. The tokenizer is the tiny one; sampling still runs over the full vocabulary.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import visurf  # noqa: E402


# Qwen2-VL-2B (SPEC §7) and a 0.2B model with the same vocabulary, heads of 64 and a
# smaller vision tower: big enough that a CPU step is bound by matrix products.
ARCHS = {
    "mid": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
                 num_key_value_heads=2, mrope_section=[8, 12, 12]),
            dict(depth=4, embed_dim=384, num_heads=6, mlp_ratio=4)),
    "2b": (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, mrope_section=[16, 24, 24]),
           dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)),
}


def build_weights(arch, path, seed):
    """Save the model both sides load: the tiny one, or one of ARCHS with random weights."""
    args = visurf.parse_args(["--seed", str(seed)])
    model, processor, _ = visurf.load_model("tiny", args)
    if arch != "tiny":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        c, (text, vision) = model.config, ARCHS[arch]
        text = dict(text)
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": text.pop("mrope_section")}
        config = Qwen2VLConfig(
            text_config=dict(vocab_size=151936, max_position_embeddings=32768, rope_parameters=rope,
                             eos_token_id=c.text_config.eos_token_id, pad_token_id=c.text_config.pad_token_id,
                             bos_token_id=c.text_config.bos_token_id, tie_word_embeddings=True, **text),
            vision_config=dict(hidden_size=text["hidden_size"], **vision),
            image_token_id=c.image_token_id, video_token_id=c.video_token_id,
            vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
            tie_word_embeddings=True)
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    total, vision = (sum(p.numel() for p in m.parameters()) for m in (model, model.model.visual))
    print(f"arch {arch}: {total / 1e6:,.1f}M parameters, {vision / 1e6:,.1f}M of them in the vision tower")
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


def prompts(n, image_size, seed):
    samples = data.synthetic("classification", n, seed)
    for s in samples:
        s["image"], s["size"] = s["image"].resize((image_size, image_size)), (image_size, image_size)
    return samples


def peak_memory_gb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)  # macOS: bytes


def run_visurf(o, mode):
    args = visurf.parse_args(["--model", o.weights, "--mode", mode, "--group-size", str(o.group_size),
                              "--batch-size", str(o.batch_size), "--max-new-tokens", str(o.new_tokens),
                              "--min-new-tokens", str(o.new_tokens), "--lr", "1e-6"]
                             + (["--gradient-checkpointing"] if o.gradient_checkpointing else []))
    import transformers
    transformers.utils.logging.disable_progress_bar()
    model, processor, conv = visurf.load_model(o.weights, args)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(o.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)  # as visurf.main
    samples, times, phases = prompts(o.batch_size * o.steps, o.image_size, o.seed), [], []
    torch.manual_seed(o.seed)
    for step in range(o.steps):
        if o.device == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        m = visurf.train_step(model, processor, opt, samples[step * o.batch_size:(step + 1) * o.batch_size], conv, args)
        if o.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - t)
        phases.append({k: m[k] for k in ("t_generate", "t_score", "t_forward_backward", "t_optimizer", "gen_tokens")})
    return times, phases


def run_trl(o, gpu_path):
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import transformers
    if gpu_path:  # score completion positions only, as TRL does on CUDA/XPU (see the docstring)
        import trl.trainer.utils
        trl.trainer.utils._use_triton = lambda device: True
    transformers.utils.logging.disable_progress_bar()
    args = visurf.parse_args(["--model", o.weights])
    model = AutoModelForImageTextToText.from_pretrained(o.weights, dtype=torch.float32)
    _, processor, conv = visurf.load_model(o.weights, args)  # the same image-only processor
    samples = prompts(o.batch_size * o.steps, o.image_size, o.seed)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": data.prompt_text(s, conv)}]}],
        "image": s["image"], "label": s["answer"]} for s in samples])

    def reward(completions, label, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [sum(data.score("classification", t, a).values()) for t, a in zip(texts, label)]

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if o.device == "cuda":
                torch.cuda.synchronize()
            self.t = time.time()

        def on_step_end(self, *a, **k):
            if o.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - self.t)

    tok = processor.tokenizer
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=o.batch_size * o.group_size,
        num_generations=o.group_size, max_completion_length=o.new_tokens, max_steps=o.steps,
        generation_kwargs={"min_new_tokens": o.new_tokens,
                           "suppress_tokens": tok.convert_tokens_to_ids(visurf.VISION_TOKENS)},
        learning_rate=1e-6, optim="adamw_torch_fused", weight_decay=0.0, beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0, top_k=0,
        use_cpu=o.device == "cpu", bf16=o.device == "cuda", gradient_checkpointing=o.gradient_checkpointing,
        logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0, seed=o.seed,
        shuffle_dataset=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=ds,
                          processing_class=processor, callbacks=[Timer()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return times, [{"mean_length": x} for x in lengths]


SIDES = {"visurf": "visurf ViSurf (G+1 sequences)", "grpo": "visurf GRPO (G sequences)",
         "trl-gpu": "TRL GRPOTrainer, GPU path", "trl": "TRL GRPOTrainer as shipped"}


def run_side(o, side, weights, **env_extra):
    """One side in a fresh process with pinned threads -> its RESULT dict."""
    env = dict(os.environ, OMP_NUM_THREADS=str(o.threads), MKL_NUM_THREADS=str(o.threads), **env_extra)
    cmd = [sys.executable, __file__, "--side", side, "--weights", weights] + sys.argv[1:]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def spread(xs):
    return f"{statistics.median(xs):.3f}x ({min(xs):.3f}-{max(xs):.3f})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny", choices=["tiny"] + list(ARCHS))
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1, help="prompts per step")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=6, help="steps per side and repetition; the first is a warm-up")
    p.add_argument("--reps", type=int, default=3, help="repetitions, each running every side once")
    p.add_argument("--sides", default="visurf,grpo,trl-gpu,trl", help=f"comma-separated, of {', '.join(SIDES)}")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every side's process")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    o = p.parse_args()
    sides = o.sides.split(",")
    if not set(sides) <= set(SIDES) or o.steps < 2 or o.reps < 1 or o.threads < 1:
        p.error("--sides must name known sides, --steps be at least 2, --reps and --threads at least 1")
    if o.side:  # one side, in its own process
        torch.set_num_threads(o.threads)
        if o.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, phases = run_trl(o, o.side == "trl-gpu") if o.side.startswith("trl") else run_visurf(o, o.side)
        print("RESULT " + json.dumps({"times": times, "phases": phases, "peak_gb": peak_memory_gb(o.device)}))
        return
    import transformers
    transformers.utils.logging.disable_progress_bar()
    runs = {k: [] for k in sides}  # side -> one result per repetition
    loads = []
    with tempfile.TemporaryDirectory() as weights:
        build_weights(o.arch, weights, o.seed)
        for rep in range(o.reps):
            for side in sides[rep % len(sides):] + sides[:rep % len(sides)]:  # rotated order
                loads.append(os.getloadavg()[0])
                runs[side].append(run_side(o, side, weights))
                print(f"rep {rep + 1}/{o.reps} {side}: {statistics.median(runs[side][-1]['times'][1:]):.3f} s/step, "
                      f"load before {loads[-1]:.2f}", flush=True)
        # memory with freed blocks returned (see the docstring): one pass, it barely varies
        live = {k: run_side(o, k, weights, MALLOC_MMAP_THRESHOLD_="131072")["peak_gb"] for k in sides
                if o.device == "cpu"}
    step = {k: [statistics.median(r["times"][1:]) for r in v] for k, v in runs.items()}  # per repetition
    mem = {k: [r["peak_gb"] for r in v] for k, v in runs.items()}
    print(f"\narch {o.arch}, device {o.device}, {o.threads} threads, G {o.group_size}, B {o.batch_size}, "
          f"{o.new_tokens} new tokens, {o.image_size}px; {o.reps} interleaved repetitions, each the median of "
          f"{o.steps - 1} steps after a warm-up; 1-min load average before each side: "
          f"{min(loads):.2f}-{max(loads):.2f}")
    peers = [k for k in ("trl-gpu", "trl") if k in sides]
    print("| step | median s (min-max) | peak GiB | " + ("peak GiB, freed returned | " if live else "") + " | ".join(
        f"time vs {SIDES[k]} | memory vs {SIDES[k]}" + (f" | memory, freed returned, vs {SIDES[k]}" if live else "")
        for k in peers) + " |")
    print("|---|---|---|" + "---|" * bool(live) + ("---|---|" + "---|" * bool(live)) * len(peers))
    for k in sides:
        cells = [f"{spread([a / b for a, b in zip(step[k], step[q])])} | {spread([a / b for a, b in zip(mem[k], mem[q])])}"
                 + (f" | {live[k] / live[q]:.3f}x" if live else "") for q in peers]
        print(f"| {SIDES[k]} | {statistics.median(step[k]):.3f} ({min(step[k]):.3f}-{max(step[k]):.3f}) | "
              f"{statistics.median(mem[k]):.2f} | " + (f"{live[k]:.2f} | " if live else "") + " | ".join(cells) + " |")
    print("ratios: median (min-max) over repetitions, each repetition's sides against each other"
          + ("; 'freed returned': one more run per side with MALLOC_MMAP_THRESHOLD_=131072" if live else ""))
    if "visurf" in sides:
        ph = [x for r in runs["visurf"] for x in r["phases"][1:]]
        print(f"tokens per completion: visurf {sorted({x['gen_tokens'] / (o.group_size * o.batch_size) for x in ph})}"
              + "".join(f", {k} {sorted({x['mean_length'] for r in runs[k] for x in r['phases']})}" for k in peers))
        gen_tok = statistics.median(x["gen_tokens"] / x["t_generate"] for x in ph)
        print("visurf ViSurf phases (median s): " + ", ".join(
            f"{k[2:]} {statistics.median(x[k] for x in ph):.3f}"
            for k in ("t_generate", "t_score", "t_forward_backward", "t_optimizer")) + f"; decode {gen_tok:.0f} tokens/s")


if __name__ == "__main__":
    main()
