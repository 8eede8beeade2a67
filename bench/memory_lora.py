"""
Peak memory and step time of full training, --freeze-vision and --lora 8, each in fp32 and
bf16, on the bench's mid preset (CPU): MEASURED, side by side in one run.

The mid preset is bench/vs_trl.py's: a 0.2B Qwen2-VL with the real vocabulary (151,936) and
random weights, built in code. Each setting runs in its own process (so its peak is its own)
with MALLOC_MMAP_THRESHOLD_=131072, as vs_trl.py's live-memory pass: glibc then returns every
freed block of 128 KiB or more at once, so the resident set is the live tensors plus the
interpreter and libraries. Each process sets the model up as visurf.main does (load_model in
fp32, add_adapters, freeze, then AdamW over what trains) and takes --steps ViSurf steps
(visurf.train_step: generation, rewards, the update). Two peaks are read:
- "step peak": the peak resident memory from just before the first step to the end, the
  kernel's high-water mark reset through /proc/self/clear_refs once the model is set up:
  what CUDA's reset_peak_memory_stats + max_memory_allocated measure on a GPU (on a GPU the
  fp32 load happens on the CPU, and the weights reach the device already in their dtype);
- "process peak": ru_maxrss over the whole process, the fp32 load included.
AdamW's state is allocated in the first step, so the step peak includes it.
Times are the last step's (the first pays one-off allocations); the CPU may be shared with
other work (the 1-minute load average is printed), so times are indicative only.

    python bench/memory_lora.py      # G 8, B 1, 448x448, 32 new tokens, 2 steps: about 5 minutes
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SETTINGS = {"full": [], "--freeze-vision": ["--freeze-vision"], "--lora 8": ["--lora", "8"]}


def rss_peak_gib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**20


def reset_rss_peak():
    with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def one(o):
    """One setting in this process -> a RESULT line."""
    import torch
    import transformers
    import visurf
    from vs_trl import prompts
    torch.set_num_threads(o.threads)
    transformers.utils.logging.disable_progress_bar()
    args = visurf.parse_args(["--model", o.weights, "--group-size", str(o.group_size), "--batch-size", str(o.batch_size),
                              "--max-new-tokens", str(o.new_tokens), "--min-new-tokens", str(o.new_tokens),
                              "--lr", "1e-6", "--precision", o.precision, *SETTINGS[o.setting]])
    device = torch.device("cpu")
    model, processor, conv = visurf.load_model(o.weights, args)  # as visurf.main, from here on
    model, adapters = visurf.add_adapters(model, args)
    visurf.freeze(model, args, visurf.compute_dtype(args, device))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0, fused=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    samples = prompts(o.batch_size * o.steps, o.image_size, o.seed)
    torch.manual_seed(o.seed)
    load_peak = rss_peak_gib()
    reset_rss_peak()  # resets ru_maxrss too: the load's peak is read first
    times = []
    for step in range(o.steps):
        t = time.time()
        m = visurf.train_step(model, processor, optimizer, samples[step * o.batch_size:(step + 1) * o.batch_size],
                              conv, args)
        times.append(time.time() - t)
    print("RESULT " + json.dumps(dict(
        step_peak=rss_peak_gib(), process_peak=max(load_peak, rss_peak_gib()), step_s=times[-1],
        gen_s=m["t_generate"], fb_s=m["t_forward_backward"], weights=weights / 2**30, trained=sum(p.numel() for p in trained),
        optimizer=sum(s.numel() * s.element_size() for st in optimizer.state.values() for s in st.values()) / 2**30)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--steps", type=int, default=2, help="steps per setting; the last one is timed")
    p.add_argument("--threads", type=int, default=1, help="torch threads per setting (default 1: on a shared "
                   "2-core machine two threads spun ten times slower, measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    o = p.parse_args()
    if o.setting:
        return one(o)
    from vs_trl import build_weights
    t0 = time.time()
    rows = {}
    with tempfile.TemporaryDirectory() as weights:
        build_weights("mid", weights, o.seed)
        for precision in ("fp32", "bf16"):
            for setting in SETTINGS:
                load = os.getloadavg()[0]
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(o.threads))
                cmd = [sys.executable, __file__, f"--setting={setting}", "--precision", precision, "--weights", weights,
                       *sys.argv[1:]]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
                if out.returncode or not line:
                    sys.exit(f"{setting} {precision} failed:\n{out.stderr[-3000:]}")
                rows[setting, precision] = dict(json.loads(line[0][7:]), load=load)
                print(f"{setting} {precision}: {rows[setting, precision]}", flush=True)
    full = {pr: rows["full", pr]["step_peak"] for pr in ("fp32", "bf16")}
    print(f"\nmid preset (0.2B), CPU, {o.threads} threads, G {o.group_size}, B {o.batch_size}, {o.new_tokens} new "
          f"tokens, {o.image_size}px, {o.steps} ViSurf steps per setting; MALLOC_MMAP_THRESHOLD_=131072; "
          f"{time.time() - t0:.0f} s in all\n")
    print("| setting | precision | trained params | weights GiB | AdamW state GiB | step peak GiB | vs full, same "
          "precision | process peak GiB | step s (generate, forward+backward) | load avg |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for (setting, precision), r in rows.items():
        print(f"| {setting} | {precision} | {r['trained'] / 1e6:.2f}M | {r['weights']:.2f} | {r['optimizer']:.3f} | "
              f"{r['step_peak']:.2f} | {r['step_peak'] / full[precision]:.2f}x | {r['process_peak']:.2f} | "
              f"{r['step_s']:.1f} ({r['gen_s']:.1f}, {r['fb_s']:.1f}) | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
