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

    python bench/compare_modes.py --seeds 0-3      # runs what is missing of seeds 0-3; about 25 CPU-min a seed
    python bench/compare_modes.py --seeds 0-11     # later: adds seeds 4-11, nothing of 0-3 runs again
    python bench/compare_modes.py --report-only    # tables and picture from everything stored; runs nothing
    python bench/compare_modes.py --steps 2 --seeds 0 --configs visurf,sft --warm-steps 2 --eval-n 12 --out /tmp/cmp

Seeds accumulate. Each run's result (one regime, configuration and seed) is written, as
soon as it finishes, to OUT/store/CODE/SETTINGS/REGIME-CONFIG-seedN.json (written to a
.tmp file, fsynced, then renamed: a kill leaves the whole file or none). A bench runs only
what is missing there, so a killed one continues at the next missing run, and --seeds 0-11
after --seeds 0-3 runs seeds 4-11 only. Runs under another CODE or SETTINGS are never pooled.
  CODE      sha256 (12 hex) of the syntax trees (ast.dump, docstrings removed) of visurf.py,
            data.py, rewards.py and this file without the definitions in NOT_HASHED (the
            claims, statistics, store, tables and main: what reads results, not what makes
            them). Comments, docstrings, blank lines and line breaks are not in a syntax tree,
            so changing them keeps CODE; any other change, even one believed harmless, moves it,
            because float rounding alone has flipped regime b's verdicts.
  SETTINGS  sha256 (8 hex) of every flag that reaches a run (all but NOT_SETTINGS) and the
            versions of Python, torch, transformers, numpy and pillow and the machine's
            architecture (key.json holds both).
A run is scored by the mean of its evaluations at its last --last-k checkpoints,
--last-every steps apart (each on every held-out prompt of every set); the run is stopped
and resumed at those steps, which gives the uninterrupted run's numbers, so --last-k and
--last-every are not in SETTINGS: a stored run serves any --last-k whose steps it holds.

Each claim row is the paired difference A - B over the seeds that hold both: its mean, the
95% Student t interval, the seeds' signs, the leave-one-seed-out range of the mean, and a
verdict by `verdict` (the rule is written out in docs/comparison.md), marked fragile when
dropping any one seed changes it.

Writes OUT/results.md (the results table, the regime-b start, the paired differences and
verdicts), OUT/curves.png (needs matplotlib) and OUT/runs.json from everything stored for
the current CODE and SETTINGS; each run's metrics.jsonl and checkpoint stay under OUT/runs/.
"""
import argparse
import ast
import concurrent.futures as cf
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
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
SCORES = ("in_dist", "known", "novel", "shifted", "retained", "format")  # what an evaluation measures

# Fixed before any comparison run (docs/comparison.md, "Pre-registration"): each row is
# (claim, regime, metric, A, B, what the paper predicts of A - B), reported as the paired
# difference A - B over seeds; "start" is the run's starting model. The prediction:
#   ">"  A above B;  "<"  A below B;  "="  A equal to B within +-EQUIVALENCE;
#   ">=" A not below B by more than EQUIVALENCE (A keeps what B had).
CLAIMS = [
    ("1 RLVR stalls beyond knowledge", "a", "in_dist", "grpo", "start", "="),
    ("1 RLVR stalls beyond knowledge", "a", "in_dist", "visurf", "grpo", ">"),
    ("1 RLVR stalls beyond knowledge", "b", "novel", "grpo", "start", "="),
    ("1 RLVR stalls beyond knowledge", "b", "novel", "visurf", "grpo", ">"),
    ("2 SFT injects knowledge", "b", "novel", "sft", "start", ">"),
    ("2 SFT injects knowledge", "b", "novel", "sft", "grpo", ">"),
    ("2 SFT forgets", "b", "retained", "sft", "start", "<"),
    ("2 SFT forgets", "b", "retained", "sft", "grpo", "<"),
    ("2 SFT forgets", "b", "format", "sft", "start", "<"),
    ("3 SFT->RLVR inherits forgetting", "b", "retained", "sft-grpo", "start", "<"),
    ("3 SFT->RLVR inherits forgetting", "b", "retained", "sft-grpo", "visurf", "<"),
    ("3 SFT->RLVR inherits forgetting", "b", "format", "sft-grpo", "visurf", "<"),
    ("3 SFT->RLVR vs ViSurf", "a", "in_dist", "sft-grpo", "visurf", "<"),
    ("3 SFT->RLVR vs ViSurf", "b", "in_dist", "sft-grpo", "visurf", "<"),
    ("4 ViSurf vs SFT", "a", "in_dist", "visurf", "sft", ">"),
    ("4 ViSurf vs SFT", "b", "in_dist", "visurf", "sft", ">"),
    ("4 ViSurf vs SFT", "a", "shifted", "visurf", "sft", ">"),
    ("4 ViSurf vs SFT", "b", "shifted", "visurf", "sft", ">"),
    ("4 ViSurf vs SFT", "b", "retained", "visurf", "sft", ">"),
    ("4 ViSurf vs SFT", "b", "format", "visurf", "sft", ">"),
    ("4 ViSurf keeps the base", "b", "retained", "visurf", "start", ">="),
    ("4 rule 1 (align)", "a", "in_dist", "visurf", "visurf-no-align", ">"),
    ("4 rule 1 (align)", "b", "in_dist", "visurf", "visurf-no-align", ">"),
    ("4 rule 2 (think)", "a", "in_dist", "visurf", "visurf-no-think", ">"),
    ("4 rule 2 (think)", "b", "in_dist", "visurf", "visurf-no-think", ">"),
    ("4 rule 2 (think)", "b", "format", "visurf", "visurf-no-think", ">"),
    ("4 rule 3 (smooth)", "a", "in_dist", "visurf", "visurf-no-smooth", ">"),
    ("4 rule 3 (smooth)", "b", "in_dist", "visurf", "visurf-no-smooth", ">"),
    ("4 rule 3 (smooth)", "b", "format", "visurf", "visurf-no-smooth", ">"),
    ("4 rule 3 (smooth)", "b", "retained", "visurf", "visurf-no-smooth", ">"),
    ("5 competent base: ceiling", "b", "known", "visurf", "grpo", "="),
    ("5 competent base: ceiling", "b", "known", "grpo", "start", "="),
]
METRICS = {"in_dist": "in-distribution accuracy", "known": "accuracy on the base's known colours",
           "novel": "accuracy on novel colours", "shifted": "shifted accuracy",
           "retained": "retained-task accuracy", "format": "greedy completions in the think format"}
EQUIVALENCE = 0.05  # "=" and ">=" predictions: differences within this are no difference (the planning effect)
LEVEL = 0.95        # the two-sided t interval of a paired mean difference
MIN_SEEDS = 12      # the pre-registered seeds per configuration; fewer are reported, marked as a pilot


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
            "--eval-every", str(o.eval_every), "--eval-limit", str(min(96, o.eval_n)), "--save-every", str(10 ** 6)]


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
    if p.returncode in (130, -2):  # Ctrl-C reached it too: the bench is being interrupted, nothing failed
        raise KeyboardInterrupt
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


def eval_points(o):
    """The steps whose checkpoints score a run: the last o.last_k, o.last_every apart (fewer
    when --steps is short). One evaluation scores wherever a run happened to stop."""
    return sorted({o.steps - i * o.last_every for i in range(o.last_k)} & set(range(1, o.steps + 1)))


def stage(o, argv, out, steps, points, regime, seed, offset=0):
    """visurf.py for `steps` steps in `out`, stopped at each of `points` and resumed from the
    checkpoint it saves there (a resume gives the uninterrupted run's numbers), so that
    each is evaluated. -> (training CPU s, evaluation CPU s, [evaluations])"""
    cpu = cpu_eval = 0.0
    evals, done = [], 0
    for stop in sorted(set(points) | {steps}):
        cpu += train(argv + ["--steps", str(stop), "--output-dir", out] +
                     (["--resume", os.path.join(out, "checkpoint")] if done else ["--overwrite"]))
        done = stop
        if stop in points:
            before = cpu_seconds(resource.RUSAGE_SELF)
            evals.append(dict(step=stop + offset, **evaluate(o, os.path.join(out, "checkpoint"), seed,
                                                              eval_tokens(o, regime))))
            cpu_eval += cpu_seconds(resource.RUSAGE_SELF) - before
    return cpu, cpu_eval, evals


def run_one(o, regime, name, seed):
    """One configuration from regime's start: trained, evaluated at eval_points. -> the
    record the store keeps (its scores are averaged over `evals` when reported)."""
    out = os.path.join(o.out, "runs", regime, name, f"seed{seed}")
    tokens = TOKENS_A if regime == "a" else o.tokens_b
    start = ["--model", start_checkpoint(o, seed)] if regime == "b" else []
    points = eval_points(o)
    t = time.time()
    if name == "sft-grpo":  # the same total steps, split between the two stages
        half = o.steps // 2
        cpu, cpu_eval, evals = stage(o, start + common(o, seed, tokens) + ["--mode", "sft"], out + "-sft", half,
                                     [p for p in points if p <= half], regime, seed)
        more = stage(o, ["--model", os.path.join(out + "-sft", "checkpoint")] + common(o, seed, tokens) +
                     ["--mode", "grpo"], out, o.steps - half, [p - half for p in points if p > half], regime, seed,
                     offset=half)
        cpu, cpu_eval, evals = cpu + more[0], cpu_eval + more[1], evals + more[2]
        metrics = read_metrics(os.path.join(out + "-sft", "metrics.jsonl"))
        metrics = [m for m in metrics if not ("eval" in m and m["step"] == half)]  # counted once, below
        metrics += read_metrics(os.path.join(out, "metrics.jsonl"), offset=half)
    else:
        cpu, cpu_eval, evals = stage(o, start + common(o, seed, tokens) + CONFIGS[name], out, o.steps, points,
                                     regime, seed)
        metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
    steps = [m for m in metrics if "loss" in m]
    return dict(regime=regime, config=name, seed=seed, evals=evals, wall_s=time.time() - t, cpu_s=cpu,
                eval_cpu_s=cpu_eval, steps=len(steps), stages=2 if name == "sft-grpo" else 1, tokens=tokens,
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
        scores = evaluate(o, "tiny", seed, eval_tokens(o, regime))
        return dict(regime=regime, config="start", seed=seed, **scores, rollout_format=0.0, steps=0, wall_s=0.0,
                    cpu_s=0.0, eval_cpu_s=cpu_seconds(resource.RUSAGE_SELF) - cpu, tokens=TOKENS_A)
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
    before = cpu_seconds(resource.RUSAGE_SELF)
    scores = evaluate(o, start_checkpoint(o, seed), seed, eval_tokens(o, regime))
    return dict(regime=regime, config="start", seed=seed, **scores, rollout_format=float(np.mean(written)),
                steps=o.warm_steps, wall_s=wall, cpu_s=cpu, eval_cpu_s=cpu_seconds(resource.RUSAGE_SELF) - before,
                tokens=o.tokens_b)


# -----------------------------------------------------------------------------
# The store: each run's record under the hash of the code and settings that made it

CODE_FILES = ("visurf.py", "data.py", "rewards.py", os.path.join("bench", "compare_modes.py"))
# this file's definitions that read results and never make them: changing them keeps CODE
NOT_HASHED = {"CLAIMS", "METRICS", "EQUIVALENCE", "LEVEL", "MIN_SEEDS", "CODE_FILES", "NOT_HASHED", "NOT_SETTINGS",
              "normalised", "defined", "code_hash", "settings", "store_dir", "record_path", "write_json", "read_store",
              "missing", "start_ready", "hold_lock", "run_missing", "t_within", "t_quantile", "t_interval", "verdict",
              "paired_stats", "paired", "scored", "mean_std", "fmt", "seed_ranges", "table", "paired_table",
              "PREDICTED", "noise_line", "plot", "report", "parser", "parse_seeds", "main"}
# flags that do not reach a run: what to run, where, how many at once, and how runs are scored
NOT_SETTINGS = {"seeds", "configs", "regimes", "report_only", "workers", "out", "last_k", "last_every", "tokens_b"}


def defined(node):
    """The names a top-level statement defines (def, class, assignment)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else \
        [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def normalised(src, skip=()):
    """Source as Python runs it: its syntax tree (which holds no comments, blank lines or line
    breaks) without docstrings, and without the top-level definitions named in `skip`."""
    tree = ast.parse(src)
    tree.body = [n for n in tree.body if not (defined(n) and defined(n) <= set(skip))]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def code_hash(root=ROOT):
    """-> (CODE, {file: its own hash}): sha256, 12 hex, of the normalised code that makes the
    numbers: visurf.py, data.py, rewards.py, and this file less NOT_HASHED."""
    digest = lambda s: hashlib.sha256(s.encode()).hexdigest()[:12]
    parts = {}
    for f in CODE_FILES:
        with open(os.path.join(root, f)) as fh:
            parts[f] = normalised(fh.read(), NOT_HASHED if f == CODE_FILES[-1] else ())
    return digest("".join(f"{f}\n{p}\n" for f, p in parts.items())), {f: digest(p) for f, p in parts.items()}


def settings(o):
    """What besides the code makes a run's numbers: every flag that reaches a run, and the
    versions of what does the arithmetic (a new torch can round differently)."""
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"flags": {k: v for k, v in sorted(vars(o).items()) if k not in NOT_SETTINGS},
            "environment": {"python": platform.python_version(), "machine": platform.machine(),
                            **{p: version(p) for p in ("torch", "transformers", "numpy", "pillow")}}}


def store_dir(o, code, sets):
    """OUT/store/CODE/SETTINGS: where the runs of this code and these settings live."""
    return os.path.join(o.out, "store", code, hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:8])


def record_path(folder, regime, config, seed):
    return os.path.join(folder, f"{regime}-{config}-seed{seed}.json")


def write_json(path, obj):
    """Written whole or not at all: a .tmp file, fsynced, renamed over `path`, and the folder
    fsynced, so a kill or a power cut leaves the old file or the new one, never a part."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_store(folder):
    """Every record in `folder` (a killed write's .tmp is not one): {(regime, config, seed): record}."""
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and name != "key.json":
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    r = json.load(f)
                out[r["regime"], r["config"], r["seed"]] = r
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"error: {path} is not a stored run ({e}); remove it and that run runs again")
    return out


def missing(stored, o, regime, config, seed):
    """Not stored, or stored without an evaluation at one of the steps that now score a run."""
    r = stored.get((regime, config, seed))
    return r is None or config != "start" and not set(eval_points(o)) <= {e["step"] for e in r["evals"]}


def start_ready(o, seed, folder):
    """Regime b's start checkpoint for `seed` is on disk and was built by this code and settings."""
    mark = os.path.join(os.path.dirname(start_checkpoint(o, seed)), "store.txt")
    return os.path.isfile(os.path.join(start_checkpoint(o, seed), "trainer_state.pt")) and \
        os.path.isfile(mark) and open(mark).read() == os.path.relpath(folder, o.out)


def hold_lock(out):
    """One bench at a time in an --out folder (two would write the same run folders). The
    lock goes with the process and its workers: a killed bench's workers hold it until done."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    f = open(os.path.join(out, "runs", ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: another compare_modes.py is running in {out} (or a killed one's workers are finishing "
                 f"their runs); wait for it, or use another --out")
    return f


def run_missing(o, folder, code, seeds, configs, regimes):
    """Runs what `folder` lacks of regimes x configs x seeds, a seed at a time (a stopped
    sitting leaves whole seeds, which pair) and o.workers at once, regime b's start first in
    each seed (its runs wait for it); stores each run the moment it ends. Stops, storing
    nothing more, if the code changes under it: runs are separate processes that read it."""
    stored, order = read_store(folder), list(CONFIGS)
    todo = [(r, c, s) for r in regimes for s in seeds for c in configs if missing(stored, o, r, c, s)]
    starts = [(r, "start", s) for r in regimes for s in seeds if missing(stored, o, r, "start", s) or
              r == "b" and any(t[0] == "b" and t[2] == s for t in todo) and not start_ready(o, s, folder)]
    queue = sorted(starts + todo, key=lambda t: (t[2], t[1] != "start", t[0] != "b", t[1] == "sft",
                                                 t[1] == "sft-grpo", order.index(t[1]) if t[1] in order else 0))
    waiting = {s for r, _, s in starts if r == "b"}  # seeds whose regime-b runs wait for their start
    print(f"{os.path.relpath(folder)}: {len(stored)} stored; to run now: {len(starts)} starts, {len(todo)} runs",
          flush=True)
    if not queue:
        return
    t0, n, done, pending = time.time(), len(queue), 0, {}
    with cf.ProcessPoolExecutor(o.workers) as pool:
        o.tokens_b = pool.submit(tokens_b).result()  # in a worker: the parent never loads torch

        def fill():  # the next jobs that can start, in queue order, while a worker is free
            while len(pending) < o.workers:
                t = next((t for t in queue if not (t[0] == "b" and t[1] != "start" and t[2] in waiting)), None)
                if t is None:
                    return
                queue.remove(t)
                pending[pool.submit(build_start, o, t[0], t[2]) if t[1] == "start" else pool.submit(run_one, o, *t)] = t
        fill()
        while pending:
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                regime, config, seed = pending.pop(f)
                try:
                    r = f.result()
                except cf.process.BrokenProcessPool:
                    sys.exit("error: a worker process died (killed?); every finished run is stored, and the same "
                             "command goes on with what is missing")
                except RuntimeError as e:  # visurf.py failed: its command and the end of what it said
                    print(e, file=sys.stderr)
                    sys.exit(f"error: {regime} {config} seed {seed} failed (visurf.py above); every finished run is "
                             f"stored")
                now = code_hash()[0]
                if now != code:
                    print(f"error: the code changed while the bench ran (CODE {code}, now {now}); the runs in flight "
                          f"are dropped (waiting for them to end); run again to go on under the new code",
                          file=sys.stderr, flush=True)
                    raise SystemExit(1)
                write_json(record_path(folder, regime, config, seed), dict(r, code=code, finished=time.time()))
                done += 1
                if config == "start" and regime == "b":
                    with open(os.path.join(os.path.dirname(start_checkpoint(o, seed)), "store.txt"), "w") as m:
                        m.write(os.path.relpath(folder, o.out))
                    waiting.discard(seed)
                s = r if config == "start" else scored(r, eval_points(o))
                print(f"{regime} {config:<17} seed {seed}: in-dist {s['in_dist']:.3f} (known {s['known']:.3f}, novel "
                      f"{s['novel']:.3f}) shifted {s['shifted']:.3f} retained {s['retained']:.3f} format "
                      f"{s['format']:.3f} | {r['cpu_s'] + r['eval_cpu_s']:.0f} CPU s | stored, {done}/{n}, "
                      f"{time.time() - t0:.0f}s elapsed", flush=True)
            fill()


# -----------------------------------------------------------------------------
# Statistics and verdicts

def t_within(t, df):
    """P(|T| < t) for Student's T with whole df > 0 (Abramowitz and Stegun 26.7.3-4, exact)."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2 == 0:
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    for k in range(1, (df - 1) // 2):
        term *= c2 * 2 * k / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))


def t_quantile(level, df):
    """The t with P(|T| < t) = level, by bisection (no scipy needed)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_interval(d, level=LEVEL):
    """The two-sided Student t interval of the mean of paired differences d (len >= 2)."""
    m, sd = mean_std(d)
    half = t_quantile(level, len(d) - 1) * sd / math.sqrt(len(d))
    return m - half, m + half


def verdict(lo, hi, predicted, margin=EQUIVALENCE):
    """The pre-registered rule: an interval [lo, hi] of A - B supports the paper's prediction
    when it lies wholly where the prediction says, and contradicts it when it lies wholly on
    the other side; anything between is "not supported"."""
    if predicted == ">":
        return "supported" if lo > 0 else "contradicted" if hi < 0 else "not supported"
    if predicted == "<":
        return "supported" if hi < 0 else "contradicted" if lo > 0 else "not supported"
    if predicted == ">=":
        return "supported" if lo > -margin else "contradicted" if hi < -margin else "not supported"
    if predicted == "=":
        return ("supported" if -margin < lo and hi < margin else
                "contradicted" if lo > margin or hi < -margin else "not supported")
    raise ValueError(f"unknown prediction {predicted!r}")


def paired_stats(d, predicted):
    """One claim row's numbers from its per-seed differences d: mean, std, the t interval, the
    seeds' signs, the leave-one-seed-out range of the mean, the verdict, and whether leaving
    out any one seed changes the verdict (fragile; needs 3 seeds)."""
    n, (m, sd) = len(d), mean_std(d)
    out = dict(n=n, mean=m, std=sd, se=sd / math.sqrt(n), positive=sum(x > 0 for x in d),
               negative=sum(x < 0 for x in d), zero=sum(x == 0 for x in d),
               beyond_2se=bool(abs(m) > 2 * sd / math.sqrt(n)) if n > 1 else None)  # the 3-seed tables' rule
    if n < 2:
        return dict(out, lo=None, hi=None, verdict=None, loo=None, fragile=None)
    lo, hi = t_interval(d)
    v, rest = verdict(lo, hi, predicted), [d[:i] + d[i + 1:] for i in range(n)]
    return dict(out, lo=lo, hi=hi, verdict=v, loo=[min(map(statistics.mean, rest)), max(map(statistics.mean, rest))],
                fragile=any(verdict(*t_interval(x), predicted) != v for x in rest) if n > 2 else None)


def paired(runs, starts, claims):
    """Each claim row over the seeds that hold both A and B (same start, data and order): the
    differences A - B (rounded to 1e-9, so that equal scores differ by exactly 0) and paired_stats."""
    value = {(r["regime"], r["config"], r["seed"]): r for r in runs + starts}
    out = []
    for claim, regime, metric, a, b, predicted in claims:
        seeds = sorted(s for (g, c, s) in value if g == regime and c == a and (regime, b, s) in value)
        if not seeds:
            continue
        d = [round(value[regime, a, s][metric] - value[regime, b, s][metric], 9) for s in seeds]
        out.append(dict(claim=claim, regime=regime, metric=metric, a=a, b=b, predicted=predicted, seeds=seeds,
                        diffs=d, **paired_stats(d, predicted)))
    return out


def scored(r, points):
    """A stored run with its scores: each the mean over its evaluations at `points`."""
    evals = [e for e in r["evals"] if e["step"] in points]
    return dict(r, **{k: statistics.mean(e[k] for e in evals) for k in SCORES})


# -----------------------------------------------------------------------------
# Tables and the picture

def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs, digits=3):
    m, s = mean_std(xs)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def seed_ranges(seeds):
    """[0, 1, 2, 3, 7] -> '0-3,7': what --seeds reads."""
    out, seeds = [], sorted(seeds)
    for s in seeds:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def table(runs, starts, configs, regimes):
    rows = ["| regime | config | seeds | in-distribution | known colours | novel colours | shifted | retained | "
            "format | steps | stages | generated samples | CPU s | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cpu = lambda rs: statistics.mean(r["cpu_s"] + r["eval_cpu_s"] for r in rs)
    for regime in regimes:
        st = [s for s in starts if s["regime"] == regime]
        if st:
            rows.append(f"| {regime} | *start* | {len(st)} | " + " | ".join(fmt([s[k] for s in st]) for k in SCORES) +
                        f" | {st[0]['steps'] and str(st[0]['steps']) + ' (SFT)'} | – | 0 | {cpu(st):.0f} | "
                        f"{statistics.mean(s['wall_s'] for s in st):.0f} |")
        for name in configs:
            rs = [r for r in runs if r["regime"] == regime and r["config"] == name]
            if rs:
                rows.append(f"| {regime} | {name} | {len(rs)} | " + " | ".join(fmt([r[k] for r in rs]) for k in SCORES) +
                            f" | {rs[0]['steps']} | {rs[0]['stages']} | {rs[0]['generated']} | {cpu(rs):.0f} | "
                            f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
    return "\n".join(rows)


PREDICTED = {">": "> 0", "<": "< 0", "=": f"0 ± {EQUIVALENCE}", ">=": f"≥ −{EQUIVALENCE}"}


def paired_table(rows):
    lines = [f"| claim | regime | metric | A − B | predicted | seeds | mean [{LEVEL:.0%} t interval] | seeds + / − / 0 | "
             f"leave-one-out mean | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["verdict"] is None:
            interval, loo, v = f"{r['mean']:+.3f}", "–", "– (1 seed)"
        else:
            interval = f"{r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
            loo = f"{r['loo'][0]:+.3f} to {r['loo'][1]:+.3f}"
            v = r["verdict"] if r["verdict"] == "not supported" else f"**{r['verdict']}**"
            v += " (**fragile**)" if r["fragile"] else " (2 seeds: not checked)" if r["fragile"] is None else ""
        lines.append(f"| {r['claim']} | {r['regime']} | {r['metric']} | {r['a']} − {r['b']} | "
                     f"{PREDICTED[r['predicted']]} | {r['n']} | {interval} | {r['positive']} / {r['negative']} / "
                     f"{r['zero']} | {loo} | {v} |")
    return "\n".join(lines)


def noise_line(records, starts, points):
    """What scoring by the mean of the last evaluations buys: the median paired std over the
    claim rows that vary, scored by the last evaluation alone and by the mean."""
    if len(points) < 2:
        return ""
    stds = [[r["std"] for r in paired([scored(x, p) for x in records], starts, CLAIMS) if r["n"] > 1]
            for p in (points[-1:], points)]
    varying = [(a, b) for a, b in zip(*stds) if a > 0 or b > 0]
    if not varying:
        return ""
    last, mean = (statistics.median(x) for x in zip(*varying))
    return (f"\nScoring a run by the mean of its {len(points)} last evaluations rather than its last one: the median "
            f"paired std over the {len(varying)} claim rows that vary is {mean:.3f}, against {last:.3f} "
            f"(variance ratio {(mean / last) ** 2 if last else float('nan'):.2f}).\n")


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
                curves = [{m["step"]: get(m) for m in r["curve"] if get(m) is not None}
                          for r in runs if r["regime"] == regime and r["config"] == name]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                xs = sorted(set.intersection(*map(set, curves)))  # the steps every seed has (evaluations may differ)
                ys = [statistics.mean(c[x] for c in curves) for x in xs]
                if j > 0 and len(ys) > 20:  # per-step values are noisy: a running mean of 10
                    ys = [statistics.mean(ys[max(0, k - 9):k + 1]) for k in range(len(ys))]
                ax.plot(xs, ys, label=name, color=f"C{list(CONFIGS).index(name)}",
                        linestyle="--" if "no-" in name else "-")  # same colour in every panel
            ax.set_title(f"regime {regime}: {title}", fontsize=9)
            ax.set_xlabel("optimizer step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def report(o, defaults, folder, code, files, sets):
    """results.md, runs.json and curves.png from everything stored in `folder`, whatever
    --seeds, --configs and --regimes this invocation ran."""
    stored, points = read_store(folder), eval_points(o)
    if not stored:
        sys.exit(f"error: nothing is stored for this code and these settings ({os.path.relpath(folder)}); "
                 f"run without --report-only first")
    starts = sorted((r for r in stored.values() if r["config"] == "start"), key=lambda s: (s["regime"], s["seed"]))
    records = sorted((r for r in stored.values() if r["config"] != "start" and
                      set(points) <= {e["step"] for e in r["evals"]}),
                     key=lambda r: (r["regime"], list(CONFIGS).index(r["config"]), r["seed"]))
    runs = [scored(r, points) for r in records]
    lacking = len(stored) - len(starts) - len(runs)
    regimes = sorted({r["regime"] for r in stored.values()})
    configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
    seeds = sorted({r["seed"] for r in stored.values()})
    diffs = paired(runs, starts, CLAIMS)
    tokens = {r["regime"]: r["tokens"] for r in stored.values()}
    cpu = sum(r["cpu_s"] + r["eval_cpu_s"] for r in stored.values())
    command = " ".join(["python bench/compare_modes.py", "--seeds", seed_ranges(seeds)] +
                       [f"--{k.replace('_', '-')} {v}" for k, v in sets["flags"].items() if v != defaults[k]] +
                       [f"--{k.replace('_', '-')} {getattr(o, k)}" for k in ("last_k", "last_every")
                        if getattr(o, k) != defaults[k]])
    env = sets["environment"]
    md = (f"{o.steps} optimizer steps, B {o.batch_size}, G {o.group_size}, lr {o.lr}, {o.shots} images per "
          f"colour; max new tokens " + " / ".join(f"{t} ({g})" for g, t in sorted(tokens.items())) +
          f"; greedy accuracy on {o.eval_n} held-out prompts "
          f"per set. Each run is scored by "
          + (f"its evaluation at step {points[0]}; " if len(points) == 1 else
             f"the mean of its evaluations at steps {', '.join(map(str, points))}; ") +
          f"mean ± std over seeds. Known colours: {', '.join(KNOWN)}; novel: {', '.join(NOVEL)}. Retained: the "
          f"size task (chance 1/3), never trained on here. Format: greedy colour completions written "
          f"<think>…</think><answer>…</answer>. CPU s: a run's training processes and its evaluations, which unlike "
          f"wall time do not depend on what else shares the machine.\n\n"
          f"Stored for this code and these settings: {len(runs)} runs and {len(starts)} starts, seeds "
          f"{seed_ranges(seeds)}, {cpu / 3600:.2f} CPU-hours in all"
          + (f" ({lacking} more stored without the evaluations at those steps: not counted)" if lacking else "")
          + f". Code {code} (" + ", ".join(f"{k} {v}" for k, v in files.items()) + f"); settings "
          f"{os.path.basename(folder)} (Python {env['python']}, torch {env['torch']}, transformers "
          f"{env['transformers']}, numpy {env['numpy']}); store `{os.path.relpath(folder, o.out)}`. Reproduce (only "
          f"what is missing runs): `{command}`.\n\n" + table(runs, starts, configs, regimes) + "\n")
    b = [s for s in starts if s["regime"] == "b"]
    if b:
        md += (f"\nRegime b's start ({o.warm_steps} SFT steps on full-format completions): rollouts in the format "
               f"at temperature 1 on the new training prompts, per seed: "
               + ", ".join(f"{s['rollout_format']:.2f}" for s in b) + f" (mean {fmt([s['rollout_format'] for s in b])}).\n")
    md += ("\nPaired by seed (same start, data and order): A − B over the seeds that hold both; its mean with the "
           f"{LEVEL:.0%} Student t interval (t on n − 1 degrees of freedom, times std/√n); how many seeds have A − B "
           "above, below and at 0; the range of the mean over the n leave-one-seed-out subsets; and the verdict. "
           "Verdict (docs/comparison.md, Pre-registration): for a prediction A − B > 0, supported when the interval "
           "lies above 0, contradicted when it lies below 0, otherwise not supported (< 0 mirrored); for "
           f"0 ± {EQUIVALENCE}, supported when the interval lies inside (−{EQUIVALENCE}, +{EQUIVALENCE}), "
           f"contradicted when it lies wholly outside it; for ≥ −{EQUIVALENCE}, supported when its lower end is "
           f"above −{EQUIVALENCE}, contradicted when its upper end is below. Fragile: the verdict changes when one "
           f"seed, any one, is left out."
           + (f" Rows with fewer than {MIN_SEEDS} seeds are a pilot, not the pre-registered test."
              if any(r["n"] < MIN_SEEDS for r in diffs) else "")
           + "\n\n" + (paired_table(diffs) if diffs else "(No claim row has both of its configurations stored.)")
           + "\n" + noise_line(records, starts, points))
    with open(os.path.join(o.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(o.out, "runs.json"), "w") as f:
        json.dump({"runs": runs, "starts": starts, "paired": diffs, "code": files, "code_hash": code,
                   "settings": sets, "store": os.path.relpath(folder, o.out), "eval_points": points, "cpu_s": cpu,
                   "args": vars(o)}, f)
    plot(runs, configs, regimes, os.path.join(o.out, "curves.png"))
    store = os.path.join(o.out, "store")
    others = [f"store/{c}/{s}" for c in sorted(os.listdir(store)) if os.path.isdir(os.path.join(store, c))
              for s in sorted(os.listdir(os.path.join(store, c))) if os.path.join(store, c, s) != folder]
    print("\n" + md + f"\nwrote {o.out}/results.md, curves.png, runs.json from {os.path.relpath(folder)}"
          + (f"\nalso stored, for other code or settings (never pooled with these): {', '.join(others)}" if others else ""))


# -----------------------------------------------------------------------------
# Flags, and what to run

def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("what to run (only what the store lacks runs)")
    g.add_argument("--seeds", default="0-11", help="seeds to have stored: 0-11, 0,1,2 or 0-3,7 (default 0-11, "
                                                    "the pre-registered count)")
    g.add_argument("--configs", default=",".join(CONFIGS))
    g.add_argument("--regimes", default="a,b")
    g.add_argument("--report-only", action="store_true",
                   help="run nothing: results.md, curves.png and runs.json from what is stored")
    g = p.add_argument_group("each run (with the code, these key the store)")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps per configuration")
    g.add_argument("--warm-steps", type=int, default=400, help="regime b: the base's SFT steps")
    g.add_argument("--warm-lr", type=float, default=1e-3, help="regime b: the base's SFT learning rate")
    g.add_argument("--shots", type=int, default=4, help="training images per colour")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--group-size", type=int, default=4)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--eval-every", type=int, default=50, help="steps between the curves' evaluations")
    g.add_argument("--eval-n", type=int, default=192, help="prompts in each held-out set")
    g = p.add_argument_group("scoring (not in the store's key: a stored run serves any that its evaluations cover)")
    g.add_argument("--last-k", type=int, default=4, help="score a run by the mean of its last K evaluations")
    g.add_argument("--last-every", type=int, default=10, help="steps between those evaluations")
    g = p.add_argument_group("where")
    g.add_argument("--workers", type=int, default=2, help="runs side by side, one core each")
    g.add_argument("--out", default=os.path.join(HERE, "results"))
    return p


def parse_seeds(text):
    """'0-11', '0,1,2' or '0-3,7' -> the sorted seeds; None if malformed."""
    seeds = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or m[2] is not None and int(m[2]) < int(m[1]):
            return None
        seeds.update(range(int(m[1]), int(m[2] if m[2] is not None else m[1]) + 1))
    return sorted(seeds)


def main():
    p = parser()
    o = p.parse_args()
    seeds, configs, regimes = parse_seeds(o.seeds), o.configs.split(","), o.regimes.split(",")
    if seeds is None:
        sys.exit(f"error: --seeds {o.seeds!r}: give seeds as 0-11, 0,1,2 or 0-3,7 (whole numbers, low-high ranges)")
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"error: unknown config {c!r} (choose from {', '.join(CONFIGS)})")
    for r in regimes:
        if r not in ("a", "b"):
            sys.exit(f"error: unknown regime {r!r} (choose from a, b)")
    for flag, least in (("steps", 1), ("last_k", 1), ("last_every", 1), ("eval_n", 6), ("workers", 1),
                        ("batch_size", 1), ("group_size", 1), ("shots", 1)):
        if getattr(o, flag) < least:
            sys.exit(f"error: --{flag.replace('_', '-')} must be at least {least}"
                     + (" (one prompt per colour)" if flag == "eval_n" else ""))
    try:
        code, files = code_hash()
    except SyntaxError as e:  # a file in the middle of an edit
        sys.exit(f"error: {os.path.relpath(e.filename or '?', ROOT)} line {e.lineno} does not parse ({e.msg}): "
                 f"the code hash needs it")
    sets = settings(o)
    folder = store_dir(o, code, sets)
    if not o.report_only:
        lock = hold_lock(o.out)  # noqa: F841 (held until the process ends)
        os.makedirs(folder, exist_ok=True)
        if not os.path.isfile(os.path.join(folder, "key.json")):
            write_json(os.path.join(folder, "key.json"), {"code": code, "files": files, "settings": sets})
        try:
            run_missing(o, folder, code, seeds, configs, regimes)
        except KeyboardInterrupt:
            print(f"interrupted: every finished run is stored in {os.path.relpath(folder)}; the same command goes "
                  f"on with what is missing", file=sys.stderr)
            sys.exit(130)
    report(o, vars(p.parse_args([])), folder, code, files, sets)


if __name__ == "__main__":
    main()
