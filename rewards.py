"""
Verifiable rewards for visual RL, after Visual-RFT (arXiv 2503.01785), hardened.

    score(completion, answer_parts) -> {"think": .., <the answer's parts>: ..}

Every component lies in [0, 1]. Which parts an answer has is its task's choice: data.TASKS
maps each task to the functions here (classification_reward, detection_reward,
grounding_reward), with the ground truth in the completion's coordinate convention
(conversion lives in data.py). Whatever string the model writes, every reward here is
finite, in range and never raises.

Where these differ from Visual-RFT's released code, and why:
- The answer must sit inside <answer>...</answer>; the first block is scored.
- Classification is an exact match after normalisation. The released code also
  accepted substrings in either direction, so "" or "a" scored 1.0.
- No math-verify pre-check: it gave 1.0 when some number happened to match.
- Detection with no ground-truth boxes: a "No Objects" answer scores full marks and
  any box scores 0. The released code gave negatives no accuracy credit at all.
- Parsing is by pattern, not eval/json: single quotes, [[...]], keys in any case,
  answers over several lines, a list cut off mid-item and items with extra (even
  nested) keys all parse; NaN/inf confidences are clamped to [0, 1] instead of
  turning the reward into NaN; an item whose confidence is not a number ('90%') is
  unreadable and dropped (Visual-RFT's json.loads fails on it: no credit).
- Every box of an answer counts, however many: the label's reward is 1.0 at any size.
- Grounding uses plain IoU; `giou=True` gives (GIoU + 1) / 2, the released code's
  GIoU + 1 rescaled to stay in [0, 1].
"""
import math
import re

import numpy as np

# Parsing is linear in the text and matching costs (boxes x GT boxes) vectorised steps, so
# the one bound on a runaway completion is on its length: far above any real label (150
# boxes are 7,000 characters; 1,000,000 hold over 20,000), and a rollout is capped by
# --max-new-tokens long before it. Real labels are never cut: every box counts.
MAX_ANSWER_CHARS = 1_000_000
IOU_MATCH = 0.5

_FORMAT = re.compile(
    r"\s*<think>((?:(?!</?(?:think|answer)>).)*)</think>\s*"
    r"<answer>((?:(?!</?(?:think|answer)>).)*)</answer>\s*", re.S)
# Patterns run on _clean()ed text and have no two quantifiers competing for the same
# characters, so a runaway completion ("[[[[...", "1111...") costs linear time.
_NUM = r"""["']? ?([-+]?(?:\d{1,32}(?:\.\d{0,32})?|\.\d{1,32})(?:[eE][-+]?\d{1,4})?|nan|-?inf(?:inity)?) ?["']?"""
_BOX = re.compile(r"\[ ?" + r" ?, ?".join([_NUM] * 4) + r" ?\]", re.I)
_PAIRS = re.compile(r"\( ?" + _NUM + r" ?, ?" + _NUM + r" ?\) ?, ?\( ?" + _NUM + r" ?, ?" + _NUM + r" ?\)", re.I)
_POSITION = re.compile(r"""position["']? ?: ?(\[[^\]]*\])""", re.I)
_CONFIDENCE_KEY = re.compile(r"""confidence["']? ?: ?""", re.I)
_NUMBER = re.compile(_NUM, re.I)
_BRACES = re.compile(r"[{}]")
_RUNS = re.compile(r"\s+|\[[\s\[]*|\][\s\]]*")


def _clean(text):
    """One space for any whitespace run, one bracket for '[[' or ']]' runs."""
    return _RUNS.sub(lambda m: m.group(0).lstrip()[:1] or " ", text)


def think_reward(completion):
    """1 if the whole completion is <think>...</think> then <answer>...</answer>."""
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


def extract_answer(completion):
    """Content of the first <answer>...</answer> block, stripped; None if there is none.
    At most MAX_ANSWER_CHARS of it: the bound on a runaway completion's cost."""
    i = completion.find("<answer>")
    j = completion.find("</answer>", i + 8) if i >= 0 else -1
    return completion[i + 8:j][:MAX_ANSWER_CHARS].strip() if j >= 0 else None


def _number(s):
    try:
        return float(s)
    except ValueError:
        return float("nan")


def parse_box(text):
    """The first box in `text`, written [x1, y1, x2, y2] or (x1,y1),(x2,y2) (Visual-RFT's
    LISA grounding), as four floats; None if there is none or a value is not finite."""
    text = _clean(text)
    found = [m for m in (_BOX.search(text), _PAIRS.search(text)) if m]
    if not found:
        return None
    m = min(found, key=lambda m: m.start())
    box = [_number(g) for g in m.groups()]
    return box if all(math.isfinite(v) for v in box) else None


def detection_items(text):
    """The top-level {...} objects of a detection answer, as their own text with any nested
    object taken out (an extra key holding {'id': 3} leaves the item a box, and its keys
    are not the item's). An object cut off before its '}' is dropped: that repairs a list
    truncated mid-item. Linear in the text."""
    items, depth, start, parts = [], 0, 0, []
    for m in _BRACES.finditer(text):
        if m.group() == "{":
            if depth == 0:
                start, parts = m.end(), []
            elif depth == 1:
                parts.append(text[start:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 1:
                start = m.end()
            elif depth == 0:
                items.append(" ".join(parts + [text[start:m.start()]]))
    return items


def _confidence(item):
    """An item's confidence: 0.5 (neutral) when it names none, NaN and out-of-range ones
    clamped into [0, 1], None when it names one that is not a number ('Confidence': 90%,
    'high'). Such an item is unreadable, as in Visual-RFT, whose json.loads of the answer
    then fails and the answer earns nothing: here the item is dropped, which costs the
    same as not writing it (with no other item, the answer earns nothing either)."""
    key = _CONFIDENCE_KEY.search(item)
    if not key:
        return 0.5
    value = _NUMBER.fullmatch(item[key.end():].split(",", 1)[0].strip())
    if not value:
        return None
    c = _number(value.group(1))
    return 0.0 if math.isnan(c) else min(max(c, 0.0), 1.0)


def parse_detections(text):
    """-> (boxes, confidences, said_no_objects), highest confidence first, every readable
    item of the answer kept (no cap: a 150-box label is scored whole), exact duplicates once.
    An item is a box when it has a readable Position and, if it names one, a readable
    Confidence (see _confidence)."""
    items = []
    for item in detection_items(_clean(text)):
        pos = _POSITION.search(item)
        box = parse_box(pos.group(1)) if pos else None
        c = _confidence(item) if box is not None else None
        if c is not None:
            items.append((c, box))
    items.sort(key=lambda cb: -cb[0])  # stable: ties keep the model's order
    seen, boxes, confs = set(), [], []
    for c, box in items:
        if tuple(box) not in seen:  # exact duplicates count once
            seen.add(tuple(box))
            boxes.append(box)
            confs.append(c)
    no_objects = not boxes and re.sub(r"[^a-z]+", "", text.lower()) == "noobjects"
    return boxes, confs, no_objects


def _area(b):
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _inter_union(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter, _area(a) + _area(b) - inter


def iou(a, b):
    """IoU of two [x1, y1, x2, y2] boxes; a box with x2 < x1 or y2 < y1 has no area."""
    inter, union = _inter_union(a, b)
    return inter / union if union > 0 else 0.0


def giou(a, b):
    """Generalised IoU, in [-1, 1]."""
    inter, union = _inter_union(a, b)
    hull = _area([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
    if hull <= 0 or union <= 0:
        return -1.0
    return inter / union - (hull - union) / hull


def _overlapping(pred, gt):
    """For each prediction, the GT boxes it may match (IoU above IOU_MATCH, with a hair of
    slack; iou() decides), computed by numpy a block of predictions at a time: the cost of
    many boxes is vectorised, not len(pred) x len(gt) Python calls."""
    if len(pred) * len(gt) <= 1024:  # a few boxes: plain Python is faster than numpy's set-up
        return [[g for g, b in enumerate(gt) if iou(p, b) > IOU_MATCH] for p in pred]
    G = np.asarray(gt, dtype=np.float64)[None]                       # [1, m, 4]
    area_g = np.clip(G[..., 2] - G[..., 0], 0, None) * np.clip(G[..., 3] - G[..., 1], 0, None)
    out = []
    with np.errstate(all="ignore"):  # huge coordinates overflow to inf/nan, which match nothing
        for i in range(0, len(pred), 2048):
            P = np.asarray(pred[i:i + 2048], dtype=np.float64)[:, None]  # [b, 1, 4]
            iw = np.clip(np.minimum(P[..., 2], G[..., 2]) - np.maximum(P[..., 0], G[..., 0]), 0, None)
            ih = np.clip(np.minimum(P[..., 3], G[..., 3]) - np.maximum(P[..., 1], G[..., 1]), 0, None)
            area_p = np.clip(P[..., 2] - P[..., 0], 0, None) * np.clip(P[..., 3] - P[..., 1], 0, None)
            inter = iw * ih
            near = inter > (IOU_MATCH - 1e-9) * (area_p + area_g - inter)   # [b, m]
            out += [np.flatnonzero(row).tolist() for row in near]
    return out


def match_boxes(pred, gt):
    """Greedy matching in the given (confidence) order: each prediction takes the
    unmatched GT box of highest IoU; it counts only above IOU_MATCH.
    Returns one IoU per prediction (0 when unmatched)."""
    if not pred or not gt:
        return [0.0] * len(pred)
    free, ious = set(range(len(gt))), []
    for p, near in zip(pred, _overlapping(pred, gt)):
        best, best_iou = None, 0.0
        for g in near:  # ascending, as over all of `free`: ties go to the first GT box
            v = iou(p, gt[g]) if g in free else 0.0
            if v > best_iou:
                best, best_iou = g, v
        if best is not None and best_iou > IOU_MATCH:
            free.discard(best)
            ious.append(best_iou)
        else:
            ious.append(0.0)
    return ious


def detection_reward(text, gt):
    """-> (iou reward, confidence reward) for a detection answer."""
    if text is None:
        return 0.0, 0.0
    boxes, confs, no_objects = parse_detections(text)
    if not gt:  # a negative prompt: only "No Objects" is right
        return (1.0, 1.0) if no_objects else (0.0, 0.0)
    if not boxes:
        return 0.0, 0.0
    ious = match_boxes(boxes, gt)
    iou_r = sum(ious) / max(len(gt), len(boxes))
    conf_r = sum(c if v > 0 else 1.0 - c for c, v in zip(confs, ious)) / len(boxes)
    return iou_r, conf_r


def normalise_label(s):
    """Lower-case, keep letters and digits only: 'Fire_Hydrant.' -> 'firehydrant'."""
    return "".join(ch for ch in s.lower() if ch.isalnum())


def classification_reward(text, label):
    if text is None:
        return 0.0
    got = normalise_label(text)
    return 1.0 if got and got == normalise_label(label) else 0.0


def grounding_reward(text, gt, use_giou=False):
    box = parse_box(text) if text is not None else None
    if box is None:
        return 0.0
    return (giou(box, gt) + 1.0) / 2.0 if use_giou else iou(box, gt)


def score(completion, answer_parts):
    """Named reward components for one completion, each in [0, 1]: the thinking format, then
    `answer_parts(the text inside <answer>, or None)`, the task's own (data.TASKS)."""
    if not isinstance(completion, str):
        completion = ""
    parts = {"think": think_reward(completion), **answer_parts(extract_answer(completion))}
    # a belt to the braces of every reward: none leaves [0, 1], whatever slipped through
    return {k: min(max(v, 0.0), 1.0) if math.isfinite(v) else 0.0 for k, v in parts.items()}
