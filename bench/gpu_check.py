"""
What one CUDA GPU must confirm that no CPU test can: one command, one table, a few minutes.

    python bench/gpu_check.py                  # on a GPU box (under 8 minutes on one GPU)
    python bench/gpu_check.py --device cpu     # the same script on CPU: the GPU-only parts say "skipped"

Rows (the CPU tests run the same code under the same regime; this is the GPU's word on it):
  a. the default tiny run, a few steps, default flags (on CUDA: bf16, the static cache)
  b. one ViSurf step of the bench's mid preset in bf16, and bf16-vs-fp32 log-prob agreement
  c. decoding: dynamic vs static vs compiled cache: the same greedy tokens? tokens/s,
     compile time, graphs compiled
  d. a left-padded forward+backward with cuDNN SDPA on and off: finite? equal?
  e. peak memory per phase of the step in b (CUDA's allocator; on CPU there is no per-phase peak)
On CPU the model is the tiny one (--arch tiny) unless asked; compiled decoding and cuDNN are
CUDA's and are skipped. CI does not run this; test_visurf.py runs it on CPU.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # vs_trl, beside this file
import data  # noqa: E402
import visurf  # noqa: E402
from vs_trl import build_weights, prompts  # noqa: E402

CPU = torch.device("cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device):  # GiB since the last call (CUDA); None on CPU
    if device.type != "cuda":
        return None
    sync(device)
    return visurf.peak_memory_gb(device)


def load(o, precision):
    args = visurf.parse_args(["--model", o.weights, "--group-size", "8", "--batch-size", "2", "--lr", "1e-6",
                              "--max-new-tokens", str(o.new_tokens), "--min-new-tokens", str(o.new_tokens),
                              "--precision", precision])
    model, processor, conv = visurf.load_model(o.weights, args)
    return model.to(o.device), processor, conv, args


def check_default_run(o, tmp):
    out = os.path.join(tmp, "a")
    t = time.time()
    visurf.main(["--steps", "5", "--eval-limit", "32", "--output-dir", out, "--device", str(o.device)])
    steps = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    ok = len(steps) == 5 and all(r["loss"] is not None for r in steps) and not steps[-1]["skipped_steps"]
    cache = "static" if o.device.type == "cuda" else "dynamic"
    precision = "bf16" if o.device.type == "cuda" else "fp32"
    return ok, (f"5 steps + 2 evaluations in {time.time() - t:.1f} s ({precision}, {cache} cache); "
                f"{steps[-1]['skipped_steps']} steps skipped")


def check_step(o, results):
    model, processor, conv, args = load(o, "bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    samples = prompts(args.batch_size, o.image_size, 0)
    torch.manual_seed(0)
    phases, step = {}, optimizer.step

    def timed_step(*a, **k):  # the forward+backward's peak ends where the optimizer's begins
        phases["forward+backward"] = peak(o.device)
        return step(*a, **k)
    optimizer.step = timed_step
    peak(o.device)
    sync(o.device)
    t = time.time()
    group = visurf.make_groups(model, processor, samples, conv, args)
    phases["generate"] = peak(o.device)
    stats = visurf.update(model, optimizer, *group[:4], args)
    phases["optimizer"] = peak(o.device)
    sync(o.device)
    seconds = time.time() - t
    results["phases"] = phases
    # the same sequences scored in bf16 and in fp32
    prompts_, completions, _, per, _ = group
    with torch.no_grad():
        lp = {}
        for precision in ("bf16", "fp32"):
            with visurf.autocast(visurf.parse_args(["--precision", precision]), o.device):
                lp[precision], mask = visurf.token_logprobs(model, prompts_, completions, per)
    diff = ((lp["bf16"] - lp["fp32"]).abs() * mask)
    finite = all(map(torch.isfinite, (torch.tensor(stats["loss"]), torch.tensor(stats["grad_norm"]))))
    return finite and not stats["skipped"], (
        f"{o.arch}: one step {seconds:.1f} s ({len(completions)} sequences); loss {stats['loss']:+.4f}; "
        f"|bf16 - fp32| log-prob max {diff.max():.4f}, mean {diff.sum() / mask.sum():.5f}")


def check_decode(o):
    model, processor, conv, args = load(o, "bf16")
    model.eval()
    batch = visurf.encode_prompts(processor, prompts(2, o.image_size, 1), conv, o.device)
    out, cells, ok = {}, [], True
    for kv in ("dynamic", "static", "compiled"):
        if kv == "compiled" and o.device.type != "cuda":
            cells.append("compiled: skipped (CUDA graphs are CUDA's)")
            continue
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        times = []
        for _ in range(2):  # the first call compiles (compiled) or warms up; the second is timed
            sync(o.device)
            t = time.time()
            with torch.no_grad(), visurf.autocast(args, o.device):
                out[kv] = visurf.generate(model, processor, batch, 8, o.new_tokens, greedy=True,
                                          min_new_tokens=o.new_tokens, kv_cache=kv, dtype=torch.bfloat16)
            sync(o.device)
            times.append(time.time() - t)
        same = out[kv] == out["dynamic"]
        ok &= same or kv == "compiled"  # compiled kernels may round differently; reported, not failed
        extra = (f", first call {times[0]:.1f} s, {torch._dynamo.utils.counters['stats']['unique_graphs']} graph(s)"
                 if kv == "compiled" else "")
        cells.append(f"{kv}: {16 * o.new_tokens / times[1]:.0f} tok/s{extra}{'' if same else ', tokens DIFFER'}")
    return ok, "; ".join(cells)


def check_padding(o):
    model, processor, conv, args = load(o, "bf16")
    samples = data.synthetic("detection", 2, 0)
    w, h = samples[1]["size"]  # one image half as wide: fewer image tokens, so the other prompt is left-padded
    samples[1]["image"], samples[1]["size"] = samples[1]["image"].resize((w // 2, h)), (w // 2, h)
    prompts_ = visurf.encode_prompts(processor, samples, conv, o.device)
    P = prompts_["input_ids"].shape[1]
    pads = int((prompts_["attention_mask"] == 0).sum())
    T = (64 - P) % 128 or 128  # sequences of length 64 mod 128: where cuDNN's backward returned NaN
    completions = [[5] * T, [7] * (T // 2)]
    grads, cells, ok = {}, [], True
    for cudnn in ([False, True] if o.device.type == "cuda" else [False]):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        model.zero_grad()
        with visurf.autocast(args, o.device):
            logp, mask = visurf.token_logprobs(model, prompts_, completions, 1)
        (logp * mask).sum().backward()
        g = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        grads[cudnn] = g
        finite = bool(torch.isfinite(logp).all() and torch.isfinite(g).all())
        ok &= finite or cudnn  # cuDNN is off in visurf; a NaN there confirms why
        cells.append(f"cuDNN {'on' if cudnn else 'off'}: {'finite' if finite else 'NaN'}")
    torch.backends.cuda.enable_cudnn_sdp(False)  # visurf's setting
    if True in grads:
        rel = (grads[True] - grads[False]).norm() / grads[False].norm()
        cells.append(f"gradient |on - off| / |off| = {rel:.2e}")
    else:
        cells.append("cuDNN on: skipped (no cuDNN on CPU)")
    return ok, f"{P} prompt positions, {pads} of them padding, sequences of {P + T}: " + "; ".join(cells)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=["tiny", "mid"], help="model of rows b-e (default: mid on CUDA, tiny on CPU)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--new-tokens", type=int, default=64)
    o = p.parse_args()
    o.device = torch.device(o.device)
    o.arch = o.arch or ("mid" if o.device.type == "cuda" else "tiny")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        o.weights = os.path.join(tmp, "weights")
        build_weights(o.arch, o.weights, 0)
        for name, check in [("a. default tiny run", lambda: check_default_run(o, tmp)),
                            ("b. one step, bf16 vs fp32", lambda: check_step(o, results)),
                            ("c. decode caches", lambda: check_decode(o)),
                            ("d. left padding, cuDNN", lambda: check_padding(o))]:
            try:
                ok, detail = check()
            except (Exception, SystemExit) as e:  # a failed check is a row of the table, not the end
                ok, detail = False, f"{type(e).__name__}: {visurf.one_line(e)}"
            rows.append((name, "ok" if ok else "FAIL", detail))
            print(f"{name}: {rows[-1][1]}", file=sys.stderr, flush=True)
    phases = results.get("phases", {})
    cuda = o.device.type == "cuda"
    rows.append(("e. peak memory per phase", ("ok" if phases else "FAIL") if cuda else "skipped",
                 ", ".join(f"{k} {v:.2f} GiB" for k, v in phases.items()) if cuda else "CUDA's allocator only"))
    name = torch.cuda.get_device_name(o.device) if o.device.type == "cuda" else "CPU"
    print(f"\n{name}, torch {torch.__version__}, arch {o.arch}\n")
    print("| check | result | measured |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.exit(0 if all(r[1] != "FAIL" for r in rows) else 1)


if __name__ == "__main__":
    main()
