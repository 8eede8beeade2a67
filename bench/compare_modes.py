"""
The paper's comparison in miniature: SFT, RLVR (GRPO), SFT->RLVR, ViSurf and ViSurf
with each reward-control rule switched off, from the same start, with the same seeds
and the same budget in optimizer steps.

Few-shot, like the papers: K images per colour, reused every epoch. Two held-out sets:
the training distribution, and a shifted one (circles on a brighter, noisier
background, same colours). Two regimes:
  a  beyond the model's knowledge: the tiny random model;
  b  a partly competent start: the tiny model after a short SFT on three of the six
     colours, then trained on all six.

    python bench/compare_modes.py                    # everything, about 35 min on 2 cores
    python bench/compare_modes.py --steps 2 --seeds 0 --configs visurf,sft --regimes a

Writes OUT/results.md (mean +- std over seeds), OUT/curves.png (needs matplotlib) and
OUT/runs.json; each run's metrics.jsonl and checkpoint stay under OUT/runs/.
"""
import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

CONFIGS = {  # name -> visurf.py flags; "sft-grpo" runs two stages
    "sft": ["--mode", "sft"],
    "grpo": ["--mode", "grpo"],
    "sft-grpo": None,
    "visurf": ["--mode", "visurf"],
    "visurf-no-align": ["--mode", "visurf", "--ablate", "align"],
    "visurf-no-think": ["--mode", "visurf", "--ablate", "think"],
    "visurf-no-smooth": ["--mode", "visurf", "--ablate", "smooth"],
}
WARM_COLOURS = "red,green,blue"  # regime b's head start


def common(o, seed):
    return ["--seed", str(seed), "--shots", str(o.shots), "--batch-size", str(o.batch_size),
            "--group-size", str(o.group_size), "--lr", str(o.lr), "--max-new-tokens", "8",
            "--eval-every", str(o.eval_every), "--save-every", str(10 ** 6), "--overwrite"]


def train(argv):
    """One visurf.py run in a single-threaded process (two run side by side)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "visurf.py"), *argv], capture_output=True,
                       text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"visurf.py {' '.join(argv)} failed:\n{p.stderr[-2000:]}")


def read_metrics(path, offset=0):
    out = []
    for line in open(path):
        m = json.loads(line)
        m["step"] += offset
        out.append(m)
    return out


def run_one(o, regime, name, seed):
    out = os.path.join(o.out, "runs", regime, name, f"seed{seed}")
    start = ["--model", os.path.join(o.out, "runs", "b", "start", f"seed{seed}", "checkpoint")] if regime == "b" else []
    t = time.time()
    if name == "sft-grpo":  # the same total steps, split between the two stages
        half = o.steps // 2
        train(start + common(o, seed) + ["--mode", "sft", "--steps", str(half), "--output-dir", out + "-sft"])
        train(["--model", os.path.join(out + "-sft", "checkpoint")] + common(o, seed) +
              ["--mode", "grpo", "--steps", str(o.steps - half), "--output-dir", out])
        metrics = read_metrics(os.path.join(out + "-sft", "metrics.jsonl"))
        metrics = [m for m in metrics if not ("eval" in m and m["step"] == half)]  # counted once, below
        metrics += read_metrics(os.path.join(out, "metrics.jsonl"), offset=half)
    else:
        train(start + common(o, seed) + CONFIGS[name] + ["--steps", str(o.steps), "--output-dir", out])
        metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    wall = time.time() - t
    in_dist, shifted = evaluate(os.path.join(out, "checkpoint"), seed)
    steps = [m for m in metrics if "loss" in m]
    return {"regime": regime, "config": name, "seed": seed, "in_dist": in_dist, "shifted": shifted,
            "wall_s": wall, "steps": len(steps),
            "generated": sum(o.batch_size * o.group_size for m in steps if m["t_generate"] > 0),
            "curve": [{k: m.get(k) for k in ("step", "reward", "gt_smoothed", "eval")} for m in metrics]}


def evaluate(checkpoint, seed):
    """Accuracy on both held-out sets: the training distribution and the shifted one."""
    import torch
    import data
    import visurf
    import transformers
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    args = visurf.parse_args(["--model", checkpoint, "--max-new-tokens", "8"])
    model, processor, conv = visurf.load_model(checkpoint, args)
    accs = []
    for shift in (False, True):
        held = data.synthetic("classification", 192, seed, "eval", shift=shift)
        accs.append(visurf.evaluate(model, processor, held, conv, args)[0]["accuracy"])
    return accs


def warm_start(o, seed):
    out = os.path.join(o.out, "runs", "b", "start", f"seed{seed}")
    train(common(o, seed) + ["--mode", "sft", "--steps", str(o.warm_steps), "--categories", WARM_COLOURS,
                             "--output-dir", out])
    return evaluate(os.path.join(out, "checkpoint"), seed)


def table(runs, configs, regimes):
    rows = ["| regime | config | in-distribution acc | shifted acc | steps | generated samples | wall s |",
            "|---|---|---|---|---|---|---|"]
    for regime in regimes:
        for name in configs:
            rs = [r for r in runs if r["regime"] == regime and r["config"] == name]
            if not rs:
                continue
            ms = lambda k: (f"{statistics.mean(r[k] for r in rs):.3f} ± "
                            f"{statistics.stdev([r[k] for r in rs]) if len(rs) > 1 else 0:.3f}")
            rows.append(f"| {regime} | {name} | {ms('in_dist')} | {ms('shifted')} | {rs[0]['steps']} | "
                        f"{rs[0]['generated']} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
    return "\n".join(rows)


def plot(runs, configs, regimes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("held-out accuracy (in-distribution)", lambda m: m["eval"]["accuracy"] if m.get("eval") else None),
              ("mean rollout reward", lambda m: m.get("reward")),
              ("ground truth's share (rule 3 fired)", lambda m: m.get("gt_smoothed"))]
    fig, axes = plt.subplots(len(regimes), 3, figsize=(15, 4 * len(regimes)), squeeze=False)
    for i, regime in enumerate(regimes):
        for j, (title, get) in enumerate(panels):
            ax = axes[i][j]
            for name in configs:
                curves = [[(m["step"], get(m)) for m in r["curve"] if get(m) is not None]
                          for r in runs if r["regime"] == regime and r["config"] == name]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                n = min(map(len, curves))
                xs = [c[0] for c in curves[0][:n]]
                ys = [statistics.mean(c[k][1] for c in curves) for k in range(n)]
                if j > 0 and len(ys) > 20:  # per-step values are noisy: a running mean of 10
                    ys = [statistics.mean(ys[max(0, k - 9):k + 1]) for k in range(len(ys))]
                ax.plot(xs, ys, label=name, color=f"C{list(CONFIGS).index(name)}")  # same colour in every panel
            ax.set_title(f"regime {regime}: {title}")
            ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per configuration")
    p.add_argument("--warm-steps", type=int, default=120, help="regime b: SFT steps on three colours")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--regimes", default="a,b")
    p.add_argument("--shots", type=int, default=4, help="training images per colour")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    o = p.parse_args()
    seeds = [int(s) for s in o.seeds.split(",")]
    configs, regimes = o.configs.split(","), o.regimes.split(",")
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"error: unknown config {c!r} (choose from {', '.join(CONFIGS)})")
    os.makedirs(o.out, exist_ok=True)
    t0, runs, starts = time.time(), [], {}
    with cf.ProcessPoolExecutor(o.workers) as pool:
        if "b" in regimes:
            starts = dict(zip(seeds, pool.map(warm_start, [o] * len(seeds), seeds)))
            for s, acc in starts.items():
                print(f"regime b start, seed {s}: accuracy {acc[0]:.3f} in-distribution, {acc[1]:.3f} shifted",
                      flush=True)
        jobs = [pool.submit(run_one, o, r, c, s) for r in regimes for c in configs for s in seeds]
        for f in cf.as_completed(jobs):
            r = f.result()
            runs.append(r)
            print(f"{r['regime']} {r['config']:<17} seed {r['seed']}: in-dist {r['in_dist']:.3f} "
                  f"shifted {r['shifted']:.3f} ({r['wall_s']:.0f}s; {len(runs)}/{len(jobs)}, "
                  f"{time.time() - t0:.0f}s elapsed)", flush=True)
    runs.sort(key=lambda r: (r["regime"], list(CONFIGS).index(r["config"]), r["seed"]))
    md = (f"{o.steps} optimizer steps, B {o.batch_size}, G {o.group_size}, lr {o.lr}, {o.shots} images per "
          f"colour, seeds {o.seeds}; accuracy on 192 held-out prompts, mean ± std over seeds.\n\n"
          + table(runs, configs, regimes) + "\n")
    if starts:
        md += "\nRegime b's start (SFT on " + WARM_COLOURS + f" for {o.warm_steps} steps): " + ", ".join(
            f"seed {s} {a[0]:.3f} / {a[1]:.3f}" for s, a in starts.items()) + " (in-distribution / shifted)\n"
    with open(os.path.join(o.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(o.out, "runs.json"), "w") as f:
        json.dump({"runs": runs, "starts": starts, "args": vars(o)}, f)
    plot(runs, configs, regimes, os.path.join(o.out, "curves.png"))
    print("\n" + md + f"\nwrote {o.out}/results.md, curves.png, runs.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
