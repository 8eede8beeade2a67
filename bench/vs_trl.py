"""
visurf's training step next to TRL's GRPOTrainer step, like for like, in one run.

Both sides load the same saved weights, take the same prompts and images, sample G
completions of exactly --new-tokens tokens (min_new_tokens = max_new_tokens, since
random weights never stop at EOS), use beta = 0 and one update per generation batch.
Each side runs in its own process so that its peak memory is its own.

    pip install trl==1.16.0                       # bench only, not in requirements.txt
    python bench/vs_trl.py                        # tiny model, CPU
    python bench/vs_trl.py --arch 2b --image-size 448 --new-tokens 256   # on a GPU

--arch 2b is the Qwen2-VL-2B architecture (SPEC §7) with random weights: nothing is
downloaded. Its vocabulary is the real size; the tokenizer is the tiny one.
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
import rewards  # noqa: E402
import visurf  # noqa: E402


def build_weights(arch, path, seed):
    """Save the model both sides load: the tiny one, or a random Qwen2-VL-2B."""
    args = visurf.parse_args(["--seed", str(seed)])
    model, processor, _ = visurf.load_model("tiny", args)
    if arch == "2b":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        c = model.config
        config = Qwen2VLConfig(
            text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                             eos_token_id=c.text_config.eos_token_id, pad_token_id=c.text_config.pad_token_id,
                             bos_token_id=c.text_config.bos_token_id, tie_word_embeddings=True),
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
            image_token_id=c.image_token_id, video_token_id=c.video_token_id,
            vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
            tie_word_embeddings=True)
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    total, vision = (sum(p.numel() for p in m.parameters()) for m in (model, model.model.visual))
    print(f"arch {arch}: {total / 1e6:,.2f}M parameters, {vision / 1e6:,.2f}M of them in the vision tower")
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
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


def run_trl(o):
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import transformers
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
        return [sum(rewards.score("classification", t, a).values()) for t, a in zip(texts, label)]

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
        learning_rate=1e-6, beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0, top_k=0,
        use_cpu=o.device == "cpu", bf16=o.device == "cuda", gradient_checkpointing=o.gradient_checkpointing,
        logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0, seed=o.seed,
        shuffle_dataset=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=ds,
                          processing_class=processor, callbacks=[Timer()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return times, [{"mean_length": x} for x in lengths]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny", choices=["tiny", "2b"])
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1, help="prompts per step")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=6, help="steps per side; the first is a warm-up")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side", choices=["visurf", "grpo", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    o = p.parse_args()
    if o.side:  # one side, in its own process
        if o.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, phases = run_trl(o) if o.side == "trl" else run_visurf(o, o.side)
        print("RESULT " + json.dumps({"times": times, "phases": phases, "peak_gb": peak_memory_gb(o.device)}))
        return
    import transformers
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as weights:
        build_weights(o.arch, weights, o.seed)
        res = {}
        for side in ("visurf", "grpo", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--weights", weights] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            res[side] = json.loads(line[0][7:])
    med = {k: statistics.median(v["times"][1:]) for k, v in res.items()}
    print(f"arch {o.arch}, device {o.device}, G {o.group_size}, B {o.batch_size}, {o.new_tokens} new tokens, "
          f"{o.image_size}px, median of {o.steps - 1} steps after a warm-up")
    print("| step | median s | peak GiB | time vs TRL | memory vs TRL |\n|---|---|---|---|---|")
    names = {"visurf": "visurf ViSurf (G+1 sequences)", "grpo": "visurf GRPO (G sequences)", "trl": "TRL GRPOTrainer"}
    for k in ("visurf", "grpo", "trl"):
        print(f"| {names[k]} | {med[k]:.3f} | {res[k]['peak_gb']:.2f} | {med[k] / med['trl']:.2f}x | "
              f"{res[k]['peak_gb'] / res['trl']['peak_gb']:.2f}x |")
    trl_len = {x["mean_length"] for x in res["trl"]["phases"]}
    vis_len = {x["gen_tokens"] / (o.group_size * o.batch_size) for x in res["visurf"]["phases"]}
    print(f"tokens per completion: visurf {sorted(vis_len)}, TRL {sorted(trl_len)}")
    ph = res["visurf"]["phases"][1:]
    gen_tok = statistics.median(x["gen_tokens"] / x["t_generate"] for x in ph)
    print("visurf ViSurf phases (median s): " + ", ".join(
        f"{k[2:]} {statistics.median(x[k] for x in ph):.3f}" for k in ("t_generate", "t_score", "t_forward_backward",
                                                                       "t_optimizer")) + f"; decode {gen_tok:.0f} tokens/s")


if __name__ == "__main__":
    main()
