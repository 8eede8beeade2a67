"""
The paper's comparison in miniature: SFT, RLVR (GRPO), SFT->RLVR, ViSurf and ViSurf
with each reward-control rule switched off, from the same start, with the same seeds,
the same data order and the same budget in optimizer steps.

The new task (trained on): what colour is the shape? Six colours, few-shot like the
papers (K images per colour, reused every epoch). Held out: the training distribution,
split into the base's known colours and the novel ones, and a shifted set (circles on a
brighter, noisier background, same colours).
The retained task (never trained on here): how big is the shape? Small, medium or big.

Two regimes:
  a  beyond the model's knowledge: the tiny random model (it knows neither task);
  b  a base that reasons in the format: the tiny model after a short SFT on full-format
     completions, <think>a square, top left</think><answer>red</answer>, of the colour task on
     three of the six colours (red, green, blue) and of the retained task; then trained on
     all six colours with answer-only labels, as the papers' labels are.

    python bench/compare_modes.py     # everything, 3 seeds: 53 min on 2 shared cores (57 CPU-min)
    python bench/compare_modes.py --seeds 0,1,2,3,4 --steps 300
    python bench/compare_modes.py --steps 2 --seeds 0 --configs visurf,sft --warm-steps 2 --eval-n 12

Writes OUT/results.md (the results table, the regime-b start, and the paired differences
by seed), OUT/curves.png (needs matplotlib) and OUT/runs.json; each run's metrics.jsonl
and checkpoint stay under OUT/runs/.
"""
import argparse
import concurrent.futures as cf
import json
import math
import os
import resource
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
KNOWN = ("red", "green", "blue")          # the colours regime b's base was taught
NOVEL = ("yellow", "purple", "white")     # never named to the base
TOKENS_A = 8   # regime a: room for the label, not for reasoning (the random model never reasons)
BASE_COLOUR_SHOTS, BASE_SIZE_SHOTS = 16, 48  # regime b's base: images per known colour, per size class

# Fixed before any comparison run (see README): each row is (claim, regime, metric, A, B),
# reported as the paired difference A - B over seeds; "start" is the run's starting model.
CLAIMS = [
    ("1 RLVR stalls beyond knowledge", "a", "in_dist", "grpo", "start"),
    ("1 RLVR stalls beyond knowledge", "a", "in_dist", "visurf", "grpo"),
    ("1 RLVR stalls beyond knowledge", "b", "novel", "grpo", "start"),
    ("1 RLVR stalls beyond knowledge", "b", "novel", "visurf", "grpo"),
    ("2 SFT injects knowledge", "b", "novel", "sft", "start"),
    ("2 SFT injects knowledge", "b", "novel", "sft", "grpo"),
    ("2 SFT forgets", "b", "retained", "sft", "start"),
    ("2 SFT forgets", "b", "retained", "sft", "grpo"),
    ("2 SFT forgets", "b", "format", "sft", "start"),
    ("3 SFT->RLVR inherits forgetting", "b", "retained", "sft-grpo", "start"),
    ("3 SFT->RLVR inherits forgetting", "b", "retained", "sft-grpo", "visurf"),
    ("3 SFT->RLVR inherits forgetting", "b", "format", "sft-grpo", "visurf"),
    ("3 SFT->RLVR vs ViSurf", "a", "in_dist", "sft-grpo", "visurf"),
    ("3 SFT->RLVR vs ViSurf", "b", "in_dist", "sft-grpo", "visurf"),
    ("4 ViSurf vs SFT", "a", "in_dist", "visurf", "sft"),
    ("4 ViSurf vs SFT", "b", "in_dist", "visurf", "sft"),
    ("4 ViSurf vs SFT", "a", "shifted", "visurf", "sft"),
    ("4 ViSurf vs SFT", "b", "shifted", "visurf", "sft"),
    ("4 ViSurf vs SFT", "b", "retained", "visurf", "sft"),
    ("4 ViSurf vs SFT", "b", "format", "visurf", "sft"),
    ("4 ViSurf keeps the base", "b", "retained", "visurf", "start"),
    ("4 rule 1 (align)", "a", "in_dist", "visurf", "visurf-no-align"),
    ("4 rule 1 (align)", "b", "in_dist", "visurf", "visurf-no-align"),
    ("4 rule 2 (think)", "a", "in_dist", "visurf", "visurf-no-think"),
    ("4 rule 2 (think)", "b", "in_dist", "visurf", "visurf-no-think"),
    ("4 rule 2 (think)", "b", "format", "visurf", "visurf-no-think"),
    ("4 rule 3 (smooth)", "a", "in_dist", "visurf", "visurf-no-smooth"),
    ("4 rule 3 (smooth)", "b", "in_dist", "visurf", "visurf-no-smooth"),
    ("4 rule 3 (smooth)", "b", "format", "visurf", "visurf-no-smooth"),
    ("4 rule 3 (smooth)", "b", "retained", "visurf", "visurf-no-smooth"),
    ("5 competent base: ceiling", "b", "known", "visurf", "grpo"),
    ("5 competent base: ceiling", "b", "known", "grpo", "start"),
]
METRICS = {"in_dist": "in-distribution accuracy", "known": "accuracy on the base's known colours",
           "novel": "accuracy on novel colours", "shifted": "shifted accuracy",
           "retained": "retained-task accuracy", "format": "greedy completions in the think format"}


# -----------------------------------------------------------------------------
# Tasks (built here, from data.py's synthetic images; nothing in data.py changes)

def quadrant(sample):
    """Where the shape's centre lies: 'top left' ... 'bottom right'."""
    x1, y1, x2, y2 = sample["box"]
    w, h = sample["size"]
    return ("top" if y1 + y2 < h else "bottom") + " " + ("left" if x1 + x2 < w else "right")


def full_completion(sample, conv):
    """What regime b's base is taught: a short reasoning text derived from the sample (what
    and where the shape is; it names neither task's answer), then the aligned answer."""
    import data
    return f"<think>a square, {quadrant(sample)}</think>" + data.gt_completion(sample, conv)


def colour_task(n, seed, split, shift=False):
    """data.synthetic's colour task, with each shape's box kept for the reasoning text."""
    import numpy as np
    import data
    samples = data.synthetic("classification", n, seed, split, shift=shift)
    for s in samples:  # the box, recovered from the image: the pixels in the shape's colour
        ys, xs = np.nonzero((np.asarray(s["image"]).astype(int) == data.COLOURS[s["answer"]]).all(-1))
        s["box"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    return samples


SIZES = {"small": (8, 14), "medium": (20, 28), "big": (34, 44)}  # the retained task's classes: side in px


def retained_task(n, seed, split):
    """How big is the shape? One square of any of the six colours on the colour task's
    background, its side in one of three disjoint ranges."""
    import numpy as np
    import data
    rng = np.random.default_rng([seed, 20_000, {"train": 0, "eval": 1}[split]])
    colours, names, out = list(data.COLOURS), list(SIZES), []
    for i in range(n):
        size, colour = names[i % 3], colours[(i // 3) % 6]  # balanced sizes and colours
        side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        x, y = int(rng.integers(0, 56 - side + 1)), int(rng.integers(0, 56 - side + 1))
        box = [x, y, x + side, y + side]
        out.append({"task": "classification", "id": f"retained {split}: record {i}", "answer": size,
                    "query": "How big is the shape?", "classes": names, "size": (56, 56),
                    "image": data._draw(rng, (56, 56), [(colour, box)], False), "box": box})
    return out


def base_data(seed):
    """Regime b's SFT data: the colour task on the known colours only (its prompt still lists
    all six) and the retained task; images disjoint from the few-shot and held-out sets."""
    colours = [s for s in colour_task(BASE_COLOUR_SHOTS * 6, 10_000 + seed, "train") if s["answer"] in KNOWN]
    return colours + retained_task(BASE_SIZE_SHOTS * 3, seed, "train")


def tokens_b():
    """Regime b's completion budget: the longest full-format colour completion + 4."""
    import data
    import visurf
    args = visurf.parse_args(["--max-new-tokens", "1"])
    _, processor, conv = visurf.load_model("tiny", args)
    tok = processor.tokenizer
    return 4 + max(len(tok(full_completion(s, conv), add_special_tokens=False)["input_ids"]) + 1
                   for s in colour_task(60, 0, "train"))


# -----------------------------------------------------------------------------
# Runs

def setup_torch():
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    return torch


def common(o, seed, tokens):
    return ["--seed", str(seed), "--shots", str(o.shots), "--batch-size", str(o.batch_size),
            "--group-size", str(o.group_size), "--lr", str(o.lr), "--max-new-tokens", str(tokens),
            "--eval-every", str(o.eval_every), "--eval-limit", str(min(96, o.eval_n)), "--save-every", str(10 ** 6),
            "--overwrite"]


def cpu_seconds(who=resource.RUSAGE_CHILDREN):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def train(argv):
    """One visurf.py run in a single-threaded process (two run side by side). -> its CPU
    seconds, which unlike wall time do not depend on what else shares the machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    before = cpu_seconds()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "visurf.py"), *argv], capture_output=True,
                       text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"visurf.py {' '.join(argv)} failed:\n{p.stderr[-2000:]}")
    return cpu_seconds() - before


def read_metrics(path, offset=0):
    out = []
    for line in open(path):
        m = json.loads(line)
        m["step"] += offset
        out.append(m)
    return out


CURVE_KEYS = ("step", "reward", "reward_think", "reward_answer", "gt_smoothed", "gt_advantage", "eval")


def run_one(o, regime, name, seed):
    out = os.path.join(o.out, "runs", regime, name, f"seed{seed}")
    tokens = TOKENS_A if regime == "a" else o.tokens_b
    start = ["--model", start_checkpoint(o, seed)] if regime == "b" else []
    t = time.time()
    if name == "sft-grpo":  # the same total steps, split between the two stages
        half = o.steps // 2
        cpu = train(start + common(o, seed, tokens) + ["--mode", "sft", "--steps", str(half), "--output-dir", out + "-sft"])
        cpu += train(["--model", os.path.join(out + "-sft", "checkpoint")] + common(o, seed, tokens) +
              ["--mode", "grpo", "--steps", str(o.steps - half), "--output-dir", out])
        metrics = read_metrics(os.path.join(out + "-sft", "metrics.jsonl"))
        metrics = [m for m in metrics if not ("eval" in m and m["step"] == half)]  # counted once, below
        metrics += read_metrics(os.path.join(out, "metrics.jsonl"), offset=half)
    else:
        cpu = train(start + common(o, seed, tokens) + CONFIGS[name] + ["--steps", str(o.steps), "--output-dir", out])
        metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    wall = time.time() - t
    steps = [m for m in metrics if "loss" in m]
    return dict(regime=regime, config=name, seed=seed, **evaluate(o, os.path.join(out, "checkpoint"), seed, eval_tokens(o, regime)),
                wall_s=wall, cpu_s=cpu, steps=len(steps), stages=2 if name == "sft-grpo" else 1,
                generated=sum(o.batch_size * o.group_size for m in steps if m.get("t_generate", 0) > 0),
                curve=[{k: m[k] for k in CURVE_KEYS if k in m} for m in metrics])


def evaluate(o, model_name, seed, tokens):
    """Greedy accuracy on the held-out sets: the colour task (all, known colours, novel
    colours), its shifted variant, the retained task; and the share of colour completions
    written in the full think format."""
    setup_torch()
    import rewards
    import visurf
    args = visurf.parse_args(["--model", model_name, "--seed", str(seed), "--max-new-tokens", str(tokens)])
    model, processor, conv = visurf.load_model(model_name, args)
    out = {}
    for key, held in (("in_dist", colour_task(o.eval_n, seed, "eval")),
                      ("shifted", colour_task(o.eval_n, seed, "eval", shift=True)),
                      ("retained", retained_task(o.eval_n, seed, "eval"))):
        texts = visurf.evaluate(model, processor, held, conv, args)[1]
        ok = [rewards.classification_reward(rewards.extract_answer(t), s["answer"]) for t, s in zip(texts, held)]
        out[key] = sum(ok) / len(ok)
        if key == "in_dist":
            for part, colours in (("known", KNOWN), ("novel", NOVEL)):
                sel = [k for k, s in zip(ok, held) if s["answer"] in colours]
                out[part] = sum(sel) / len(sel)
            out["format"] = sum(rewards.think_reward(t) for t in texts) / len(texts)
    return out


def eval_tokens(o, regime):
    """Greedy evaluation's budget: the regime's completion budget, + 8 for the size task's answers."""
    return (TOKENS_A if regime == "a" else o.tokens_b) + 8


def start_checkpoint(o, seed):
    return os.path.join(o.out, "runs", "b", "start", f"seed{seed}", "checkpoint")


def build_start(o, regime, seed):
    """Regime a: the random tiny model visurf.py builds from this seed, evaluated as it is.
    Regime b: that model after o.warm_steps of SFT on full-format completions (base_data),
    through visurf's own update(), saved as a visurf checkpoint. Also measured: the share of
    temperature-1 rollouts on the new task's training prompts that write the format."""
    torch = setup_torch()
    import numpy as np
    import data
    import rewards
    import visurf
    t, cpu = time.time(), cpu_seconds(resource.RUSAGE_SELF)
    if regime == "a":
        return dict(regime=regime, seed=seed, **evaluate(o, "tiny", seed, eval_tokens(o, regime)), rollout_format=0.0,
                    steps=0, wall_s=0.0, cpu_s=0.0)
    args = visurf.parse_args(["--mode", "sft", "--seed", str(seed), "--batch-size", str(o.batch_size),
                              "--lr", str(o.warm_lr), "--max-new-tokens", str(o.tokens_b)])
    torch.manual_seed(seed)
    model, processor, conv = visurf.load_model("tiny", args)
    tok, eos = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids(visurf.END_OF_TURN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    samples = base_data(seed)
    for step in range(o.warm_steps):
        batch = [samples[i] for i in visurf.batch_for_step(len(samples), args.batch_size, seed + 10_000, step)]
        prompts = visurf.encode_prompts(processor, batch, conv, model.device)
        completions = [tok(full_completion(s, conv), add_special_tokens=False)["input_ids"] + [eos] for s in batch]
        visurf.update(model, optimizer, prompts, completions, torch.ones(len(batch)), 1, args)
    out = os.path.dirname(start_checkpoint(o, seed))
    os.makedirs(out, exist_ok=True)
    visurf.save_checkpoint(out, model, processor, optimizer, o.warm_steps, visurf.rng_state(), args)
    # the share of sampled rollouts (temperature 1, G per prompt) in the format, on the new training prompts
    train_prompts = data.synthetic("classification", o.shots * 6, seed, "train")
    model.eval()
    written = []
    with torch.no_grad():
        for i in range(0, len(train_prompts), 8):
            prompts = visurf.encode_prompts(processor, train_prompts[i:i + 8], conv, model.device)
            rollouts = visurf.generate(model, processor, prompts, o.group_size, o.tokens_b)
            written += [rewards.think_reward(tok.decode(r, skip_special_tokens=True)) for r in rollouts]
    wall, cpu = time.time() - t, cpu_seconds(resource.RUSAGE_SELF) - cpu
    return dict(regime=regime, seed=seed, **evaluate(o, start_checkpoint(o, seed), seed, eval_tokens(o, regime)),
                rollout_format=float(np.mean(written)), steps=o.warm_steps, wall_s=wall, cpu_s=cpu)


# -----------------------------------------------------------------------------
# Tables and the picture

def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs, digits=3):
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(runs, starts, configs, regimes):
    rows = ["| regime | config | in-distribution | known colours | novel colours | shifted | retained | "
            "format | steps | stages | generated samples | CPU s | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cols = ("in_dist", "known", "novel", "shifted", "retained", "format")
    for regime in regimes:
        st = [s for s in starts if s["regime"] == regime]
        if st:
            rows.append(f"| {regime} | *start* | " + " | ".join(fmt([s[k] for s in st]) for k in cols) +
                        f" | {st[0]['steps'] and str(st[0]['steps']) + ' (SFT)'} | – | 0 | "
                        f"{statistics.mean(s['cpu_s'] for s in st):.0f} | {statistics.mean(s['wall_s'] for s in st):.0f} |")
        for name in configs:
            rs = [r for r in runs if r["regime"] == regime and r["config"] == name]
            if rs:
                rows.append(f"| {regime} | {name} | " + " | ".join(fmt([r[k] for r in rs]) for k in cols) +
                            f" | {rs[0]['steps']} | {rs[0]['stages']} | {rs[0]['generated']} | "
                            f"{statistics.mean(r['cpu_s'] for r in rs):.0f} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
    return "\n".join(rows)


def paired(runs, starts, claims):
    """For each claim row, the per-seed difference A - B, its mean ± std, and whether |mean|
    exceeds two standard errors (std / sqrt(n))."""
    def value(regime, who, metric, seed):
        pool = starts if who == "start" else [r for r in runs if r["config"] == who]
        hit = [r[metric] for r in pool if r["regime"] == regime and r["seed"] == seed]
        return hit[0] if hit else None
    out = []
    for claim, regime, metric, a, b in claims:
        seeds = sorted({r["seed"] for r in runs if r["regime"] == regime})
        d = [value(regime, a, metric, s) - value(regime, b, metric, s) for s in seeds
             if value(regime, a, metric, s) is not None and value(regime, b, metric, s) is not None]
        if not d:
            continue
        m, sd = mean_std(d)
        se = sd / math.sqrt(len(d))
        out.append(dict(claim=claim, regime=regime, metric=metric, a=a, b=b, diffs=d, mean=m, std=sd, se=se,
                        beyond_2se=bool(abs(m) > 2 * se) if len(d) > 1 else None))
    return out


def paired_table(rows):
    lines = ["| claim | regime | metric | A − B | per seed | mean ± std | > 2 SE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "–" if r["beyond_2se"] is None else ("**yes**" if r["beyond_2se"] else "no")
        lines.append(f"| {r['claim']} | {r['regime']} | {r['metric']} | {r['a']} − {r['b']} | "
                     f"{' '.join(f'{x:+.2f}' for x in r['diffs'])} | {r['mean']:+.3f} ± {r['std']:.3f} | {verdict} |")
    return "\n".join(lines)


def plot(runs, configs, regimes, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("held-out accuracy (in-distribution)", lambda m: m["eval"]["accuracy"] if m.get("eval") else None),
              ("rollout reward: answer part", lambda m: m.get("reward_answer")),
              ("rollout reward: think part", lambda m: m.get("reward_think")),
              ("groups where rule 3 fired", lambda m: m.get("gt_smoothed")),
              ("mean A_y (label's advantage)", lambda m: m.get("gt_advantage"))]
    fig, axes = plt.subplots(len(regimes), len(panels), figsize=(4 * len(panels), 3.6 * len(regimes)), squeeze=False)
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
                ax.plot(xs, ys, label=name, color=f"C{list(CONFIGS).index(name)}",
                        linestyle="--" if "no-" in name else "-")  # same colour in every panel
            ax.set_title(f"regime {regime}: {title}", fontsize=9)
            ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def code_version():
    """sha256 (first 12 hex digits) of the files every number depends on."""
    import hashlib
    return {f: hashlib.sha256(open(os.path.join(ROOT, f), "rb").read()).hexdigest()[:12]
            for f in ("visurf.py", "data.py", "rewards.py", os.path.join("bench", "compare_modes.py"))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per configuration")
    p.add_argument("--warm-steps", type=int, default=400, help="regime b: the base's SFT steps")
    p.add_argument("--warm-lr", type=float, default=1e-3, help="regime b: the base's SFT learning rate")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--regimes", default="a,b")
    p.add_argument("--shots", type=int, default=4, help="training images per colour")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-n", type=int, default=192, help="prompts in each held-out set")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    o = p.parse_args()
    seeds = [int(s) for s in o.seeds.split(",")]
    configs, regimes = o.configs.split(","), o.regimes.split(",")
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"error: unknown config {c!r} (choose from {', '.join(CONFIGS)})")
    for r in regimes:
        if r not in ("a", "b"):
            sys.exit(f"error: unknown regime {r!r} (choose from a, b)")
    os.makedirs(o.out, exist_ok=True)
    t0, version = time.time(), code_version()  # read once, at the start: visurf.py runs are separate processes
    with cf.ProcessPoolExecutor(o.workers) as pool:
        o.tokens_b = pool.submit(tokens_b).result()  # in a worker: the parent never loads torch
        pending = {pool.submit(build_start, o, r, s): ("start", r, s) for r in sorted(regimes, reverse=True)
                   for s in seeds}  # regime b's bases first: they take longest, and b's runs wait for them
        longest_first = sorted(configs, key=lambda c: (c == "sft", c == "sft-grpo"))
        if "a" in regimes:
            pending.update({pool.submit(run_one, o, "a", c, s): ("run", "a", s) for c in longest_first for s in seeds})
        starts, runs, n_jobs = [], [], len(pending) + (len(configs) * len(seeds) if "b" in regimes else 0)
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in done:
                kind, regime, seed = pending.pop(f)
                r = f.result()
                if kind == "start":
                    starts.append(r)
                    print(f"start {regime} seed {seed}: in-dist {r['in_dist']:.3f} (known {r['known']:.3f}, novel "
                          f"{r['novel']:.3f}) retained {r['retained']:.3f} format {r['format']:.3f} rollout format "
                          f"{r['rollout_format']:.3f} ({time.time() - t0:.0f}s elapsed)", flush=True)
                    if regime == "b":
                        pending.update({pool.submit(run_one, o, "b", c, seed): ("run", "b", seed) for c in longest_first})
                    continue
                runs.append(r)
                print(f"{r['regime']} {r['config']:<17} seed {r['seed']}: in-dist {r['in_dist']:.3f} novel "
                      f"{r['novel']:.3f} shifted {r['shifted']:.3f} retained {r['retained']:.3f} format "
                      f"{r['format']:.3f} ({r['wall_s']:.0f}s; {len(runs) + len(starts)}/{n_jobs}, "
                      f"{time.time() - t0:.0f}s elapsed)", flush=True)
    starts.sort(key=lambda s: (s["regime"], s["seed"]))
    runs.sort(key=lambda r: (r["regime"], list(CONFIGS).index(r["config"]), r["seed"]))
    diffs = paired(runs, starts, CLAIMS)
    wall = time.time() - t0
    md = (f"{o.steps} optimizer steps, B {o.batch_size}, G {o.group_size}, lr {o.lr}, {o.shots} images per "
          f"colour, seeds {o.seeds}; max new tokens {TOKENS_A} (a) / {o.tokens_b} (b); greedy accuracy on "
          f"{o.eval_n} held-out prompts per set, mean ± std over seeds. Known colours: {', '.join(KNOWN)}; "
          f"novel: {', '.join(NOVEL)}. Retained: the size task (chance 1/3), never trained on here. Format: greedy "
          f"colour completions written <think>…</think><answer>…</answer>. CPU s: the training processes' CPU "
          f"time (regime b's start: its SFT and measurement), which unlike wall time does not depend on what "
          f"else shares the machine. Wall time {wall / 60:.1f} min. Code (sha256): "
          + ", ".join(f"{k} {v}" for k, v in version.items()) + ".\n\n"
          + table(runs, starts, configs, regimes) + "\n")
    b = [s for s in starts if s["regime"] == "b"]
    if b:
        md += (f"\nRegime b's start ({o.warm_steps} SFT steps on full-format completions): rollouts in the format "
               f"at temperature 1 on the new training prompts, per seed: "
               + ", ".join(f"{s['rollout_format']:.2f}" for s in b) + f" (mean {fmt([s['rollout_format'] for s in b])}).\n")
    md += ("\nPaired by seed (same start, data and order): A − B per seed, mean ± std of the difference, and "
           "whether |mean| > 2 standard errors (std/√n).\n\n" + paired_table(diffs) + "\n")
    with open(os.path.join(o.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(o.out, "runs.json"), "w") as f:
        json.dump({"runs": runs, "starts": starts, "paired": diffs, "wall_s": wall, "code": version,
                   "args": vars(o)}, f)
    plot(runs, configs, regimes, os.path.join(o.out, "curves.png"))
    print("\n" + md + f"\nwrote {o.out}/results.md, curves.png, runs.json in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
