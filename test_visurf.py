"""Tests for visurf: the math against hand-computed numbers and SPEC §1's identities,
the rewards against hand cases and random strings, data loading and its errors, the
evaluator against pycocotools, and short end-to-end runs. CPU only, a few minutes."""
import json
import math
import os
import subprocess
import sys
import tempfile

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

def test_rule3_worked_cases():
    # SPEC §2, G = 4, r(y) = 1 before smoothing
    assert visurf.smooth_gt_reward([0, 0, 0, 0], 1.0) == 1.0
    assert visurf.group_advantages([0, 0, 0, 0, 1.0])[-1] > 0
    assert visurf.smooth_gt_reward([0, 1, 0, 1], 1.0) == 0.5
    assert visurf.group_advantages([0, 1, 0, 1, 0.5])[-1].item() == 0.0
    assert visurf.smooth_gt_reward([1, 1, 1, 1], 1.0) == 1.0
    assert visurf.group_advantages([1, 1, 1, 1, 1.0]).abs().sum().item() == 0.0
    # the comparison is >=, and it uses r(y) after rule 2
    assert visurf.smooth_gt_reward([0.2, 0.7], 0.7) == pytest.approx(0.45)
    assert visurf.gt_reward({"think": 0.0, "accuracy": 1.0}, [1.0, 0.0]) == (0.5, True)
    assert visurf.gt_reward({"think": 0.0, "accuracy": 1.0}, [0.0, 0.0]) == (1.0, False)


def test_rule2_and_ablations():
    parts = {"think": 1.0, "iou": 0.75, "confidence": 1.0}  # as if the label had reasoned
    assert visurf.gt_reward(parts, [0.0, 0.0]) == (1.75, False)
    assert visurf.gt_reward(dict(parts, think=0.0), [0.0], ablate=["think"]) == (2.75, False)
    # smoothing off: the label keeps its reward even when rollouts beat it
    assert visurf.gt_reward(parts, [3.0, 3.0], ablate=["smooth"]) == (1.75, False)
    assert visurf.gt_reward(parts, [3.0, 1.0]) == (2.0, True)


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


def test_policy_loss_clipping_and_aggregation():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.25, 0.5]]))  # ratio 2 on the first token
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # seq 0 (A=+1): min(2, 1.2) + min(1, 1) = 2.2; seq 1 (A=-1): -max(2, 1.2) = -2 (masked 2nd token)
    loss = visurf.policy_loss(logp, old, adv, mask, 0.2, denom=2)
    assert loss.item() == pytest.approx(-(2.2 - 2.0) / 2)
    loss_tok = visurf.policy_loss(logp, old, adv, mask, 0.2, denom=mask.sum())
    assert loss_tok.item() == pytest.approx(-(2.2 - 2.0) / 3)
    # k3 KL is zero at the reference and positive elsewhere
    same = visurf.policy_loss(logp, logp, adv * 0, mask, 0.2, 1, ref_logp=logp, beta=0.1)
    assert same.item() == 0.0
    assert visurf.policy_loss(logp, logp, adv * 0, mask, 0.2, 1, ref_logp=old, beta=0.1).item() > 0


# =============================================================================
# The unification identity on the tiny model (SPEC §1)

@pytest.fixture(scope="module")
def tiny():
    args = visurf.parse_args(["--group-size", "4", "--batch-size", "1", "--max-new-tokens", "6"])
    model, processor, conv = visurf.load_model("tiny", args)
    return model, processor, conv, args


def flat_grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def seq_logprob(model, prompts, completion):
    logp, mask = visurf.token_logprobs(model, prompts, [completion], 1)
    return (logp * mask).sum()


def test_visurf_gradient_is_weighted_sum_of_sequence_gradients(tiny):
    model, processor, conv, args = tiny
    torch.manual_seed(1)
    sample = data.synthetic("classification", 1, 0)[0]
    prompts, comps, adv, per, _ = visurf.make_groups(model, processor, [sample], conv, args)
    adv = torch.tensor([0.9, -1.3, 0.2, -0.4, 1.7])  # any advantages: the identity holds for all
    logp, mask = visurf.token_logprobs(model, prompts, comps, per)
    loss = visurf.policy_loss(logp, logp.detach(), adv, mask, args.clip_eps, denom=len(comps))
    g = flat_grad(model, loss)
    G = args.group_size
    expected = sum(-adv[i] / (G + 1) * flat_grad(model, seq_logprob(model, prompts, c))
                   for i, c in enumerate(comps))
    assert torch.allclose(g, expected, rtol=1e-4, atol=1e-7)
    assert g.abs().max() > 0


def test_label_term_is_scaled_sft_gradient(tiny):
    """Every rollout scores the same c < r(y): A_y = G/sqrt(G+1), and the ViSurf gradient is
    A_y/(G+1) times the SFT gradient of the label, plus A_j/(G+1) times the rollouts'
    score-function term (a baseline with zero mean, so SFT is exact in expectation)."""
    model, processor, conv, args = tiny
    torch.manual_seed(2)
    sample = data.synthetic("classification", 1, 0)[0]
    prompts, comps, adv, per, stats = visurf.make_groups(model, processor, [sample], conv, args)
    G = args.group_size
    assert stats["reward"] == 0.0 and stats["gt_reward"] == 1.0  # the random model can't answer yet
    assert adv[-1].item() == pytest.approx(G / math.sqrt(G + 1), rel=1e-5)
    logp, mask = visurf.token_logprobs(model, prompts, comps, per)
    g_visurf = flat_grad(model, visurf.policy_loss(logp, logp.detach(), adv, mask, 0.2, denom=G + 1))
    lp, m = visurf.token_logprobs(model, prompts, comps[-1:], 1)
    g_sft = flat_grad(model, visurf.sft_loss(lp, m, denom=1))  # the SFT path's own loss
    g_rollouts = sum(flat_grad(model, -seq_logprob(model, prompts, c)) for c in comps[:-1])
    A_y, A_j = adv[-1].item(), adv[0].item()
    assert torch.allclose(g_visurf, A_y / (G + 1) * g_sft + A_j / (G + 1) * g_rollouts, rtol=1e-4, atol=1e-7)


def test_grpo_is_visurf_without_the_label(tiny):
    model, processor, conv, args = tiny
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
    adv = torch.cat([visurf.group_advantages(r) for r in rewards_])
    logp, mask = visurf.token_logprobs(model, pg, without_label, G)
    expect = visurf.policy_loss(logp, logp.detach(), adv, mask, 0.2, denom=len(without_label))
    # the training path's update in grpo mode, with the same rollouts and advantages
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = visurf.update(model, opt, pg, cg, adv, per_g, grpo)["loss"]
    assert got == pytest.approx(expect.item(), rel=1e-5)
    assert abs(got) > 0


def test_micro_batches_give_the_same_gradient(tiny):
    model, processor, conv, _ = tiny
    samples = data.synthetic("classification", 3, 4)
    grads = []
    for mb in ["3", "1"]:
        args = visurf.parse_args(["--group-size", "2", "--max-new-tokens", "5", "--micro-batch", mb,
                                  "--loss-agg", "token"])
        torch.manual_seed(7)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        visurf.train_step(model, processor, opt, samples, conv, args)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# =============================================================================
# End to end, through the command line

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
    logged = [json.loads(l)["step"] for l in open(out / "metrics.jsonl") if "loss" in l]
    assert logged[-1] >= state["step"]
    rc, stdout, err = cli("--steps", str(state["step"] + 2), "--batch-size", "1", "--group-size", "2", "--shots", "1",
                          "--eval-limit", "2", "--output-dir", str(out), "--resume", str(out / "checkpoint"))
    assert rc == 0, err
    steps = [json.loads(l)["step"] for l in open(out / "metrics.jsonl") if "loss" in l]
    assert steps == list(range(1, state["step"] + 3))  # no step lost, none twice


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
    s = data.synthetic("grounding", 1, 0)[0]
    s["image"], s["size"] = s["image"].resize((448, 224)), (448, 224)
    s["answer"] = [2 * s["answer"][0], s["answer"][1], 2 * s["answer"][2], s["answer"][3]]
    assert data.gt_completion(s, conv) == "<answer>[%d, %d, %d, %d]</answer>" % tuple(s["answer"])  # 448x224 stays
    rc, out, err = cli("--model", path, "--task", "grounding", "--steps", "1", "--batch-size", "2", "--group-size", "2",
                       "--max-new-tokens", "6", "--lr", "1e-3", "--shots", "1", "--eval-limit", "2",
                       "--output-dir", str(tmp_path / "run"))
    assert rc == 0, err
    assert "step 1/1" in out and "after training:  mIoU" in out


def test_coco_training_run_through_the_cli(tmp_path):
    path = write_coco(str(tmp_path), n_images=6)
    rc, out, err = cli("--data", path, "--images", str(tmp_path / "images"), "--categories", "dog,fire hydrant",
                       "--shots", "2", "--negatives", "0.5", "--steps", "2", "--batch-size", "2", "--group-size", "2",
                       "--eval-data", path, "--eval-images", str(tmp_path / "images"), "--eval-limit", "4",
                       "--output-dir", str(tmp_path / "run"))
    assert rc == 0, err
    assert "6 training prompts, 4 held out" in out and "after training:  mAP" in out  # 2 + 2 shots, 2 negatives


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
    r = rewards.score("detection", text, gt)
    # matches: 0.9 -> A (IoU .6), 0.7 -> B (IoU .8), 0.5 -> nothing left above .5
    assert r["iou"] == pytest.approx((0.6 + 0.8 + 0.0) / 3)
    assert r["confidence"] == pytest.approx((0.9 + 0.7 + (1 - 0.5)) / 3)
    assert r["think"] == 1.0
    # one perfect box for two GT boxes: half the IoU reward
    assert rewards.score("detection", det('[{"Position": [0, 0, 10, 10], "Confidence": 1}]'), gt)["iou"] == 0.5
    # an IoU of exactly 0.5 does not match
    assert rewards.match_boxes([[0, 0, 10, 5]], [[0, 0, 10, 10]]) == [0.0]


def test_no_objects_both_ways():
    assert rewards.score("detection", det("No Objects"), []) == {"think": 1.0, "iou": 1.0, "confidence": 1.0}
    assert rewards.score("detection", det("no objects."), [])["iou"] == 1.0
    boxed = rewards.score("detection", det('[{"Position": [0, 0, 5, 5], "Confidence": 0.1}]'), [])
    assert boxed["iou"] == 0.0 and boxed["confidence"] == 0.0
    said_none = rewards.score("detection", det("No Objects"), [[0, 0, 5, 5]])
    assert said_none["iou"] == 0.0 and said_none["confidence"] == 0.0
    assert rewards.score("detection", det("nothing here"), [])["iou"] == 0.0


def test_think_format():
    assert rewards.think_reward("<think>a\nb</think>\n<answer>x\ny</answer>\n") == 1.0
    assert rewards.think_reward("<answer>x</answer>") == 0.0
    assert rewards.think_reward("hi <think>a</think><answer>x</answer>") == 0.0
    assert rewards.think_reward("<think>a</think><answer>x</answer><answer>y</answer>") == 0.0
    assert rewards.think_reward("<think>a<think>b</think><answer>x</answer>") == 0.0


def test_classification_exact_match_only():
    ok = lambda a, label: rewards.score("classification", f"<answer>{a}</answer>", label)["accuracy"]
    assert ok("Fire_Hydrant.", "fire hydrant") == 1.0
    assert ok("  RED ", "red") == 1.0
    for wrong in ["", "r", "re", "reddish", "red green", "a"]:
        assert ok(wrong, "red") == 0.0, wrong
    assert rewards.score("classification", "red", "red")["accuracy"] == 0.0  # no answer tags
    two = "<answer>blue</answer><answer>red</answer>"
    assert rewards.score("classification", two, "blue") == {"think": 0.0, "accuracy": 1.0}


def test_grounding_iou_and_giou():
    r = rewards.score("grounding", "<answer>[0, 0, 10, 10]</answer>", [0, 0, 10, 20])
    assert r["iou"] == pytest.approx(0.5)
    g = rewards.score("grounding", "<answer>[0, 0, 10, 10]</answer>", [20, 0, 30, 10], giou=True)
    # GIoU = 0 - (hull 300 - union 200) / 300 = -1/3 -> (GIoU + 1) / 2 = 1/3
    assert g["iou"] == pytest.approx(1 / 3)
    assert rewards.score("grounding", "<answer>[[1, 2, 3, 4]]</answer>", [1, 2, 3, 4])["iou"] == 1.0


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
    r = rewards.score("detection", text, GT2)
    assert set(r) == {"think", "iou", "confidence"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r.values())
    if expect_iou is not None:
        assert r["iou"] == pytest.approx(expect_iou)


@pytest.mark.parametrize("conf,expect", [("NaN", 1.0), ("nan", 1.0), ("Infinity", 1.0), ("inf", 1.0),
                                         ("-inf", 0.0), ("-0.5", 0.0), ("1.7", 1.0), ('"0.25"', 0.25)])
def test_bad_confidences_are_clamped(conf, expect):
    # on a matched box the confidence reward is the confidence itself; NaN counts as 0 -> 1 - 0
    text = det('[{"Position": [0, 0, 10, 10], "Confidence": %s}]' % conf)
    r = rewards.score("detection", text, [[0, 0, 10, 10]])
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
        r = rewards.score(task, text, ans)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r.values())
    spaced = rewards.score("detection", '<answer>{"Position": [1, 2, 3, 4], "Confidence": ' + " " * 4000 + "0.3}</answer>",
                           [[1, 2, 3, 4]])
    assert spaced["iou"] == 1.0 and spaced["confidence"] == pytest.approx(0.3)


def test_huge_completion():
    big = det('[{"Position": [0, 0, 10, 10], "Confidence": 0.9}, ' * 2500 + "x" * 10000)
    assert len(big) > 100_000
    for task, ans in [("detection", GT2), ("classification", "red"), ("grounding", [0, 0, 10, 10])]:
        r = rewards.score(task, big, ans)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in r.values())
    assert rewards.score("detection", big, GT2)["iou"] == 0.5  # 2,500 exact duplicates count once
    assert rewards.score("detection", big[:-len("</answer>")], GT2)["iou"] == 0.0  # no closing tag


FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "[", "]", "[[", "{", "}", '"Position"',
             "'position'", '"Confidence"', ":", ",", "0", "10", "-3", "1e309", "nan", "inf", "0.5",
             "No Objects", "red", " ", "\n", "\x00", "é", "\ud7ff", "null", '"', "'"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)),
       st.sampled_from(["detection", "classification", "grounding"]))
def test_score_never_raises_and_stays_in_range(text, task):
    answer = {"detection": GT2, "classification": "red", "grounding": [0, 0, 10, 10]}[task]
    for ans in (answer, [] if task == "detection" else answer):
        r = rewards.score(task, text, ans)
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
    _, processor, conv, _ = tiny
    tok = processor.tokenizer
    s = data.synthetic("detection", 1, 0)[0]
    boxes = data.model_answer(s, conv)
    rollout = "<think>the shape is at the left</think><answer>" + data.format_answer(
        "detection", boxes, [1.0] * len(boxes)) + "</answer>"
    label = data.gt_completion(s, conv)
    ids_r, ids_l = tok(rollout, add_special_tokens=False)["input_ids"], tok(label, add_special_tokens=False)["input_ids"]
    assert ids_r[-len(ids_l):] == ids_l
    assert rewards.score("detection", rollout, boxes)["iou"] == 1.0
    raw = data.gt_completion(s, conv, align=False)  # rule 1 off: the dataset's own string
    assert tok(raw, add_special_tokens=False)["input_ids"] != ids_l
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
    assert data.gt_completion(s[0], Q2) == '<answer>[{"Position": [100, 200, 500, 800], "Confidence": 1.00}]</answer>'
    assert data.gt_completion(s[0], Q2, align=False) == recs[0]["solution"]
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


def test_bad_data_fails_cleanly_through_the_cli(tmp_path):
    for files, argv, problem in bad_cases(tmp_path):
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        out_dir = tmp_path / "out"
        rc, out, err = cli("--data", str(tmp_path / argv[0]), *argv[1:], "--output-dir", str(out_dir), "--steps", "1")
        assert_clean_error(rc, err, argv[0], problem)
        assert not out_dir.exists() or not os.listdir(out_dir)  # nothing written


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
# The comparison runner (bench/compare_modes.py)

def test_compare_modes_runner_writes_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench", "compare_modes.py"), "--steps", "2",
                        "--seeds", "0", "--configs", "visurf,sft", "--regimes", "a", "--eval-every", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    md = (out / "results.md").read_text()
    assert "| a | visurf |" in md and "| a | sft |" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.load(open(out / "runs.json"))["runs"]
    assert {r["config"] for r in runs} == {"visurf", "sft"}
    assert all(r["steps"] == 2 for r in runs)
    assert [r["generated"] for r in runs if r["config"] == "sft"] == [0]
