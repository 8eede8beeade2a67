"""
visurf: ViSurf (Visual Supervised-and-Reinforcement Fine-Tuning, arXiv 2510.10606) for
Qwen2-VL and Qwen2.5-VL in one file, with the verifiable rewards of Visual-RFT (2503.01785).

Part I is the paper, in its order; Part II ("Running it") is everything a run needs besides.
One ViSurf step, and where each part of it is done:
  1. sample G completions per prompt (image + question) from the policy   generate
  2. append the ground-truth answer y as member G+1 of the group          make_groups
  3. score every member with its task's verifiable reward (rewards.py)    data.score, total_reward
  4. control y's reward: rule 1 writes y as a rollout writes its answer
     (data.gt_completion); rule 2 gives y no thinking reward; rule 3
     smooths y's reward once a rollout answers as well                    gt_reward
  5. normalise the advantages over the G+1 rewards; y's own is A_y        group_advantages, make_groups
  6. one clipped policy-gradient step on all G+1 sequences                update, policy_loss, aggregate
train_step is one step, train the loop, evaluate SPEC §5's greedy evaluation. --mode grpo
drops the label (plain RLVR); --mode sft trains on it alone; --ablate switches rules off.

    python visurf.py                       # tiny random Qwen2-VL on a synthetic task, CPU
    python visurf.py --model Qwen/Qwen2-VL-2B-Instruct --data train.jsonl --output-dir runs/x
    python visurf.py --eval --model runs/x/checkpoint --data val.json --images val2017

What is simplified, on purpose:
- one device per process; several GPUs are torchrun's data parallelism over whole groups,
  on PyTorch's DDP, or FSDP2 with --fsdp; no vLLM, no DeepSpeed;
- the ratio is per token, as in GRPO; with one update per batch (--ppo-epochs 1) it is
  exactly 1, so pi_old is the detached policy and no extra forward pass is made;
- KL against a frozen copy (k3 estimator) only when --beta > 0; ViSurf uses none;
- each prompt (its image included) goes through the model once per step, in generation
  and in training, however many sequences share it; the processor is image-only, so
  torchvision is never needed.
"""
import argparse
import contextlib
import copy
import ctypes
import datetime
import errno
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
import weakref
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # not Unix: no folder lock
    fcntl = None
import numpy as np
if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): one line, not an import's traceback
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted; nothing was written", file=sys.stderr),
                                             os._exit(130)))
import torch
import torch.distributed as dist
import transformers
from torch.utils.checkpoint import checkpoint
from transformers import CompileConfig, GenerationConfig, Qwen2VLProcessor
from transformers.cache_utils import Cache, StaticLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling

import data
import rewards

# =============================================================================
# Part I: ViSurf. The rewards of one group, the three rules, the advantages (pure
# functions; test_visurf.py checks them against numbers computed by hand)

def total_reward(parts, think_weight):
    """w * think + the answer's components. A weight below 1 lets a correct answer
    without the format outrank a well-formatted wrong one (SPEC §2, rule 2)."""
    return think_weight * parts.get("think", 0.0) + answer_reward(parts)


def answer_reward(parts):
    """The answer's quality: every component but the thinking format."""
    return sum(v for k, v in parts.items() if k != "think")


def gt_reward(label_parts, rollout_parts, think_weight, ablate=()):
    """Rules 2 and 3: the label's reward r_y, from its reward components and its group's
    rollouts'. -> (r_y, whether rule 3 fired)."""
    # rule 2: the label carries no reasoning, so it earns no thinking reward; with the rule
    # off it is credited as if it had reasoned
    label = dict(label_parts, think=1.0 if "think" in ablate else 0.0)
    r_y = total_reward(label, think_weight)
    if "smooth" in ablate or not rollout_parts:
        return r_y, False
    # rule 3: once the best rollout answers at least as well as the label, r_y becomes the
    # rollouts' mean reward, so A_y = 0 and the supervision fades. It compares answers, not
    # totals: with the label's think removed, a formatted but wrong rollout would otherwise
    # tie the right label and silence it where it is needed
    if max(answer_reward(p) for p in rollout_parts) >= answer_reward(label):
        totals = [total_reward(p, think_weight) for p in rollout_parts]
        return float(sum(totals) / len(totals)), True
    return r_y, False


def group_advantages(rewards_):
    """(r - mean) / (std + 1e-6) over one group (label last, when present); torch's
    default (unbiased) std. A group whose rewards are all equal contributes nothing."""
    r = torch.as_tensor(rewards_, dtype=torch.float64)
    if r.numel() < 2 or r.max() == r.min():
        return torch.zeros_like(r, dtype=torch.float32)
    return ((r - r.mean()) / (r.std() + 1e-6)).float()


def policy_loss(logp, old_logp, adv, eps_low, eps_high=None, ref_logp=None, beta=0.0):
    """Clipped policy-gradient loss per completion token, the ratio kept in [1 - eps_low,
    1 + eps_high] (eps_high: DAPO's clip-higher; default eps_low). -> [N, T]"""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp)                                  # [N, T]
    a = adv[:, None]                                                    # [N, 1]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta > 0:  # k3 estimate of KL(pi || pi_ref), always >= 0
        d = ref_logp - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)
    return per_token


def clipped(logp, old_logp, adv, eps_low, eps_high):
    """Where the clip acts: the ratio is past the bound on the side its advantage pushes
    toward, so the token's gradient is 0 (TRL's clip_ratio/region_mean counts the same). -> [N, T]"""
    ratio, a = torch.exp(logp - old_logp), adv[:, None]
    return ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))


def aggregate(per_token, mask, how, n_seqs, n_tokens):
    """[N, T] per-token losses -> one number. n_seqs and n_tokens count the whole batch, so
    micro-batches of it sum to the same loss.
      sum                  every token weighs the same, / sequences (the paper's Eq. 8)
      token-mean           every token weighs the same, / tokens (DAPO, veRL, TRL today)
      seq-mean-token-mean  each sequence's mean, / sequences (GRPO, Visual-RFT's trainer):
                           a short label's tokens weigh more than a long rollout's"""
    if how == "seq-mean-token-mean":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    return (per_token * mask).sum() / (n_seqs if how == "sum" else n_tokens)


# -----------------------------------------------------------------------------
# Rollouts, and the log-probabilities of (prompt + completion) sequences

def encode_prompts(processor, samples, conv, device):
    """Left-padded prompts with their images. pixel_values is [sum of patches, 1176]."""
    texts = [processor.apply_chat_template(data.messages(s, conv), add_generation_prompt=True, tokenize=False)
             for s in samples]
    batch = processor(text=texts, images=[data.open_image(s) for s in samples], return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items()}


def select_prompts(prompts, idx):
    """Prompt rows `idx` (repeats allowed), moving each image's block of patch rows along."""
    counts = prompts["image_grid_thw"].prod(-1).tolist()
    blocks = prompts["pixel_values"].split(counts)
    out = {k: prompts[k][idx] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    out["pixel_values"] = torch.cat([blocks[i] for i in idx.tolist()])
    return out


def generate(model, processor, prompts, n, max_new_tokens, greedy=False, min_new_tokens=0, kv_cache="auto",
             dtype=torch.float32):
    """n completions per prompt. -> B*n token lists, each up to and including its first
    end token (all of it if it never ended). The image and the prompt go through the
    model once per prompt: their key/value cache is then repeated n times, and the n
    samples continue from it, so G does not multiply the vision tower or the prefill.
    A static cache (kv_cache "static" or "compiled", or "auto" on CUDA) holds the same keys
    and values, in `dtype`, in tensors of fixed size reused by every call: what lets
    transformers compile the decode step ("compiled") into a bounded number of graphs."""
    tok = processor.tokenizer
    text = {k: prompts[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}   # [B, P]
    # all but the last prompt token: generate() must have one uncached token to start from
    cache = model(**{k: v[:, :-1] for k, v in text.items()}, pixel_values=prompts["pixel_values"],
                  image_grid_thw=prompts["image_grid_thw"], use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(n)
    model.model.rope_deltas = model.model.rope_deltas.repeat_interleave(n, 0)  # M-RoPE's offsets, per row
    static = kv_cache in ("static", "compiled") or (kv_cache == "auto" and model.device.type == "cuda")
    if static:
        cache = static_cache(model, cache, text["input_ids"].shape[1] + max_new_tokens, dtype)
    idx = torch.arange(text["input_ids"].shape[0], device=text["input_ids"].device).repeat_interleave(n)
    # synced_gpus off: transformers turns it on for a sharded model, where every process steps
    # until all are done; here each decodes with whole weights (whole_weights), on its own
    out = model.generate(**{k: v[idx] for k, v in text.items()}, past_key_values=cache, synced_gpus=False,
                         generation_config=
                         generation_config(tok, max_new_tokens, greedy, min_new_tokens, compile=kv_cache == "compiled"))
    rows = out[:, text["input_ids"].shape[1]:].tolist()             # [B*n, T], padded after the end
    ends = set(end_ids(tok))
    return [r[:next((i + 1 for i, t in enumerate(r) if t in ends), len(r))] for r in rows]


def token_logprobs(model, prompts, completions, per_prompt):
    """log pi(token) at every completion position. completions: N token lists, the
    first per_prompt belonging to prompt 0, and so on. -> ([N, T] log-probs, [N, T] mask)."""
    device, pad = prompts["input_ids"].device, 0  # padding is masked out: any id but an image token
    B, P = prompts["input_ids"].shape
    T = max(len(c) for c in completions)
    comp = torch.full((len(completions), T), pad, dtype=torch.long)
    mask = torch.zeros((len(completions), T))
    for i, c in enumerate(completions):
        comp[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), 1.0
    comp, mask = comp.to(device), mask.to(device)
    idx = torch.arange(B, device=device).repeat_interleave(per_prompt)
    seq = {"input_ids": torch.cat([prompts["input_ids"][idx], comp], 1),                 # [N, P+T]
           "attention_mask": torch.cat([prompts["attention_mask"][idx], mask.long()], 1),
           "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"][idx], torch.zeros_like(comp)], 1)}
    if model.is_activation_checkpointing and model.training:
        # checkpointed layers drop a key/value cache, so each sequence carries its prompt
        feats = model.model.get_image_features(prompts["pixel_values"], prompts["image_grid_thw"]).pooler_output
        feats = BaseModelOutputWithPooling(pooler_output=tuple(feats[i] for i in idx.tolist()))
        hidden = model.model(**seq, image_grid_thw=prompts["image_grid_thw"][idx], mm_encoder_outputs={"image": feats},
                             use_cache=False).last_hidden_state[:, -T - 1:-1]   # [N, T, H]
        return chunked_logprobs(model.lm_head, hidden, comp, mask), mask
    # The image and the prompt go through the model once per prompt; the per_prompt
    # completions continue from its keys and values, repeated, and backward sums their
    # gradients into it. Same numbers as running every sequence whole, far fewer tokens.
    text = {k: prompts[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = model.model(**text, pixel_values=prompts["pixel_values"], image_grid_thw=prompts["image_grid_thw"],
                      use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(per_prompt)
    # the completions' M-RoPE positions: the whole sequences' positions, past the prompt
    positions, _ = model.model.get_rope_index(seq["input_ids"], seq["mm_token_type_ids"],
                                              prompts["image_grid_thw"][idx], attention_mask=seq["attention_mask"])
    hidden = model.model(input_ids=comp, attention_mask=seq["attention_mask"], position_ids=positions[..., P:],
                         past_key_values=cache, use_cache=True).last_hidden_state       # [N, T, H]
    # the state that predicts completion token t: the prompt's last for t = 0, then token t-1's
    hidden = torch.cat([out.last_hidden_state[idx, -1:], hidden[:, :-1]], 1)             # [N, T, H]
    return chunked_logprobs(model.lm_head, hidden, comp, mask), mask


# -----------------------------------------------------------------------------
# One step

class Groups(NamedTuple):
    """One step's groups, flattened: each prompt's G rollouts, then (ViSurf) its label."""
    prompts: dict               # the step's prompts, encoded once (encode_prompts)
    completions: list           # N token lists, per_prompt consecutive ones for each prompt
    advantages: torch.Tensor    # [N]
    per_prompt: int             # G + 1 (visurf), G (grpo) or 1 (sft)
    stats: dict                 # the step's metrics so far


def make_groups(model, processor, samples, conv, args, ddp=None):
    """Steps 1-5: rollouts, the label as member G+1, rewards, the three rules, advantages."""
    tok, device = processor.tokenizer, model.device
    prompts = encode_prompts(processor, samples, conv, device)
    eos, G = tok.convert_tokens_to_ids(END_OF_TURN), args.group_size
    # rule 1: y written as a rollout writes its answer (with the rule off: as the dataset does)
    y_texts = [data.gt_completion(s, conv, align="align" not in args.ablate) for s in samples]
    ys = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in y_texts]
    stats = {"t_generate": 0.0, "gen_tokens": 0}
    if args.mode != "grpo":  # the label is trained on: its length, end token included
        stats["gt_length"] = float(np.mean([len(y) for y in ys]))
    if args.mode == "sft":
        return Groups(prompts, ys, torch.ones(len(samples)), 1, stats)
    t = time.time()
    model.eval()  # in train mode, gradient checkpointing would switch off the KV cache
    with torch.no_grad(), autocast(args, device), whole_weights(ddp):
        rollouts = generate(model, processor, prompts, G, args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                            kv_cache=args.kv_cache, dtype=compute_dtype(args, device))
    stats["t_generate"], stats["gen_tokens"] = time.time() - t, sum(map(len, rollouts))
    # truncated: no end token, so the rollout ran into --max-new-tokens (TRL's completions/clipped_ratio)
    ends = set(end_ids(tok))
    stats.update(completion_length=stats["gen_tokens"] / len(rollouts),
                 truncated=float(np.mean([c[-1] not in ends for c in rollouts])))
    t, giou = time.time(), args.grounding_reward == "giou"
    completions, advantages, parts_all, r_ys, fired, A_ys = [], [], [], [], [], []
    for b, s in enumerate(samples):
        answer = data.model_answer(s, conv)
        group = rollouts[b * G:(b + 1) * G]
        parts = [data.score(s, tok.decode(c, skip_special_tokens=True), answer, giou) for c in group]
        r = [total_reward(p, args.think_weight) for p in parts]                 # G rewards
        parts_all += parts
        if args.mode == "visurf":  # step 2: y joins its group as member G+1, with rules 2 and 3
            r_y, f = gt_reward(data.score(s, y_texts[b], answer, giou), parts, args.think_weight, args.ablate)
            group, r = group + [ys[b]], r + [r_y]
            r_ys.append(r_y)
            fired.append(f)
        A = group_advantages(r)                                                  # [G + 1] or [G]
        if args.mode == "visurf":
            A_y = float(A[-1])  # the label's advantage: how hard this group pulls the policy toward y
            A_ys.append(A_y)
        completions += group
        advantages.append(A)
    stats["t_score"] = time.time() - t
    totals = [total_reward(p, args.think_weight) for p in parts_all]
    stats.update(reward=float(np.mean(totals)), reward_std=float(np.std(totals)),
                 reward_think=float(np.mean([p["think"] for p in parts_all])),
                 reward_answer=float(np.mean([answer_reward(p) for p in parts_all])),
                 **{f"reward_{k}": float(np.mean([p[k] for p in parts_all])) for k in parts_all[0] if k != "think"})
    if args.mode == "visurf":
        stats.update(gt_reward=float(np.mean(r_ys)), gt_smoothed=float(np.mean(fired)),
                     gt_advantage=float(np.mean(A_ys)))
    return Groups(prompts, completions, torch.cat(advantages), G + 1 if args.mode == "visurf" else G, stats)


def update(model, optimizer, prompts, completions, adv, per, args, ref_model=None, ddp=None):
    """Step 6: the clipped policy-gradient loss over every sequence (the label's SFT
    loss alone in --mode sft), in micro-batches of whole groups, then AdamW. Under
    torchrun, `ddp` wraps the log-probabilities and averages gradients over processes."""
    B, device = prompts["input_ids"].shape[0], model.device
    adv = adv.to(device)
    # the loss is a sum over micro-batches (and processes); its denominators count the
    # whole batch, so any split of the batch gives the same gradient
    n_seqs, n_tokens = all_sum([len(completions), sum(map(len, completions))])
    logprobs = ddp or (lambda *a: token_logprobs(model, *a))
    mb = args.micro_batch or B
    old, ref, loss_total, t_fb, t_opt, skipped = {}, {}, 0.0, 0.0, 0.0, 0
    n_clipped, n_counted = 0.0, 0.0  # completion tokens whose ratio was clipped, over every epoch
    model.train()
    for epoch in range(args.ppo_epochs):
        t, loss_epoch = time.time(), 0.0
        for b0 in range(0, B, mb):
            b1 = min(B, b0 + mb)
            rows = slice(b0 * per, b1 * per)
            sub = select_prompts(prompts, torch.arange(b0, b1, device=device))
            # DDP averages gradients once, in the last micro-batch's backward; FSDP reduce-scatters
            # each one's (keeping whole gradients until the last would undo the sharding)
            sync = b1 == B or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with autocast(args, device):
                    logp, mask = logprobs(sub, completions[rows], per)
                    if args.mode == "sft":
                        per_token = -logp                                 # [N, T]
                    else:
                        # pi_old: the policy that sampled, i.e. this one before the first update
                        old.setdefault(b0, logp.detach())
                        if args.beta > 0 and b0 not in ref:  # the reference is frozen: once per batch
                            with torch.no_grad(), adapters_off(ref_model):
                                ref[b0] = token_logprobs(ref_model, sub, completions[rows], per)[0]
                        per_token = policy_loss(logp, old[b0], adv[rows], args.clip_eps, args.clip_eps_high,
                                                ref.get(b0), args.beta)
                        n_clipped += float((clipped(logp.detach(), old[b0], adv[rows], args.clip_eps,
                                                    args.clip_eps_high) * mask).sum())
                        n_counted += float(mask.sum())
                    # DDP averages over processes what must be summed: scale by their number
                    loss = aggregate(per_token, mask, args.loss_agg, n_seqs, n_tokens) * world_size()
                loss.backward()
            loss_epoch += loss.item()  # this process's share, times the processes
        t_fb += time.time() - t
        t = time.time()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        # a non-finite loss or gradient (a diverging policy, a kernel's NaN) never reaches the
        # weights; every process decides alike (DDP's gradients are already the same everywhere)
        if all_sum([float(math.isfinite(loss_epoch) and math.isfinite(grad_norm))])[0] == world_size():
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)  # freed now, not kept through the next generation
        loss_total += loss_epoch / args.ppo_epochs
        t_opt += time.time() - t
    return dict(loss=loss_total, grad_norm=float(grad_norm), t_forward_backward=t_fb, t_optimizer=t_opt,
                sequences=len(completions), skipped=skipped, **({"clip_frac": n_clipped / n_counted} if n_counted else {}))


def train_step(model, processor, optimizer, samples, conv, args, ref_model=None, ddp=None):
    """One step of ViSurf (or GRPO, or SFT): make_groups, then update. -> the step's metrics"""
    t0 = time.time()
    groups = make_groups(model, processor, samples, conv, args, ddp)
    stats = dict(groups.stats, **update(model, optimizer, *groups[:4], args, ref_model, ddp))
    stats["seconds"] = time.time() - t0
    stats["gen_tokens_per_s"] = stats["gen_tokens"] / stats["t_generate"] if stats["t_generate"] else 0.0
    return stats


# -----------------------------------------------------------------------------
# The training loop, and the evaluation (SPEC §5: greedy, the prompts and coordinates of training)

def batch_for_step(n, batch_size, seed, step):
    """Sample indices for a step: each epoch a fresh permutation from the seed, so the
    data order depends on (seed, step) alone and resuming needs no sampler state."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        out.append(np.random.default_rng([seed, epoch]).permutation(n)[pos])
    return out


def train(model, processor, optimizer, train_set, conv, args, run, stop, ref_model=None, ddp=None):
    """Steps run.start+1 .. --steps: each a batch of prompts (this process's share of it under
    torchrun), one train_step, then what the run keeps of it (metrics, evaluations and
    checkpoints: Part II's Run). `stop` fills on Ctrl-C or SIGTERM: the step ends first.
    -> (the last step, the RNG state that the next step would find)"""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    step, rng = run.start, rng_state()
    while step < args.steps and not stop:
        lr = args.lr * min(1.0, (step + 1) / (args.warmup_steps + 1))  # linear warm-up, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr
        samples = [train_set[i] for i in batch_for_step(len(train_set), args.batch_size, args.seed, step)]
        share = len(samples) // world  # whole groups: this process's prompts of the step
        m = train_step(model, processor, optimizer, samples[rank * share:(rank + 1) * share], conv, args,
                       ref_model, ddp)
        step, rng = step + 1, rng_state()  # the RNG as the next step will find it: what a resume restores
        run.log_step(step, lr, m)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            run.evaluate(step)
        if step % args.save_every == 0 and step < args.steps:
            run.save(step, rng)
    return step, rng


def evaluate(model, processor, samples, conv, args, info=None, out_dir=None):
    """Greedy, batched decoding of every held-out prompt, then its task's metrics."""
    tok, device = processor.tokenizer, model.device
    model.eval()
    texts, rows = [], min(args.eval_batch_size, len(samples))
    for i in range(0, len(samples), rows):
        batch = samples[i:i + rows]
        # the last batch is filled up with its own last prompt: every batch has one shape,
        # so a compiled decode step is not compiled again for the remainder
        prompts = encode_prompts(processor, batch + batch[-1:] * (rows - len(batch)), conv, device)
        with torch.no_grad(), autocast(args, device):
            outputs = generate(model, processor, prompts, 1, args.max_new_tokens, greedy=True, kv_cache=args.kv_cache,
                               dtype=compute_dtype(args, device))
        texts += [tok.decode(c, skip_special_tokens=True) for c in outputs[:len(batch)]]
    return eval_metrics(samples, texts, conv, info, out_dir), texts


def eval_metrics(samples, texts, conv, info=None, out_dir=None):
    """The task's metrics of model outputs `texts` (data.TASKS). A parse failure counts as wrong."""
    task = data.task_of(samples[0])
    answers = [rewards.extract_answer(t) for t in texts]
    return dict(task.metrics(samples, answers, conv, info, out_dir), task=samples[0]["task"], n=len(samples))


def headline(result):
    """The numbers an evaluation is judged by, as a line: its task's headline metrics."""
    keys = list(data.TASKS[result["task"]].headline) + ["parse_failure_rate"]
    return ", ".join(f"{k} {result[k]:.3f}" for k in keys)


# -----------------------------------------------------------------------------
# What a first reading can skip: how decoding ends, the static cache, the LM head's
# memory-saving backward, and attention rows that padding leaves empty

END_OF_TURN = "<|im_end|>"  # ends every completion, the label's too (a base model's eos may differ)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def end_ids(tok):
    """A completion ends at <|im_end|> (chat models) or <|endoftext|> (base models)."""
    return tok.convert_tokens_to_ids([END_OF_TURN, "<|endoftext|>"])


def generation_config(tok, max_new_tokens, greedy=False, min_new_tokens=0, compile=False):
    """Every knob set, so nothing comes from a checkpoint's own config: Qwen2-VL ships
    top_k=1, which would make all G samples identical and the loss sit at 0."""
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, repetition_penalty=1.0,
                              eos_token_id=end_ids(tok), pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                              # a young model samples vision tokens, which break the next forward
                              suppress_tokens=tok.convert_tokens_to_ids(VISION_TOKENS),
                              # a diverging policy's inf/NaN logits would crash sampling; the step that
                              # follows is then non-finite and skipped (update)
                              remove_invalid_values=True, disable_compile=not compile, **sampling)
    if compile:  # transformers compiles decoding with a static cache on CUDA; on any device when asked
        config.compile_config = CompileConfig()
        config.compile_config._compile_all_devices = True
    return config


class OneDtypeLayer(StaticLayer):
    """A static cache layer that keeps keys and values in one dtype. Under bf16 autocast a
    prefill's keys and values come out fp32 (Qwen2-VL's rotary tables are fp32), a decode
    step's keys fp32 and its values bf16, and StaticLayer's index_copy_ refuses a mix."""

    def update(self, keys, values, *args, **kwargs):
        if self.is_initialized:
            keys, values = keys.to(self.dtype), values.to(self.dtype)
        return super().update(keys, values, *args, **kwargs)


STATIC_CACHES = weakref.WeakKeyDictionary()  # model -> {rows: its static cache}; gone with the model


def static_cache(model, prefilled, needed, dtype):
    """The prefilled dynamic cache copied into the static cache kept for this batch shape.
    One cache per number of rows, reset and refilled on every call, never re-allocated
    while it is long enough: a compiled decode step is specialised to the cache's shape,
    and CUDA graphs to its addresses. Lengths come in whole blocks of 256, so a longer
    prompt re-allocates (and recompiles) only when it crosses a block."""
    rows = prefilled.layers[0].keys.shape[0]
    caches = STATIC_CACHES.setdefault(model, {})
    cache = caches.get(rows)
    if cache is None or cache.layers[0].max_cache_len < needed or cache.layers[0].dtype != dtype:
        length = -(-needed // 256) * 256
        cache = caches[rows] = Cache(layers=[OneDtypeLayer(max_cache_len=length) for _ in prefilled.layers])
    cache.reset()
    for layer, filled in zip(cache.layers, prefilled.layers):
        layer.update(filled.keys.to(dtype), filled.values.to(dtype))
    return cache


class LMHeadLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[targets] in fp32, [n, H] -> [n]: the LM head, its
    log-softmax and the gather in one, for the backward's memory. Autograd's own backward
    holds four [n, vocab] tensors at once (logits, their exponentials, a scattered
    one-hot, the sum) and hands the weight a transposed view, which autograd cannot add
    Qwen2-VL-2B's tied input embedding's gradient into in place (one [vocab, H] copy more,
    0.9 GB in fp32). This one writes the logits' gradient over the saved logits and returns
    a contiguous weight gradient."""
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        # the products in bf16 under autocast, backward's too: autograd runs backward outside
        # the autocast region, so backward re-enters it (torch.amp.custom_bwd does that for one
        # device type fixed in advance; this works the same on CPU and CUDA)
        kind = hidden.device.type
        ctx.amp = dict(device_type=kind, enabled=torch.is_autocast_enabled(kind), dtype=torch.get_autocast_dtype(kind))
        logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))    # [n, V]
        lse = logits.logsumexp(-1)                                                            # [n]
        ctx.save_for_backward(hidden, weight, targets, logits, lse)
        return logits.gather(-1, targets[..., None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, g):
        hidden, weight, targets, logits, lse = ctx.saved_tensors
        d = logits.sub_(lse[..., None]).exp_().mul_(-g[..., None])   # -g * softmax, in the logits' place
        d = d.scatter_add_(-1, targets[..., None], g[..., None]).to(hidden.dtype)  # + g at the target
        with torch.autocast(**ctx.amp):  # a frozen weight (--lora) gets no [V, H] gradient
            return d @ weight, d.T @ hidden if ctx.needs_input_grad[1] else None, None  # [n, H], [V, H]


def chunked_logprobs(lm_head, hidden, targets, mask, budget=2**30):
    """log_softmax(lm_head(hidden))[targets] where mask is 1, and 0 at padding: [N, T, H] ->
    [N, T]. Only the completions' own positions go through the vocabulary, not the padding
    after the shorter ones (a group's lengths differ, the label's most of all). Their fp32
    logits are made at once when they fit in `budget` bytes; otherwise a few positions at a
    time, recomputed in the backward pass, so no [positions, vocab] tensor of a real model lives."""
    def piece(h, t):
        return LMHeadLogprobs.apply(h, lm_head.weight, t)  # Qwen's LM heads have no bias
    keep = mask.bool()                                             # [N, T]
    h, t = hidden[keep], targets[keep]                             # [n, H], [n]
    rows = max(1, budget // (lm_head.out_features * 4))            # positions per piece
    if rows >= len(t) or not torch.is_grad_enabled():
        logp = torch.cat([piece(h[i:i + rows], t[i:i + rows]) for i in range(0, len(t), rows)])
    else:
        logp = torch.cat([checkpoint(piece, h[i:i + rows], t[i:i + rows], use_reentrant=False)
                          for i in range(0, len(t), rows)])       # [n]
    return logp.new_zeros(keep.shape).masked_scatter(keep, logp)


def padding_safe_attention():
    """No attention row without a key. A left-padding position attends to nothing; SDPA
    backends differ on such a row (0, or NaN), and a NaN there reaches every row through
    the next layer's values. Every fully masked row is let see all keys instead: its output
    is never used (padding is masked out of the loss, and no real token attends to it).
    transformers 5 no longer does this itself. Registered once, for the SDPA masks."""
    def mask(*args, **kwargs):
        m = sdpa_mask(*args, **kwargs)                         # [B, 1, Q, K] bool, or None
        return m if m is None else m | ~m.any(-1, keepdim=True)
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", mask)
    # cuDNN's SDPA returns NaN gradients with a mask at some lengths on H100/H200
    # (pytorch/pytorch#196678, huggingface/trl#7181): flash or memory-efficient attention
    # run instead. A setter only, so the same line runs on CPU.
    torch.backends.cuda.enable_cudnn_sdp(False)


# =============================================================================
# Part II: Running it. Flags, models, LoRA, precision, checkpoints and resume, several
# processes, the output folder, logging and the picture, then the command itself.
# A reader who stops here has read all of ViSurf.
# =============================================================================
# Flags, and their checks

RULES = ("align", "think", "smooth")
LAUNCHER = os.getppid()  # read at import: under torchrun, the launcher (die_with_launcher)
# flags a resumed run may change; any other change makes the continuation a different run
SAFE_TO_CHANGE = {"steps", "save_every", "eval_every", "eval_batch_size", "eval_limit", "eval_data", "eval_images",
                  "output_dir", "resume", "overwrite", "device", "micro_batch", "gradient_checkpointing", "skip_bad",
                  "kv_cache", "precision", "report_to"}
TINY_DEFAULTS = dict(steps=300, batch_size=8, lr=5e-4)  # max_new_tokens: from the labels
REAL_DEFAULTS = dict(steps=200, batch_size=2, lr=1e-6, max_new_tokens=256)  # Visual-RFT's scale
DIVERGED = 5  # this many non-finite steps in a row stop a run
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# --lora's default modules: every linear layer of the language model; the vision tower has none
LORA_MODULES = r".*language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


class Help(argparse.HelpFormatter):
    """--help gives every default: argparse's own, or the flag's help in words."""
    def _get_help_string(self, action):
        known = any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in (action.help or "")
        return action.help if known else f"{action.help} (default: %(default)s)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ViSurf / GRPO / SFT for Qwen2-VL and Qwen2.5-VL, one file.",
                                formatter_class=Help)
    p.error = lambda msg: die(msg)  # one line, exit status 2
    g = p.add_argument_group("algorithm")
    g.add_argument("--mode", default="visurf", choices=["visurf", "grpo", "sft"], help="what trains")
    g.add_argument("--ablate", default="", help=f"rules to switch off, any of {','.join(RULES)} (default: none)")
    g.add_argument("--group-size", type=int, default=8, metavar="G", help="rollouts per prompt")
    g.add_argument("--think-weight", type=float, default=1 / 3, help="w in the reward w*think + answer, every "
                   "mode (default: 1/3, the ViSurf authors' ratio; 1 is Visual-RFT's plain sum)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="ratio clip")
    g.add_argument("--clip-eps-high", type=float, help="upper ratio clip, DAPO's clip-higher (default: --clip-eps); "
                   "acts only when ratios move away from 1, i.e. with --ppo-epochs above 1")
    g.add_argument("--loss-agg", default="sum", choices=["sum", "token-mean", "seq-mean-token-mean"],
                   help="sum: token losses summed, / sequences (the paper's Eq. 8); token-mean: / completion "
                   "tokens (DAPO, veRL, TRL); seq-mean-token-mean: per sequence, then over sequences (Visual-RFT)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="updates per batch of rollouts; above 1 the "
                   "per-token ratio departs from the paper's sequence-level ratio")
    g.add_argument("--beta", type=float, default=0.0, help="KL weight; > 0 loads a reference model")
    g.add_argument("--grounding-reward", default="iou", choices=["iou", "giou"], help="giou: (GIoU + 1) / 2")
    g.add_argument("--max-new-tokens", type=int, help=f"default: tiny: the longest label + 4, "
                   f"else {REAL_DEFAULTS['max_new_tokens']}")
    g.add_argument("--min-new-tokens", type=int, default=0, help="force this many tokens per rollout (benchmarks)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="'tiny' (random, built in code), a hub id or a local path")
    g.add_argument("--freeze-vision", action="store_true", help="train the language model only")
    g.add_argument("--lora", type=int, metavar="R", help="train rank-R LoRA adapters (needs peft), the other "
                   "weights frozen in the compute dtype (default: none, every weight trains)")
    g.add_argument("--lora-alpha", type=float, help="the adapters' update is scaled by alpha/R (default: 2R)")
    g.add_argument("--lora-modules", help="regex (peft's, matching a module's whole name) "
                   "of the Linear layers that get adapters (default: the language model's q/k/v/o/gate/up/down)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--max-pixels", type=int, default=data.MAX_PIXELS, help="per image (default: 512*28*28)")
    g.add_argument("--min-pixels", type=int, default=data.MIN_PIXELS, help="per image (default: 56*56)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="records (.json/.jsonl), COCO/LVIS JSON, a class-folder tree, or Visual-RFT's "
                   "parquet / save_to_disk data (default: the built-in synthetic task)")
    g.add_argument("--images", help="image folder (COCO/LVIS) (default: next to --data)")
    g.add_argument("--task", default="classification", choices=list(data.TASKS), help="the built-in synthetic task")
    g.add_argument("--categories", help="comma-separated categories (COCO/LVIS) or class list (default: all)")
    g.add_argument("--shots", type=int, help="keep K images per category / class (default: all; synthetic: 64)")
    g.add_argument("--negatives", type=float, default=0.0, help="'No Objects' prompts per positive one")
    g.add_argument("--skip-bad", action="store_true", help="warn about bad records and carry on")
    g.add_argument("--eval-data", help="held-out set for --eval-every and the before/after numbers")
    g.add_argument("--eval-images", help="image folder for --eval-data")
    g.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out prompts only (default: all)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"default: tiny: {TINY_DEFAULTS['steps']}, else {REAL_DEFAULTS['steps']}")
    g.add_argument("--batch-size", type=int, help=f"prompts per step (default: tiny: {TINY_DEFAULTS['batch_size']}, "
                   f"else {REAL_DEFAULTS['batch_size']})")
    g.add_argument("--micro-batch", type=int, help="prompts (whole groups) per forward/backward (default: all)")
    g.add_argument("--lr", type=float, help=f"default: tiny: {TINY_DEFAULTS['lr']}, else {REAL_DEFAULTS['lr']}")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then constant")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--precision", choices=["bf16", "fp32"], help="bf16: bf16 autocast over fp32 master weights "
                   "(default: bf16 on CUDA, fp32 on CPU; bf16 on CPU is how the tests run a GPU's arithmetic)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW state "
                   "over the processes (FSDP2) (default: each process holds them whole, DDP)")
    g.add_argument("--kv-cache", default="auto", choices=["auto", "dynamic", "static", "compiled"],
                   help="decoding's key/value cache: dynamic (grows), static (preallocated), compiled (static, the "
                   "decode step compiled by transformers); auto: static on CUDA, else dynamic")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", help="metrics.jsonl, checkpoint/, eval.json (default: runs/default; with "
                   "--resume, the checkpoint's own run folder)")
    g.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations; 0: before and "
                   "after only")
    g.add_argument("--eval-batch-size", type=int, default=16, help="prompts per greedy batch")
    g.add_argument("--eval", action="store_true", help="evaluate --model on --data (or the synthetic held-out set)")
    g.add_argument("--resume", help="a checkpoint folder written by visurf.py")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a run")
    g.add_argument("--seed", type=int, default=0, help="model init, data choice and order, sampling")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"],
                   help="also send metrics.jsonl's numbers to TensorBoard (OUT/tensorboard) or wandb")
    g.add_argument("--plot", metavar="OUT", help="redraw OUT/curves.png from OUT/metrics.jsonl and exit")
    return check_flags(p.parse_args(argv))


def check_flags(args):
    """Every flag checked, and the defaults that depend on others filled in, before anything
    loads: one line and exit status 2 for the first problem. "not x > 0" also refuses NaN."""
    # the checkpoint carries the tiny mark too (or, after a kill mid-save, the copy heal_checkpoint will take)
    tiny = is_tiny(args.model) or bool(args.resume) and any(
        is_tiny(saved_checkpoint(args.resume) + s) for s in ("", ".tmp", ".old"))
    for k, v in (TINY_DEFAULTS if tiny else REAL_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.ablate = [r.strip() for r in args.ablate.split(",") if r.strip()]
    if args.output_dir is None:  # a resumed run continues in its own folder, not in a second one
        args.output_dir = (os.path.dirname(saved_checkpoint(args.resume)) or ".") if args.resume else "runs/default"
    if args.clip_eps_high is None:  # symmetric clipping unless asked otherwise
        args.clip_eps_high = args.clip_eps
    if args.lora and not args.resume:  # a resume takes the saved ones (load_trainer_state)
        args.lora_alpha = 2.0 * args.lora if args.lora_alpha is None else args.lora_alpha  # 2R: the common choice
        args.lora_modules = args.lora_modules or LORA_MODULES
    at_least = dict(steps=1, batch_size=1, max_new_tokens=1, ppo_epochs=1, save_every=1, eval_batch_size=1,
                    micro_batch=1, shots=1, eval_limit=1, eval_every=0, warmup_steps=0, min_new_tokens=0,
                    seed=0, min_pixels=28 * 28, lora=1)
    for k, lo in at_least.items():
        if getattr(args, k) is not None and getattr(args, k) < lo:
            die(f"--{k.replace('_', '-')} must be at least {lo} (got {getattr(args, k)})")
    for k in ("lr", "clip_eps", "grad_clip", "clip_eps_high", "lora_alpha", "beta", "negatives", "weight_decay",
              "think_weight"):
        v, positive = getattr(args, k), k in ("lr", "clip_eps", "grad_clip", "clip_eps_high", "lora_alpha")
        if v is not None and not (0 < v < math.inf if positive else 0 <= v < math.inf):
            die(f"--{k.replace('_', '-')} must be a {'positive' if positive else 'non-negative'} number (got {v})")
        if v is not None and v > FLOAT32_MAX / 2:  # the step computes in float32: 1 + eps, alpha * B A, lr * ...
            die(f"--{k.replace('_', '-')} must be below {FLOAT32_MAX / 2:.3g}, what float32 holds (got {v})")
    problem = next((msg for bad, msg in [
        (any(r not in RULES for r in args.ablate), f"--ablate: unknown rule {next((r for r in args.ablate if r not in RULES), '')!r} (choose from {', '.join(RULES)})"),
        (args.ablate and args.mode != "visurf", "--ablate switches off ViSurf's rules, so it needs --mode visurf"),
        (args.group_size < (2 if args.mode == "grpo" else 1),
         "--group-size must be at least 2 for grpo (the advantage needs a spread) and 1 otherwise"),
        (args.beta > 0 and args.mode == "sft", "--beta is a policy-gradient option; --mode sft has no KL term"),
        (args.seed >= 2**31, f"--seed must be below 2^31 (got {args.seed})"),
        (args.clip_eps >= 1, f"--clip-eps must be below 1 (got {args.clip_eps})"),
        # larger weights overflow the advantages' arithmetic long before they mean anything
        (args.think_weight > 100, f"--think-weight must be at most 100 (got {args.think_weight})"),
        (args.resume and args.overwrite, "--resume continues a run and --overwrite starts one afresh: pass one of them"),
        (args.max_pixels < args.min_pixels, f"--max-pixels ({args.max_pixels}) is below --min-pixels ({args.min_pixels})"),
        (args.max_new_tokens is not None and args.min_new_tokens > args.max_new_tokens,
         f"--min-new-tokens ({args.min_new_tokens}) is above --max-new-tokens ({args.max_new_tokens})"),
        (args.eval_data and not args.data, "--eval-data goes with --data (the synthetic task brings its own held-out set)"),
        (args.eval_images and not args.eval_data, "--eval-images goes with --eval-data"),
        (args.fsdp and "RANK" not in os.environ, "--fsdp shards the model over processes: start it with torchrun, "
                                                 "e.g. torchrun --nproc_per_node 2 visurf.py --fsdp ..."),
        (args.lora is None and not args.resume and (args.lora_alpha is not None or args.lora_modules is not None),
         "--lora-alpha and --lora-modules go with --lora"),
        (args.lora and args.eval, "--eval reads a checkpoint, whose adapters are merged in: --eval --model "
                                  "OUT/checkpoint, without --lora"),
        (args.lora and importlib.util.find_spec("peft") is None, "--lora needs peft: pip install peft"),
        # an adapter's weights are small; what is large is frozen, and DDP replicates it
        (args.lora and args.fsdp, "--lora with --fsdp is not supported: adapters are trained on DDP (drop --fsdp)"),
    ] if bad), None)
    if problem:
        die(problem)
    try:
        re.compile(args.lora_modules or "")
    except re.error as e:
        die(f"--lora-modules {args.lora_modules!r}: not a regular expression ({e})")
    if args.device:
        check_device(args.device)
    return args


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"--device {name}: not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        die(f"--device {name}: no such CUDA device here")
    if device.type not in ("cpu", "cuda"):
        die(f"--device {name}: visurf runs on cpu or cuda")


def die(msg, code=2):
    # under torchrun every process checks the same flags, files and checkpoint: the first
    # process of each machine says so (a machine's own copy of a file may differ); an error
    # while training (status 1) may be one process's own, so then every process says its own
    if code == 1 or os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def one_line(e):
    """An exception as one line: its message's first line, or its type."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def saved_checkpoint(path):
    """The checkpoint folder `path` names. OUT/checkpoint.old and OUT/checkpoint.tmp are
    what a kill in the middle of a save leaves: heal_checkpoint makes one OUT/checkpoint."""
    path = path.rstrip("/" + os.sep) or path
    if os.path.basename(path) in ("checkpoint.old", "checkpoint.tmp"):
        return path[:-4]
    return path


def is_tiny(model):
    """'tiny', or a checkpoint trained from it (its config.json says so): both take the tiny
    defaults, so SFT -> RLVR on the tiny model repeats no flags."""
    if model == "tiny":
        return True
    try:
        with open(os.path.join(model, "config.json")) as f:
            return json.load(f).get("visurf_tiny") is True
    except (OSError, ValueError, AttributeError):  # a hub id, or no model at all (load_model says so)
        return False


# -----------------------------------------------------------------------------
# Models: the tiny random Qwen2-VL, or any Qwen2-VL / Qwen2.5-VL checkpoint

# Qwen2-VL's own chat template (image part), used by the tiny model and as a fallback.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>"]


class ImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video half, which would need torchvision (SPEC §6).
    Works for Qwen2.5-VL too: same image processor, same image tokens."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_tiny(seed):
    """A random Qwen2-VL (~0.3M parameters) with a BPE tokenizer trained on the
    synthetic task's text, Qwen2-VL's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    conv = data.Convention("qwen2_vl", data.MIN_PIXELS, data.MAX_PIXELS)
    corpus = [data.prompt_text(s, conv) + " " + data.gt_completion(s, conv)
              for task, t in data.TASKS.items() if t.make for s in data.synthetic(task, 60, 0)]
    corpus += ["No Objects", " ".join(str(i) for i in range(1001)), "You are a helpful assistant."]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         bos_token_id=ids["<|endoftext|>"], tie_word_embeddings=True),
        # the vision width must equal the text width (SPEC §6)
        vision_config=dict(depth=1, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, visurf_tiny=True)  # saved in config.json: see is_tiny
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config), tok


def load_model(name, args):
    """-> (model, processor, coordinate convention). After this, tiny and real share every line."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import cached_file
    pixels = dict(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if name == "tiny":
        model, tok = build_tiny(args.seed)
        improc = Qwen2VLImageProcessorPil(**pixels)
        templates = [tok.chat_template]
    else:
        cached = dict(local_files_only=model_source(name))  # the hub unreachable: the cache only, no retries
        try:
            model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch.float32, **cached)
            tok = AutoTokenizer.from_pretrained(name, **cached)
            improc = Qwen2VLImageProcessorPil.from_pretrained(name, **pixels, **cached)
            # the processor's chat_template.json first: early Qwen2.5-VL releases (and
            # fine-tunes saved from them) carry a text-only template in tokenizer_config.json
            path = cached_file(name, "chat_template.json", _raise_exceptions_for_missing_entries=False, **cached)
            templates = [json.load(open(path))["chat_template"] if path else None, tok.chat_template]
        except Exception as e:  # a missing, partial or corrupt checkpoint: one line, no traceback
            die(f"cannot load model {name!r}: {one_line(e)}")
    padding_safe_attention()
    family = model.config.model_type
    if family not in data.COORDS:
        die(f"{name}: model type {family!r} is not Qwen2-VL or Qwen2.5-VL")
    tok.padding_side = "left"  # prompts are left-padded for generation
    processor = ImageOnlyProcessor(improc, tok, chat_template=vision_template(templates, tok, name))
    # replace the checkpoint's generation_config (Qwen2-VL: top_k 1; Qwen2.5-VL: repetition
    # penalty 1.05): transformers fills every knob generate() leaves unset from it. Ours is
    # greedy decoding as evaluated here, and it is what checkpoints save for plain generate().
    model.generation_config = generation_config(tok, args.max_new_tokens, greedy=True)
    return model, processor, data.Convention(family, args.min_pixels, args.max_pixels)


# what a model folder needs, each as the files any one of which will do
MODEL_FILES = {"config.json": [["config.json"]],
               "tokenizer files (tokenizer.json, or vocab.json and merges.txt)":
                   [["tokenizer.json"], ["vocab.json", "merges.txt"], ["tokenizer.model"]],
               "preprocessor_config.json": [["preprocessor_config.json"]]}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def model_source(name):
    """Check --model before transformers reads it (which takes a mistyped path for a hub id
    and retries an unreachable hub for half a minute): a folder must hold what loading
    needs; anything else must look like a hub id and be either on a hub that answers now
    or in the local cache. One line at once otherwise. -> whether to load from the cache only."""
    import huggingface_hub
    if os.path.isdir(name):
        missing = [what for what, options in MODEL_FILES.items()
                   if not any(all(os.path.isfile(os.path.join(name, f)) for f in files) for files in options)]
        if missing:
            die(f"{name}: not a complete model folder: no {', no '.join(missing)} "
                f"(copy what is missing from the model it was trained from)")
        return False
    if os.path.exists(name):
        die(f"--model {name}: a file, not a model folder")
    parent = os.path.dirname(name)
    if (not HUB_ID.fullmatch(name) or name.startswith(".") or (parent and os.path.isdir(parent))
            or os.sep != "/" and os.sep in name):
        die(f"--model {name}: no such folder")
    try:
        huggingface_hub.model_info(name, timeout=10)
        return False
    except huggingface_hub.errors.RepositoryNotFoundError:
        die(f"--model {name}: no such folder here, and no such model on the Hugging Face hub")
    except huggingface_hub.errors.HfHubHTTPError:
        return False  # gated, private, ...: from_pretrained says what it needs
    except Exception as e:  # no network, a proxy, HF_HUB_OFFLINE: the cache or nothing
        if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
            return True
        die(f"--model {name}: no such folder here, and the Hugging Face hub cannot be reached ({one_line(e)}); "
            f"download the model where there is a network (hf download {name} --local-dir DIR) and pass --model DIR")


def vision_template(templates, tok, name):
    """The first chat template that renders an image; Qwen2-VL's own if there is none at all."""
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    for t in filter(None, templates):
        try:
            if "<|image_pad|>" in tok.apply_chat_template(probe, chat_template=t, tokenize=False,
                                                          add_generation_prompt=True):
                return t
        except Exception:  # a text-only template fails on list content
            pass
    if any(templates):
        die(f"{name}: no chat template renders an image (chat_template.json missing, and the "
            f"tokenizer's template is text-only); add the model's chat_template.json")
    return CHAT_TEMPLATE


# -----------------------------------------------------------------------------
# Adapters (LoRA) and frozen weights: what trains, and the dtype the rest is held in

def add_adapters(model, args):
    """--lora R: peft's LoRA (scale alpha/R, no dropout) on the Linear layers --lora-modules
    matches, every other weight frozen. B starts at 0, so the adapted model starts as the
    base, exactly. The adapters are injected in place: `model` stays the Qwen2-VL model every
    line of the step calls (model.model, model.lm_head, generate), its Linear layers now LoRA
    layers; the PeftModel around it is returned beside it, for save_weights.
    A resumed run puts the checkpoint's adapter (peft's format) on the same base. The adapters
    are fp32 whatever the base's dtype. -> (model, the PeftModel); without --lora (model, None)."""
    if not args.lora:
        return model, None
    try:
        import peft  # the optional dependency, imported here only
    except ImportError:
        die("--lora needs peft: pip install peft")
    check_lora_targets(model, args)
    with warnings.catch_warnings():  # peft's own warnings: what it would warn of is refused above, in one line
        warnings.simplefilter("ignore")
        if args.resume:
            adapter = os.path.join(args.resume, "adapter")
            if not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
                die(f"--resume {args.resume}: no adapter/ in it (saved without --lora?)")
            wrapped = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            config = peft.LoraConfig(r=args.lora, lora_alpha=args.lora_alpha, target_modules=args.lora_modules,
                                     lora_dropout=0.0, bias="none")
            wrapped = peft.get_peft_model(model, config)
    for module in model.modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        # peft casts a bf16 input to the fp32 adapter's dtype, and autocast casts it back: the same
        # numbers, but one more saved copy of the input per adapter (q, k, v: three). Autocast alone.
        module.cast_input_dtype_enabled = False
    return model, wrapped


def check_lora_targets(model, args):
    """What --lora-modules matches (peft's rule: a module's whole name), refused in one line
    before peft sees it: nothing; the LM head (chunked_logprobs reads its weight directly, so an
    adapter there would be skipped); a layer that is not Linear; the vision tower under
    --freeze-vision (frozen adapters); a rank above a layer's width."""
    flag = f"--lora-modules {args.lora_modules!r}"
    matched = {n: m for n, m in model.named_modules() if n and re.fullmatch(args.lora_modules, n)}
    if not matched:
        die(f"{flag}: target modules not found (no module's whole name matches it)")
    for name, m in matched.items():
        if m is model.get_output_embeddings():
            die(f"{flag} matches {name}: adapters go on the Linear layers of the language model and the vision "
                f"tower, not on the LM head")
        if not isinstance(m, torch.nn.Linear):
            die(f"{flag} matches {name}, a {type(m).__name__}: adapters go on Linear layers only")
        if args.freeze_vision and name.startswith("model.visual."):
            die(f"{flag} matches {name}, in the vision tower, which --freeze-vision freezes: drop one of the two")
        if args.lora > min(m.in_features, m.out_features):
            die(f"--lora {args.lora} is above the width of {name} ({min(m.in_features, m.out_features)} features): "
                f"a rank-R adapter needs R at most a layer's smaller side")


def freeze(model, args, dtype):
    """--freeze-vision freezes the vision tower (--lora has frozen all but the adapters), and
    every frozen weight is then held in the compute dtype: under bf16 autocast every product
    casts it to bf16 anyway (the same numbers; norms and embeddings now read bf16-rounded
    weights), at half the memory, and a frozen weight takes no update for bf16 to round away.
    Trained weights stay fp32 masters; under fp32 nothing changes. The tied embedding and LM
    head are one parameter, cast once."""
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def reference_policy(model, args, device):
    """--beta > 0: the KL term's reference, the policy the run started from. With --lora, the
    policy itself with its adapters off (adapters_off), no second copy. Otherwise a frozen copy,
    held in the compute dtype as freeze holds every frozen weight; a resumed policy is the
    checkpoint, so the copy is then --model, loaded again."""
    if args.beta <= 0:
        return None
    if args.lora:
        return model
    ref = load_model(args.model, args)[0] if args.resume else copy.deepcopy(model)
    freeze(ref.eval().requires_grad_(False), args, compute_dtype(args, device))
    return ref.to(device)


@contextlib.contextmanager
def adapters_off(model):
    """The reference policy's context for --beta > 0: with --lora the reference is the policy
    itself with its adapters switched off (peft's enable_adapters on each LoRA layer), i.e. the
    base, and no second copy; otherwise it is a frozen copy, and there is nothing to do."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def all_finite(tensors):
    """Raise FloatingPointError naming the first of `tensors` ({name: tensor}) that is not finite."""
    bad = [k for k, t in tensors.items() if not torch.isfinite(t.detach()).all()]
    if bad:
        raise FloatingPointError(f"the weights are not finite ({bad[0]}"
                                 f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''})")


def save_weights(model, path, adapters=None):
    """save_pretrained's layout, loadable by from_pretrained without peft or visurf: the adapters
    merged (W + alpha/R * B A, each layer) into a plain fp32 copy, and bf16 frozen weights back
    in fp32; the training model keeps its adapters and dtypes. With --lora, also the adapter in
    peft's own format (`adapters`, add_adapters' PeftModel), in path/adapter (what --resume reads)."""
    if adapters is None and all(p.dtype == torch.float32 for p in model.parameters()):
        all_finite(dict(model.named_parameters()))
        return model.save_pretrained(path)  # plain already
    state, fp32 = {}, {}
    as_fp32 = lambda t: fp32.setdefault(id(t), t.detach().float().cpu())  # tied tensors stay one tensor
    for key, t in model.state_dict(keep_vars=True).items():  # the parameters themselves: ties share an id
        if ".lora_" in key:  # lora_A, lora_B: merged below
            continue
        name, _, leaf = key.rpartition(".base_layer.")  # name "": not an adapted layer's tensor
        if name and leaf == "weight":
            layer = model.get_submodule(name)
            state[f"{name}.weight"] = as_fp32(t) + sum(layer.get_delta_weight(a).float().cpu()
                                                       for a in layer.active_adapters)
        else:
            state[f"{name}.{leaf}" if name else leaf] = as_fp32(t)
    all_finite(state)  # a merge can overflow (alpha/R * B A) where the adapted model did not
    with torch.device("meta"):  # the plain architecture, no memory; the merged tensors go in
        plain = type(model)(copy.deepcopy(model.config))
    plain.load_state_dict(state, assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(path)
    if adapters is not None:
        adapters.save_pretrained(os.path.join(path, "adapter"))


# -----------------------------------------------------------------------------
# Precision: one setting, the same code on CPU and CUDA (the tests run a GPU's arithmetic)

def compute_dtype(args, device):
    """bf16 by default on CUDA, fp32 on CPU; --precision chooses."""
    return torch.bfloat16 if (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16" else torch.float32


def autocast(args, device):
    """bf16 compute over fp32 master weights: AdamW's 1e-6-sized updates survive, where
    bf16 weights (8 mantissa bits) would round most of them away. fp32: nothing to do."""
    dtype = compute_dtype(args, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# -----------------------------------------------------------------------------
# Data

def load_data(args):
    """-> (train samples, eval samples, eval info). A bad file is one line, before any model loads."""
    try:
        return read_data(args)
    except data.DataError as e:
        die(str(e))


def read_data(args):
    if args.data:
        train, info = data.load(args.data, args.images, args.categories, args.shots, args.negatives,
                                args.seed, args.skip_bad, split="eval" if args.eval else "train")
        if args.eval:
            held = train
        elif args.eval_data:
            held, info = data.load(args.eval_data, args.eval_images, args.categories, None, 0.0,
                                   args.seed, args.skip_bad, split="eval")
        else:
            held, info = [], {}
    else:
        shots = args.shots or 64
        train = data.synthetic(args.task, shots * len(data.COLOURS), args.seed, "train")
        held, info = data.synthetic(args.task, 192, args.seed, "eval"), {}
        if args.categories:  # a subset of the colours
            train, held = (data.restrict(x, args.categories.split(",")) for x in (train, held))
    return train, held[:args.eval_limit] if args.eval_limit else held, info


# -----------------------------------------------------------------------------
# Checkpoints: from_pretrained-loadable, plus everything needed to resume exactly

def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s["cuda"] is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def seeds(seed):
    """Model init, data choice and sampling: one seed for torch, Python and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def save_checkpoint(out_dir, model, processor, optimizer, step, rngs, args, lead=True, adapters=None):
    """Written in full beside the old one, then swapped in by two renames, so whatever
    instant a kill lands at, a complete checkpoint is left: `checkpoint`, or during the
    swap `checkpoint.old` and a complete `checkpoint.tmp` (heal_checkpoint takes it)."""
    path = os.path.join(out_dir, "checkpoint")
    tmp, old = path + ".tmp", path + ".old"
    if lead:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        whole = save_shards(tmp, model, optimizer)  # sharded (FSDP): every process writes its part first
        if not lead:  # under torchrun, one process writes the rest
            return path
        if whole is not None:  # sharded: the whole model, gathered, in fp32 (a frozen tower may be bf16)
            all_finite(whole)
            if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
                whole.pop("lm_head.weight")  # tied (2B): gathered as two tensors, saved once, as from_pretrained ties
            model.save_pretrained(tmp, state_dict={k: v.float() for k, v in whole.items()})
        else:
            save_weights(model, tmp, adapters)  # plain fp32, adapters merged; with --lora also tmp/adapter
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "chat_template.json"), "w") as f:  # what a processor reads
            json.dump({"chat_template": processor.chat_template}, f)
        config = os.path.join(tmp, "preprocessor_config.json")
        with open(config) as f:
            pre = json.load(f)
        with open(config, "w") as f:  # AutoProcessor reads the processor class from here
            json.dump(dict(pre, processor_class="Qwen2_5_VLProcessor" if model.config.model_type == "qwen2_5_vl"
                           else "Qwen2VLProcessor"), f, indent=1)
        # the trainer state last, and by a rename: its presence marks a complete checkpoint
        torch.save({"step": step, "optimizer": None if whole else optimizer.state_dict(), "rng": rngs,
                    "args": vars(args)},
                   os.path.join(tmp, "trainer_state.pt.part"))
        os.replace(os.path.join(tmp, "trainer_state.pt.part"), os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(old, ignore_errors=True)  # left by a kill during the last clean-up
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except Exception:  # a full disk, a quota: no half-written checkpoint.tmp is left to fill it
        with contextlib.suppress(OSError):
            if lead:
                heal_checkpoint(path)  # (and a failure inside the swap still leaves one complete checkpoint)
        raise
    return path


def heal_checkpoint(path):
    """Finish a save that a kill interrupted: if the swap left no `checkpoint`, the newest
    complete one of `.tmp` and `.old` takes its place; a partial `.tmp` is dropped."""
    complete = lambda p: os.path.isfile(os.path.join(p, "trainer_state.pt"))
    if not os.path.isdir(path):
        for candidate in (path + ".tmp", path + ".old"):
            if complete(candidate):
                os.replace(candidate, path)
                break
    shutil.rmtree(path + ".tmp", ignore_errors=True)


def load_trainer_state(path, args):
    """trainer_state.pt of a checkpoint, checked, and refused if the run's flags changed."""
    file = os.path.join(path, "trainer_state.pt")
    if not os.path.isfile(file):
        die(f"--resume {path}: not a visurf checkpoint (no trainer_state.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)  # not onto the GPU it was saved from
        assert isinstance(state, dict) and {"step", "optimizer", "rng", "args"} <= set(state)
    except Exception as e:
        die(f"{file}: unreadable or incomplete ({one_line(e)})")
    for k, v in state["args"].items():
        if k in vars(args) and getattr(args, k) is None and k not in SAFE_TO_CHANGE:
            setattr(args, k, v)  # a default derived at run time (the tiny model's --max-new-tokens)
        elif k not in SAFE_TO_CHANGE and k in vars(args) and getattr(args, k) != v:
            flag = "--" + k.replace("_", "-")
            die(f"--resume: this run had {flag} {v!r}, now {getattr(args, k)!r}; resume with the run's own "
                f"flags (--steps, --save-every, --eval-every and a few more may change: docs/outputs.md) "
                f"or start afresh in another --output-dir")
    return state


def metrics_record(line, n, path):
    """Line n of a metrics.jsonl, checked: a step's numbers, or an evaluation. ValueError naming
    the line otherwise (a damaged or foreign file)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: line {n} is not JSON") from None
    number = lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
    step = record.get("step") if isinstance(record, dict) else None
    values = record.get("eval", record) if isinstance(record, dict) else None
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0 and isinstance(values, dict) and all(
            number(v) or k == "task" and isinstance(v, str) or isinstance(v, dict) and "eval" in record
            and all(map(number, v.values())) for k, v in values.items())):
        raise ValueError(f"{path}: line {n} is not a visurf record")
    return record


def read_metrics(path, upto):
    """metrics.jsonl lines up to step `upto`: a resumed run drops the steps after its checkpoint,
    and a last line half-written by a kill is dropped with a warning."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            record = metrics_record(line, n, path)
        except ValueError as e:
            if n < len(lines) or "not JSON" not in str(e):
                die(f"{e}; fix or remove it before resuming")
            print(f"warning: {path}: dropped a half-written last line")
            continue
        if record["step"] <= upto:
            keep.append(line if line.endswith("\n") else line + "\n")
    return keep


# -----------------------------------------------------------------------------
# Several processes (torchrun): data parallel over whole groups, on PyTorch's DDP or FSDP2

class PolicyLogProbs(torch.nn.Module):
    """token_logprobs as a module's forward: what DistributedDataParallel wraps, so that
    every backward through it averages the gradients over the processes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prompts, completions, per_prompt):
        return token_logprobs(self.model, prompts, completions, per_prompt)


def check_processes(args):
    """Under torchrun, what one process cannot share, and what --fsdp needs of torch, refused
    before any process group forms: one line, each condition its own, from the lead; the others
    exit as quietly, with the same status (torchrun then adds its own summary of the failed
    processes)."""
    import torch.distributed.fsdp as fsdp
    world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1
    old_torch = args.fsdp and not hasattr(getattr(fsdp, "FSDPModule", None), "reset_iter_state")  # whole_weights'
    problem = ("--eval runs in one process: start it with python, not torchrun" if world > 1 and args.eval else
               f"--batch-size ({args.batch_size}) must be a multiple of the {world} processes under torchrun"
               if world > 1 and args.batch_size % world else
               f"--fsdp needs torch 2.13 or later (the version tested); this is torch {torch.__version__}"
               if old_torch else None)
    if problem:
        die(problem)


def shard(model, args):
    """FSDP2 (--fsdp): each decoder layer, each vision block, and the root module whose
    forward computes the log-probabilities hold 1/world of their weights, gradients and
    AdamW state; the root owns the rest (embeddings, the tied LM head, norms, the vision
    tower's patch embedding and merger), so the LM head's own autograd function reads its
    weight whole. bf16: FSDP's own policy (bf16 compute, fp32 master shards, fp32 gradient
    reduction). -> the root, which update() calls as it calls DDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if args.precision == "bf16" else MixedPrecisionPolicy())
    root = PolicyLogProbs(model)
    for block in [*model.model.language_model.layers, *model.model.visual.blocks]:
        fully_shard(block, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    # generate runs the layers before the root ever runs, and FSDP2 would take the first module
    # to run for its root: initialise the real one now (torch 2.13 has no public call for it)
    root._get_fsdp_state()._lazy_init()
    return root


@contextlib.contextmanager
def whole_weights(root):
    """Decoding with sharded weights (FSDP; `root` is what shard returned): gather every weight
    once for the whole call, not once per layer per token, then shard again. Collective: every
    process enters. Without sharding (root None, or DDP) there is nothing to do."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(root, FSDPModule):
        yield
        return
    groups = [m for m in root.modules() if isinstance(m, FSDPModule)]
    root.set_reshard_after_forward(False)
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        root.set_reshard_after_forward(True)
        root.set_reshard_after_forward(False, recurse=False)  # FSDP's default for a root
        for m in groups:
            m.reshard()
        # FSDP2 records the order its modules ran forward, even under no_grad, and the next
        # backward prefetches by it; only the lead decodes an evaluation, so forget this call's
        # order on every process, or their all-gathers no longer pair (a hang at the backward)
        root.reset_iter_state()


@contextlib.contextmanager
def plain_errors():
    """torch.distributed.checkpoint fails with one CheckpointException, a BaseException that no
    `except Exception` catches, holding each failed process's own error: raise the first of
    those instead (a full disk is then an OSError, as in any other save)."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except CheckpointException as e:
        raise next(iter(e.failures.values()))[0] from None


def save_shards(path, model, optimizer):
    """FSDP: every process's shard of the model and of AdamW's state into PATH/sharded
    (torch.distributed.checkpoint), and the whole model gathered for the lead process's
    save_pretrained. -> that state dict (None without sharding, or on the other processes)."""
    from torch.distributed.tensor import DTensor
    if not isinstance(next(model.parameters()), DTensor):  # not sharded
        return None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    barrier()  # the lead process has cleared PATH
    state = {"model": get_model_state_dict(model)}
    # AdamW has no state while every step so far was skipped (non-finite); asked for it, torch
    # would make one by a step at lr 0, and AdamW's bias correction would then count one step too many
    if optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with plain_errors():
        dcp.save(state, checkpoint_id=os.path.join(path, "sharded"))
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return whole if dist.get_rank() == 0 else None


def load_shards(path, model, optimizer):
    """The model's and AdamW's shards back from PATH/sharded, as save_shards wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    folder = os.path.join(path, "sharded")
    damaged = lambda e: die(f"--resume {path}: the shards in sharded/ are missing or unreadable ({one_line(e)}); "
                            f"the trained weights without AdamW's state start a new run with --model {path}")
    try:
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    except Exception as e:  # no sharded/, or its .metadata gone
        damaged(e)
    state = {"model": get_model_state_dict(model)}
    if any(k.startswith("optimizer.") for k in saved):  # none: saved before AdamW's first step
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    try:
        with plain_errors():
            dcp.load(state, checkpoint_id=folder)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a shard deleted, truncated or never copied: its whole model is still there
        damaged(e)
    set_model_state_dict(model, state["model"])
    if "optimizer" in state:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def lead_first(fn, *a, lead):
    """fn(*a) on the lead process alone (the output folder's checks and lock) while the others
    wait; if it refuses, they exit with its status, quietly, rather than fail in a collective
    it has left."""
    status = 0
    if lead:
        try:
            fn(*a)
        except SystemExit as e:  # die(): its line is printed
            status = e.code if isinstance(e.code, int) else 1
    status = int(all_sum([status])[0]) if dist.is_initialized() else status
    if status:
        if dist.is_initialized():  # a live process group at exit can abort the process (SIGABRT) in gloo's threads
            dist.destroy_process_group()
        sys.exit(status)


def die_with_launcher():
    """Under torchrun: a process whose launcher is killed (kill -9 reaches it alone) is killed
    too, by the kernel's parent-death signal (Linux), rather than train on without it, holding
    the output folder. A kill is what every save is safe against."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return  # not torchrun's (a launcher of one's own may leave its processes on purpose), or not Linux
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != LAUNCHER:  # the launcher went before the call, and its signal with it
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(args):
    """-> (rank, world size). Only torchrun's environment starts a process group."""
    if "RANK" not in os.environ:
        return 0, 1
    die_with_launcher()
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    if cuda:  # one GPU per process
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    # the lead process evaluates alone while the others wait in a collective: allow it hours
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
    return dist.get_rank(), dist.get_world_size()


def distributed_logprobs(model, device):
    # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy
    return torch.nn.parallel.DistributedDataParallel(
        PolicyLogProbs(model), device_ids=[device] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values):
    """Sum of a list of numbers over the processes (itself in one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_mean(stats):
    """One step's metrics over all processes: every process holds the same number of
    prompts, so means of means are global means; counts add up."""
    if not dist.is_initialized():
        return stats
    if "reward_std" in stats:  # a spread over all processes: average the second moments
        stats = dict(stats, reward_std=stats["reward_std"] ** 2 + stats["reward"] ** 2)
    keys = [k for k, v in stats.items() if isinstance(v, (int, float))]
    n = dist.get_world_size()
    summed = all_sum([float(stats[k]) for k in keys])
    out = dict(stats, **{k: v if k in ("sequences", "gen_tokens") else v / n for k, v in zip(keys, summed)})
    if "reward_std" in out:
        out["reward_std"] = math.sqrt(max(0.0, out["reward_std"] - out["reward"] ** 2))
    return out


def gather_rng(rng):
    """Every process's RNG state, for the checkpoint (each samples its own rollouts)."""
    if not dist.is_initialized():
        return [rng]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rng)
    return out


def own_rng(saved, rank, world, path):
    saved = saved if isinstance(saved, list) else [saved]
    if len(saved) != world:
        die(f"--resume {path}: saved by {len(saved)} process(es), resumed with {world}; use the same number")
    return saved[rank]


# -----------------------------------------------------------------------------
# The output folder: owned by one run, never clobbered, healed after a kill

RUN_FILES = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "metrics.jsonl", "eval.json", "predictions.jsonl",
             "coco_results.json", "curves.png", "tensorboard", "wandb")
RUN_FOLDERS = ("checkpoint", "tensorboard", "wandb")  # the rest are files


def prepare_output_dir(args):
    """Owned by this run (locked), writable, healed after a kill mid-save, and never
    clobbered by re-running a command."""
    out = args.output_dir
    checkpoint = os.path.join(out, "checkpoint")
    probe = os.path.join(out, ".visurf-write-test")
    missing = lambda: args.resume and not any(os.path.isdir(saved_checkpoint(args.resume) + s)
                                              for s in ("", ".tmp", ".old"))
    if not os.path.isdir(out) and missing():  # before a run folder is made for it
        die(f"--resume {args.resume}: no such checkpoint folder")
    try:
        os.makedirs(out, exist_ok=True)
        lock_output_dir(out)  # before anything in it is touched: another run may be saving there
        heal_checkpoint(checkpoint)  # (a partial checkpoint.tmp goes first: its space is free for the test)
        try:
            with open(probe, "w") as f:
                f.write("ok")
        finally:  # a write test that failed (a full disk) leaves nothing either
            with contextlib.suppress(OSError):
                os.remove(probe)
    except OSError as e:
        die(f"--output-dir {out}: cannot write there ({e.strerror or e})")
    for f in RUN_FILES[:1] + RUN_FILES[3:]:  # what a run writes must be what it finds there
        p, folder = os.path.join(out, f), f in RUN_FOLDERS
        if os.path.lexists(p) and not (os.path.isdir(p) if folder else os.path.isfile(p)):
            kind = "a folder" if os.path.isdir(p) else "a file" if os.path.isfile(p) else "not a regular file"
            die(f"{p} is {kind}, where visurf keeps its {f + (' folder' if folder else ' file')}; "
                f"move it away or choose another --output-dir")
    if missing():  # (a live run's checkpoint is seen only after the lock: it may be saving it)
        die(f"--resume {args.resume}: no such checkpoint folder")
    if args.resume:
        heal_checkpoint(saved_checkpoint(args.resume))
        resume_healed(args, note=True)
    if args.eval:  # an evaluation writes eval.json and predictions: never over an earlier one
        held = [f for f in ("eval.json", "predictions.jsonl") if os.path.exists(os.path.join(out, f))]
        if held and not args.overwrite:
            die(f"{out} already holds an evaluation ({', '.join(held)}); choose another --output-dir or pass --overwrite")
        return
    # an empty metrics.jsonl is no run: what an error or Ctrl-C before the first line leaves
    held = [f for f in ("checkpoint", "metrics.jsonl") if os.path.exists(os.path.join(out, f))
            and not (f == "metrics.jsonl" and os.path.getsize(os.path.join(out, f)) == 0)]
    own = args.resume and os.path.realpath(args.resume.rstrip("/")) == os.path.realpath(checkpoint)
    if held and args.resume and not own:  # continuing run A into run B's folder would mix them
        die(f"{out} holds another run ({', '.join(held)}); resume {args.resume} into its own folder "
            f"({os.path.dirname(args.resume.rstrip('/')) or '.'}) or into an empty --output-dir")
    if held and not (args.resume or args.overwrite):
        hint = f"continue it with --resume {checkpoint}, " if os.path.isdir(checkpoint) else ""
        die(f"{out} already holds a run ({', '.join(held)}); {hint}choose another --output-dir, or pass --overwrite")


def resume_healed(args, note=False):
    """--resume OUT/checkpoint.old (or .tmp), once healed, is OUT/checkpoint: resume from that."""
    healed = saved_checkpoint(args.resume)
    if healed != args.resume.rstrip("/" + os.sep) and os.path.isdir(healed):
        if note:
            print(f"resuming from {healed}: the checkpoint that {args.resume} was left for by an interrupted save")
        args.resume = healed


LOCKS = []  # the open folders this process holds locked


def lock_output_dir(out):
    """A live run owns its --output-dir: an exclusive flock on the folder itself, which the
    kernel drops when the process ends however it ends, so a killed run's leftover holds
    nothing (and there is no lock file to leave)."""
    if fcntl is None:
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        die(f"--output-dir {out} is in use by another visurf run that is still running; "
            f"wait for it to end, or choose another --output-dir")
    except OSError:  # a filesystem without locks (some network mounts): run unlocked
        os.close(fd)
        return
    LOCKS.append(fd)


def release_output_dirs():
    while LOCKS:
        os.close(LOCKS.pop())


def checkpoint_note(out):
    """What is true of the run's saved state, for an error message."""
    path = os.path.join(out, "checkpoint")
    if os.path.isfile(os.path.join(path, "trainer_state.pt")):
        return f"the last complete checkpoint is intact: continue with --resume {path}"
    return "no checkpoint had been saved yet"


def write_error(e, out):
    """Why a write failed, in plain words. torch and safetensors wrap the OS error of a full
    disk ('[enforce fail at inline_container.cc:672] ... file write failed', 'unexpected pos
    674880 vs 674768'), so a disk with next to nothing free is named as what it is."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    text = one_line(e)
    if re.search(r"No space left|StorageFull|code: 28\b", text):
        return os.strerror(errno.ENOSPC)
    try:
        usage = shutil.disk_usage(out)
    except OSError:
        return text
    if usage.free < max(256 * 2**20, usage.total // 100):
        return f"{os.strerror(errno.ENOSPC)}: {usage.free / 2**20:.0f} MiB free"
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", text).strip()
    return f"writing failed: {text}; {usage.free / 2**20:.0f} MiB free on its disk"


# -----------------------------------------------------------------------------
# A training run's folder: metrics.jsonl (and a logger), evaluations, checkpoints, curves.png

class Run:
    """What a training run keeps of itself, in its --output-dir. The lead process writes;
    under torchrun every process holds one, since evaluations and saves are collective."""

    def __init__(self, args, model, processor, optimizer, held, conv, info, state, adapters=None, ddp=None):
        self.args, self.model, self.processor, self.optimizer = args, model, processor, optimizer
        self.held, self.conv, self.info, self.adapters, self.ddp = held, conv, info, adapters, ddp
        self.lead = not dist.is_initialized() or dist.get_rank() == 0
        self.metrics = os.path.join(args.output_dir, "metrics.jsonl")
        self.start = state["step"] if state else 0
        kept = read_metrics(self.metrics, self.start) if state and self.lead else []
        if args.overwrite and self.lead:  # the old run goes before anything of the new one is written
            for f in RUN_FILES:
                p = os.path.join(args.output_dir, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p) if os.path.exists(p) else None
        if self.lead:
            with open(self.metrics + ".tmp", "w") as f:  # swapped in whole: a kill here loses no line
                f.writelines(kept)
            os.replace(self.metrics + ".tmp", self.metrics)
        self.report = open_report(args.report_to, args.output_dir, args, self.start) if self.lead else None
        self.plotting = self.lead and importlib.util.find_spec("matplotlib") is not None
        # the evaluation before training, kept by a resumed run; steps skipped (non-finite) so far
        self.before = next((json.loads(l)["eval"] for l in kept if '"eval"' in l and json.loads(l)["step"] == 0), None)
        self.skipped = next((json.loads(l).get("skipped_steps", 0) for l in reversed(kept) if '"loss"' in l), 0)
        self.in_a_row, self.t_start = 0, time.time()

    def log(self, record):
        with open(self.metrics, "a") as f:  # NaN and inf are not JSON: null
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            f.write(json.dumps(record) + "\n")
        if self.report:
            self.report[0](record)

    def log_step(self, step, lr, m):
        """A step's metrics, over every process: metrics.jsonl and the progress line; a run
        whose steps keep failing (non-finite) stops here."""
        m["peak_mem_gb"] = peak_memory_gb(self.model.device)
        m = all_mean(m)
        self.skipped, self.in_a_row = self.skipped + (m["skipped"] > 0), self.in_a_row + 1 if m["skipped"] else 0
        if self.lead:
            self.log(dict(step=step, lr=lr, skipped_steps=self.skipped, **m))
            eta = (time.time() - self.t_start) / (step - self.start) * (self.args.steps - step)
            print(progress_line(m, step, self.args, eta), flush=True)
        if not math.isfinite(m["loss"]):  # from the forward pass: the weights themselves are broken
            die(f"training diverged: step {step}'s loss is not finite, so the weights that gave it are not usable "
                f"(the last update was too large: --lr {self.args.lr:g}?); they are not saved; "
                f"{checkpoint_note(self.args.output_dir)}", code=1)
        if self.lead:
            if m["skipped"]:
                print(f"warning: step {step}: the loss or the gradient was not finite; the update was skipped "
                      f"({self.skipped} so far)", flush=True)
        if self.in_a_row >= DIVERGED:  # the weights are still those of the last good step: nothing more is saved
            die(f"training diverged: steps {step - DIVERGED + 1}-{step} had a non-finite loss or gradient and were "
                f"skipped; {checkpoint_note(self.args.output_dir)}; try a lower --lr (now {self.args.lr:g})", code=1)

    def evaluate(self, step):
        """The held-out set (if any), by the lead process; the others wait at their next collective."""
        if not self.held:
            return None
        with whole_weights(self.ddp):  # sharded weights are gathered by every process, then the lead decodes
            result = evaluate(self.model, self.processor, self.held, self.conv, self.args, self.info)[0] \
                if self.lead else None
        if self.lead:
            self.log(dict(step=step, eval=result))
            if step == 0:
                print(f"before training: {headline(result)}")
            elif step < self.args.steps:  # the last one: finish says it, beside the first
                print(f"eval at step {step}: {headline(result)}")
        return result

    def save(self, step, rng):
        """curves.png, then a checkpoint (save_checkpoint); a failed save is one line, the last one kept."""
        self.draw()
        try:
            return save_checkpoint(self.args.output_dir, self.model, self.processor, self.optimizer, step,
                                   gather_rng(rng), self.args, self.lead, self.adapters)
        except FloatingPointError as e:  # never a checkpoint with a non-finite weight
            die(f"no checkpoint saved: {e}; {checkpoint_note(self.args.output_dir)}", code=1)
        except Exception as e:  # a full disk or quota: what was saved before is still in place
            die(f"cannot save a checkpoint in {self.args.output_dir} ({write_error(e, self.args.output_dir)}); "
                f"{checkpoint_note(self.args.output_dir)}", code=1)

    def draw(self):
        """curves.png at each save and at the end; a picture that fails never stops the run."""
        if self.plotting:
            try:
                plot_curves(self.args.output_dir)
            except Exception as e:
                print(f"warning: curves.png not drawn ({one_line(e)})")

    def close(self):
        if self.report:
            self.report[1]()


@contextlib.contextmanager
def stop_requests(world):
    """Ctrl-C and SIGTERM (what a scheduler sends before its kill) fill the list it gives, and
    training stops at the end of the step, so a checkpoint never holds half of one; a second
    one quits at once. Under torchrun the launcher handles them."""
    stop, previous = [], {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum=signal.SIGINT, *_):
        if stop:
            die("interrupted twice: stopped without saving; resume from the last checkpoint", code=128 + signum)
        stop.append(signum)
        print(f"\nstopping after this step ({'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} again to quit "
              f"at once)", flush=True)
    if world == 1:
        for s in previous:
            signal.signal(s, on_signal)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def while_training(out_dir):
    """What ends training early, as one line saying what is still saved."""
    try:
        yield
    except KeyboardInterrupt:  # under torchrun: the processes may be at different points, no collective save
        die("interrupted: resume from the last periodic checkpoint (--save-every)", code=130)
    except data.DataError as e:  # an image deleted or changed mid-run: the folder is fine
        die(f"{e}; {checkpoint_note(out_dir)}", code=1)
    except OSError as e:  # metrics.jsonl on a full disk
        die(f"cannot write to {out_dir} ({write_error(e, out_dir)}); {checkpoint_note(out_dir)}", code=1)


def peak_memory_gb(device):
    """The step's own peak on the run's device (CUDA: allocated tensors, reset after each
    read); on CPU the process's peak resident memory, which only grows (ru_maxrss: KiB on Linux,
    bytes on macOS)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak / 2**30


def progress_line(m, step, args, eta):
    """step, rewards, the ground truth's share, completion lengths, loss, throughput, ETA, and the phase profile."""
    line = f"step {step}/{args.steps} | "
    if args.mode != "sft":
        line += f"reward {m['reward']:.3f} (think {m['reward_think']:.2f} answer {m['reward_answer']:.2f}) | "
    if args.mode == "visurf":
        line += f"gt {m['gt_reward']:.2f} smoothed {m['gt_smoothed']:.2f} A_y {m['gt_advantage']:+.2f} | "
    if args.mode != "sft":  # lengths in tokens; trunc: the share of rollouts that hit --max-new-tokens
        line += (f"len {m['completion_length']:.1f}" + (f" (label {m['gt_length']:.0f})" if "gt_length" in m else "")
                 + f" trunc {m['truncated']:.2f}" + (f" clip {m['clip_frac']:.3f}" if args.ppo_epochs > 1 else "") + " | ")
    line += (f"loss {m['loss']:+.4f} | {m['sequences'] / m['seconds']:.1f} samples/s "
             f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))} | ")
    if args.mode != "sft":
        line += f"gen {m['t_generate']:.2f}s ({m['gen_tokens_per_s']:.0f} tok/s) score {m['t_score']:.2f}s "
    return line + f"fb {m['t_forward_backward']:.2f}s opt {m['t_optimizer']:.2f}s | mem {m['peak_mem_gb']:.2f} GiB"


# -----------------------------------------------------------------------------
# Watching a run: OUT/curves.png, and metrics.jsonl's numbers in TensorBoard or wandb

# metrics.jsonl's names -> TRL's GRPOTrainer's, where it has one (under "train/", as
# transformers' loggers file them); reward_<part> -> rewards/<part>/mean, the rest as they are
TRL_NAMES = {"lr": "learning_rate", "completion_length": "completions/mean_length",
             "truncated": "completions/clipped_ratio", "clip_frac": "clip_ratio/region_mean"}


def logger_names(record):
    """One metrics.jsonl record as {name: number}: train/... for a step, eval/... for an
    evaluation (nested values flattened: eval/per_category/dog)."""
    def flat(d, prefix):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}/"))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[prefix + k] = v
        return out
    if "eval" in record:
        return flat(record["eval"], "eval/")
    named = {}
    for k, v in record.items():
        if k != "step":
            part = k[len("reward_"):] if k.startswith("reward_") and k != "reward_std" else None
            named[f"rewards/{part}/mean" if part else TRL_NAMES.get(k, k)] = v
    return flat(named, "train/")


def report_package(kind):
    """--report-to's package, imported (check_flags calls this before anything loads, so a
    missing package is one line), and for wandb a way to log that asks nothing: a login, or
    WANDB_MODE offline/disabled. Without one, wandb.init would stop the run at its first record."""
    try:
        if kind == "tensorboard":
            from torch.utils import tensorboard as package
        else:
            import wandb as package
    except ImportError:
        die(f"--report-to {kind}: the {kind} package is not installed (pip install {kind})")
    if kind == "wandb" and not (os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun")
                                or os.environ.get("WANDB_API_KEY") or netrc_login()):
        die("--report-to wandb: not logged in (no WANDB_API_KEY, no `wandb login`); log in, or set "
            "WANDB_MODE=offline to keep the run in OUT/wandb for `wandb sync`")
    return package


def netrc_login():
    """Whether `wandb login` left its key in the netrc file (where wandb keeps it)."""
    import netrc
    from urllib.parse import urlparse
    try:
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def open_report(kind, out_dir, args, start):
    """--report-to: -> (send(record), close()) or None. The logger opens at the first record,
    after --overwrite has cleared the old run. A resumed run goes on with its logger's history:
    TensorBoard hides the old run's steps after the checkpoint (purge_step); wandb continues the
    same run (its id kept in OUT/wandb/visurf-run-id) and, taking rising steps only, drops the
    resumed steps it already holds."""
    if kind == "none":
        return None
    package, opened = report_package(kind), []

    def send(record):
        if not opened and kind == "tensorboard":
            opened.append(package.SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                                purge_step=start + 1 if start else None))
        elif not opened:  # WANDB_MODE=offline writes OUT/wandb/ only; `wandb sync` uploads it later
            path = os.path.join(out_dir, "wandb", "visurf-run-id")
            run_id = open(path).read().strip() if start and os.path.isfile(path) else package.util.generate_id()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(run_id)
            opened.append(package.init(project=os.environ.get("WANDB_PROJECT", "visurf"), dir=out_dir, id=run_id,
                                       resume="allow", name=os.path.basename(os.path.abspath(out_dir)),
                                       config=vars(args)))
        names = logger_names(record)
        if kind == "tensorboard":
            for name, v in names.items():
                opened[0].add_scalar(name, v, record["step"])
            opened[0].flush()  # readable while the run goes on, and after a kill
        else:
            opened[0].log(names, step=record["step"])

    def close():
        if opened:
            opened[0].close() if kind == "tensorboard" else opened[0].finish()
    return send, close


def read_run(out_dir):
    """OUT/metrics.jsonl -> (step records, evaluation records). A half-written last line
    (a kill, or the run writing it now) is left out."""
    path = os.path.join(out_dir, "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    steps, evals = [], []
    for n, line in enumerate(lines, 1):
        try:
            record = metrics_record(line, n, path)
        except ValueError as e:
            if n < len(lines) or "not JSON" not in str(e):
                raise
            continue
        (evals if "eval" in record else steps).append(record)
    return steps, evals


def plot_curves(out_dir):
    """OUT/curves.png from OUT/metrics.jsonl, one panel per question a run raises: is the
    reward rising (and is it the answer or the format), how much is the label still
    teaching (rule 3, A_y), is the loss sane, does the held-out metric move, and are the
    completions running into --max-new-tokens. Faint: each step; bold: a running mean of 10."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    steps, evals = read_run(out_dir)
    if not steps and not evals:
        raise ValueError(f"{os.path.join(out_dir, 'metrics.jsonl')} holds no steps yet")
    has = lambda k: any(k in r for r in steps)
    why_not = ("no rollouts (--mode sft)" if not has("reward") else
               "no label in the group (--mode grpo)")

    def curve(ax, key, label, color, style="-", lw=2, alpha=1.0):
        xs = [r["step"] for r in steps if key in r]
        ys = np.array([r[key] for r in steps if key in r], dtype=float)
        if not xs:
            return
        ax.plot(xs, ys, color=color, alpha=0.25 * alpha, lw=1)
        c, i = np.concatenate([[0.0], np.cumsum(ys)]), np.arange(1, len(ys) + 1)
        ax.plot(xs, (c[i] - c[np.maximum(0, i - 10)]) / np.minimum(i, 10), style, color=color, lw=lw, alpha=alpha,
                label=label)

    def empty(ax, text):
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    drawn = []  # axes whose legend is drawn on their twin, with the twin's curves
    (a_rew, a_gt, a_adv), (a_loss, a_eval, a_len) = axes
    a_rew.set_title("rollout reward = w·think + answer")
    if has("reward"):
        # the total first, wide and pale: while think is 0 it lies on the answer, which stays visible on it
        curve(a_rew, "reward", "total", "black", lw=6, alpha=0.3)
        curve(a_rew, "reward_answer", "answer", "tab:blue")
        curve(a_rew, "reward_think", "think", "tab:orange", "--")
    else:
        empty(a_rew, why_not)
    a_gt.set_title("the label: its reward after control, and rule 3")
    if has("gt_reward"):
        curve(a_gt, "gt_reward", "label's reward (gt_reward)", "tab:green")
        curve(a_gt, "gt_smoothed", "groups where rule 3 fired (gt_smoothed)", "tab:purple")
    else:
        empty(a_gt, why_not)
    a_adv.set_title("mean A_y, the label's advantage (gt_advantage)")
    if has("gt_advantage"):
        a_adv.axhline(0, color="gray", lw=0.5)
        curve(a_adv, "gt_advantage", "A_y", "tab:red")
    else:
        empty(a_adv, why_not)
    a_loss.set_title("loss")
    curve(a_loss, "loss", "loss", "black")
    a_eval.set_title("held out, at each evaluation (points: what was measured)")
    if evals:
        task = data.TASKS.get(evals[-1]["eval"].get("task"))
        for key, color in zip(task.headline if task else [], ["tab:blue", "tab:green"]):
            pts = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]]
            if pts:  # no line between evaluations: nothing was measured there
                a_eval.plot(*zip(*pts), "o", color=color, ms=7, label=key)
        pts = [(r["step"], r["eval"]["parse_failure_rate"]) for r in evals if "parse_failure_rate" in r["eval"]]
        if pts:  # a fraction, on its own axis: a headline may be in % (mAP)
            rate = a_eval.twinx()
            rate.plot(*zip(*pts), "x", color="gray", ms=7, label="parse_failure_rate (right axis)")
            rate.set_ylim(-0.02, 1.02)
            handles = [sum(pair, []) for pair in zip(a_eval.get_legend_handles_labels(),
                                                      rate.get_legend_handles_labels())]
            rate.legend(*handles, loc="center", fontsize=8)  # one legend (a twin axis hides the other's), where
            # no point is: evaluations sit at the run's ends, and their numbers near 0 and 1
            drawn.append(a_eval)
    else:
        empty(a_eval, "no held-out set")
    a_len.set_title("completions: mean length (tokens), truncated")
    curve(a_len, "completion_length", "rollouts", "tab:blue")
    curve(a_len, "gt_length", "label", "tab:green")
    if has("truncated"):
        frac = a_len.twinx()
        curve(frac, "truncated", "hit --max-new-tokens (right axis)", "tab:red", "--")
        frac.set_ylim(-0.02, 1.02)
        handles = [sum(pair, []) for pair in zip(a_len.get_legend_handles_labels(), frac.get_legend_handles_labels())]
        frac.legend(*handles, loc="best", fontsize=8)
        drawn.append(a_len)
    if not has("completion_length") and not has("gt_length"):
        empty(a_len, "no completion lengths in this metrics.jsonl")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            if ax not in drawn:
                ax.legend(loc="best", fontsize=8)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    last = max(r["step"] for r in steps + evals)
    fig.suptitle(f"{os.path.normpath(out_dir)}: step {last}")
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path + ".tmp.png", dpi=100)  # swapped in whole: a viewer never sees half a picture
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path, len(steps), len(evals)


def plot_command(out_dir):
    """python visurf.py --plot OUT: redraw OUT/curves.png, no model, no torch."""
    if not os.path.isdir(out_dir):
        die(f"--plot {out_dir}: no such folder")
    if not os.path.isfile(os.path.join(out_dir, "metrics.jsonl")):
        die(f"--plot {out_dir}: no metrics.jsonl there (the --output-dir of a run)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        die("--plot needs matplotlib (pip install matplotlib)")
    try:
        path, n_steps, n_evals = plot_curves(out_dir)
    except (OSError, ValueError) as e:
        die(f"--plot {out_dir}: {one_line(e)}")
    print(f"wrote {path} ({n_steps} steps, {n_evals} evaluations)")


# -----------------------------------------------------------------------------
# The command

def run(argv=None):
    """One command: check the flags, set up the processes and the output folder, load the
    data and the model, then evaluate, or train. -> the final evaluation, or None."""
    args = parse_args(argv)
    if args.plot:
        return plot_command(args.plot)
    if args.report_to != "none":  # the logger's package, and wandb's login: before anything loads
        report_package(args.report_to)
    check_processes(args)  # before any process group: one line from the lead, the others quiet
    rank, world = init_distributed(args)  # (0, 1) unless started by torchrun
    lead_first(prepare_output_dir, args, lead=rank == 0)
    state, saved_rng = resume_state(args, rank, world)  # (None, None) unless --resume
    transformers.utils.logging.disable_progress_bar()
    seeds(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = "bf16" if compute_dtype(args, device) == torch.bfloat16 else "fp32"
    train_set, held, info = load_data(args)  # data first: a bad file fails before a large model is loaded
    # a --lora run resumes on its base, the saved --model (add_adapters puts the saved adapter on it)
    model, processor, conv = load_model(args.model if args.lora else args.resume or args.model, args)
    set_max_new_tokens(args, model, processor, conv, train_set + held)
    if args.eval:
        return evaluate_command(model.to(device), processor, held, conv, args, info)
    model, adapters = add_adapters(model, args)  # before the move: a frozen weight reaches the device
    freeze(model, args, compute_dtype(args, device))  # in the compute dtype only (the reference too)
    ref_model = reference_policy(model, args, device)
    model.to(device)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # under torchrun: gradients averaged over the processes (DDP), or everything sharded (FSDP),
    # before the optimizer is made: FSDP replaces the parameters by their shards
    ddp = shard(model, args) if args.fsdp else distributed_logprobs(model, device) if world > 1 else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay, fused=True)  # one kernel, not a loop
    if world > 1:  # each process samples its own rollouts; the weights start (and stay) equal
        torch.manual_seed(args.seed + rank)
    if state and not resume_optimizer(state, saved_rng, model, optimizer, args, rank == 0):
        return None
    run = Run(args, model, processor, optimizer, held, conv, info, state, adapters, ddp)
    print_start(run, train_set, world)
    if run.start == 0:
        run.before = run.evaluate(0)
    peak_memory_gb(device)  # CUDA: the first step's peak starts here, not at loading
    with stop_requests(world) as stop, while_training(args.output_dir):
        step, rng = train(model, processor, optimizer, train_set, conv, args, run, stop, ref_model, ddp)
        path = run.save(step, rng)
    if stop:
        print(f"interrupted: saved step {step} to {path}; continue with --resume {path}")
        sys.exit(128 + stop[0])
    ddp = None  # finish drops the run's reference to it too, and says why
    return finish(run, step, path, world)


def resume_state(args, rank, world):
    """--resume: the checkpoint's trainer state, checked against the flags, and this process's
    RNG state in it (read before a model is loaded). -> (state, rng) or (None, None)."""
    if not args.resume:
        return None, None
    resume_healed(args)  # the other processes follow the lead's healing
    state = load_trainer_state(args.resume, args)
    return state, own_rng(state["rng"], rank, world, args.resume)


def resume_optimizer(state, saved_rng, model, optimizer, args, lead):
    """The RNG and AdamW's state back as the checkpoint holds them. -> False when the run is done."""
    set_rng_state(saved_rng)
    if args.fsdp:
        load_shards(args.resume, model, optimizer)
    else:
        optimizer.load_state_dict(state.pop("optimizer"))  # copied to the weights' device; the CPU copy goes
    if state["step"] >= args.steps:
        if lead:
            print(f"{args.resume} is at step {state['step']}, and --steps is {args.steps}: nothing to do")
        return False
    return True


def set_max_new_tokens(args, model, processor, conv, samples):
    """The tiny model's default: room for the longest label (it has nothing to reason with)."""
    if args.max_new_tokens is None:
        args.max_new_tokens = 4 + max(len(processor.tokenizer(data.gt_completion(s, conv))["input_ids"])
                                      for s in samples)
    if args.min_new_tokens > args.max_new_tokens:
        die(f"--min-new-tokens ({args.min_new_tokens}) is above --max-new-tokens ({args.max_new_tokens})")
    model.generation_config.max_new_tokens = args.max_new_tokens


def evaluate_command(model, processor, held, conv, args, info):
    """--eval: the metrics printed, and eval.json and predictions.jsonl in --output-dir."""
    result, texts = evaluate(model, processor, held, conv, args, info, args.output_dir)
    with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
        json.dump(dict(result, model=args.model, data=args.data), f, indent=1)
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as f:
        for s, t in zip(held, texts):
            f.write(json.dumps({"id": s["id"], "query": s["query"], "output": t}) + "\n")
    print(f"{'metric':<20} value")
    for k, v in result.items():
        if isinstance(v, float):
            print(f"{k:<20} {v:.4f}")
    print(f"wrote eval.json and predictions.jsonl to {args.output_dir}")
    return result


def print_start(run, train_set, world):
    args, model = run.args, run.model
    if not run.lead:
        return
    if not run.plotting:
        print("note: matplotlib is not installed, so no curves.png (pip install matplotlib)")
    print(f"visurf: mode {args.mode}{' ablate ' + ','.join(args.ablate) if args.ablate else ''} | "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {model.device}"
          f"{f' x {world} processes' if world > 1 else ''} | {len(train_set)} training prompts, {len(run.held)} held "
          f"out | G {args.group_size} B {args.batch_size} lr {args.lr:g} steps {args.steps}")


def finish(run, step, path, world):
    """The evaluation after training, the last picture, the logger closed, the processes ended."""
    after = run.evaluate(step)
    if after:
        print(f"after training:  {headline(after)}" + (f"  (before: {headline(run.before)})" if run.before else ""))
    if run.lead:
        run.draw()
        run.close()
        print(f"saved {path}" + (f"; curves in {os.path.join(run.args.output_dir, 'curves.png')}"
                                 if run.plotting else ""))
    # DDP's reducer must not hold the last reference to the process group: freed from it, with
    # the interpreter lock held, gloo's destructor waits on a worker that needs that lock
    run.ddp = None
    barrier()
    if world > 1:
        dist.destroy_process_group()
    return after


def main(argv=None):
    """The command, and what it promises however it ends: Ctrl-C anywhere is one line and
    exit status 130, an image that became unreadable is one line, and the output folder is
    released (a lock the kernel would drop at exit anyway; here for callers in-process)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the loading's handler, undone
    try:
        return run(argv)
    except KeyboardInterrupt:
        die("interrupted; nothing half-written is left, and the same command runs again", code=130)
    except data.DataError as e:  # an image deleted or changed after the data was loaded
        die(str(e), code=1)
    finally:
        release_output_dirs()


if __name__ == "__main__":
    main()
