"""
Datasets, prompts and answers for visurf.

A sample is a plain dict:
    task      a name in TASKS: "classification", "detection", "grounding" (one entry each)
    id        where it came from, for error messages ("file.jsonl: record 3")
    image     a path (opened lazily) or a PIL image (synthetic data)
    size      (width, height) of the image after EXIF orientation
    answer    ground truth in ORIGINAL-IMAGE PIXELS: a list of [x1, y1, x2, y2] boxes
              (empty: "No Objects"), one box, or a label string
    query     the category (detection), the referring expression (grounding), the
              question (classification)
    plus      classes (classification), image_id / category_id (COCO, for COCOeval),
              colour (synthetic: the colour the prompt is about),
              problem / solution (Visual-RFT records: their own question and answer text)

Boxes are converted to and from the model's convention in one place,
`to_model` / `to_pixels`: Qwen2-VL writes 0..1000 of the original width and height,
Qwen2.5-VL writes pixels of the image its processor resized. The convention a
completion is written and scored in is the one its prompt asks for
(`prompt_convention`): a Visual-RFT record's own question says 0..1000 for every model.
"""
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import stat
from typing import Callable

import numpy as np
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import rewards

MAX_PIXELS, MIN_PIXELS = 401408, 3136  # 512*28*28 (Visual-RFT), 56*56 (processor default)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# The style the ground truth is rendered in (rule 1) and the prompt shows.
THINK = ("Output the thinking process in <think> </think> and the final answer in "
         "<answer> </answer> tags, i.e., <think> reasoning here </think><answer>{example}</answer>")
COORDS = {"qwen2_vl": "integers from 0 to 1000, relative to the image width and height",
          "qwen2_5_vl": "integer pixel coordinates"}

Convention = collections.namedtuple("Convention", "family min_pixels max_pixels")


class DataError(Exception):
    """Bad input data; the message names the file, the record and the problem."""


# ----------------------------------------------------------------------------
# Coordinates: the one place where pixels meet the model's convention

def box_scale(size, conv):
    """(sx, sy) with model_coordinate = pixel * s."""
    w, h = size
    if conv.family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        rh, rw = smart_resize(h, w, factor=28, min_pixels=conv.min_pixels, max_pixels=conv.max_pixels)
        return rw / w, rh / h
    return 1000.0 / w, 1000.0 / h


def to_model(box, size, conv):
    sx, sy = box_scale(size, conv)
    return [round(v * s) for v, s in zip(box, (sx, sy, sx, sy))]


def to_pixels(box, size, conv):
    sx, sy = box_scale(size, conv)
    return [v / s for v, s in zip(box, (sx, sy, sx, sy))]


def prompt_convention(sample, conv):
    """The coordinates this sample's completions are written and scored in: what its prompt
    asks for. Our prompts ask for the model family's own; a record's own question
    (Visual-RFT's `problem`) says "between 0 and 1000" for every model, Qwen2.5-VL
    included, so it is scored in Qwen2-VL's 0..1000 (SPEC §4)."""
    return conv._replace(family="qwen2_vl") if sample.get("problem") else conv


def model_answer(sample, conv):
    """The ground truth in the prompt's convention: what the task's reward compares against."""
    size, conv = sample["size"], prompt_convention(sample, conv)
    return task_of(sample).boxes(sample["answer"], lambda b: to_model(b, size, conv))


# ----------------------------------------------------------------------------
# Prompts and answers

def answer_style(sample):
    """How the prompt's example writes an answer. Ours: double-quoted keys, [x1, y1, x2, y2].
    A record's own question may show single-quoted keys (Visual-RFT detection) or
    (x1,y1),(x2,y2) (Visual-RFT's LISA grounding); rule 1 follows what it shows."""
    p = (sample.get("problem") or "").replace(" ", "")
    return {"quote": "'" if "'Position'" in p else '"', "pairs": "(x1,y1),(x2,y2)" in p}


def format_answer(task, value, confidences=None, style=None):
    """The text inside <answer></answer>, as the task writes it. The prompt's example and the
    ground truth (rule 1) both come from here, so they share keys, quotes and spacing."""
    return TASKS[task].write(value, style or {"quote": '"', "pairs": False}, confidences)


def dataset_answer(sample, conv):
    """The same answer as the dataset itself writes it: a Visual-RFT record's own solution,
    else the task's plain style (compact JSON, no spaces) in the prompt's coordinates."""
    if sample.get("solution"):
        own = rewards.extract_answer(sample["solution"])
        return sample["solution"].strip() if own is None else own
    return task_of(sample).plain(model_answer(sample, conv))


def gt_completion(sample, conv, align=True):
    """Rule 1: the label written exactly as a rollout writes its answer. With the rule off,
    the same answer in the dataset's own style, its tags padded with spaces as in
    Visual-RFT's LISA solutions: it earns the same answer reward, only its tokens differ."""
    if not align:
        return "<answer> " + dataset_answer(sample, conv) + " </answer>"
    return "<answer>" + format_answer(sample["task"], model_answer(sample, conv), style=answer_style(sample)) + "</answer>"


def prompt_text(sample, conv):
    """The task's question, with the format it expects. A record's own question (Visual-RFT's
    `problem`) already carries its format and example, so it is used verbatim."""
    if sample.get("problem"):
        return sample["problem"]
    task = task_of(sample)
    return task.ask(sample, COORDS[conv.family]) + " " + THINK.format(example=task.example)


def score(sample, completion, answer, giou=False):
    """Named reward components of one completion, each in [0, 1] (rewards.score): the thinking
    format, then the answer's parts as the sample's task rewards them. `sample`: a sample, or
    a task's name."""
    task = TASKS[sample] if isinstance(sample, str) else task_of(sample)
    return rewards.score(completion, lambda text: task.reward(text, answer, giou=giou))


def messages(sample, conv):
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": prompt_text(sample, conv)}]}]


def open_image(sample):
    """RGB, EXIF orientation applied. Paths (and embedded bytes) are decoded only when needed.
    An image that was readable at load and is not now (deleted, replaced) is a DataError
    naming it, never an error about the output folder."""
    img = sample["image"]
    if isinstance(img, Image.Image):
        return img
    name = "embedded image" if isinstance(img, bytes) else img
    try:
        if not isinstance(img, bytes):
            _regular_file(img, "image")
        with Image.open(io.BytesIO(img) if isinstance(img, bytes) else img) as im:
            return to_rgb(ImageOps.exif_transpose(im))
    except DataError as e:
        raise DataError(f"{sample['id']}: {e} (it was there when the data was loaded)")
    except Exception as e:
        raise DataError(f"{sample['id']}: cannot read image {name} any more ({_first_line(e)}); "
                        f"it was readable when the data was loaded")


def to_rgb(im):
    """8-bit RGB from any mode: 16-bit and float images are scaled, not clipped (PIL's own
    convert would turn a 16-bit PNG near-white); transparency is laid over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        px = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        # each mode's range, unless the values say otherwise: floats 0..1; 16-bit 0..65535; 32-bit
        # integers (mode I) 0..255 when they fit it (an 8-bit image saved as 32-bit), else 0..65535;
        # beyond the range, the image's own maximum
        ranges = [1.0] if im.mode == "F" else [255.0, 65535.0] if im.mode == "I" else [65535.0]
        top = next((r for r in ranges if px.max() <= r), px.max())
        im = Image.fromarray(np.clip(px / top * 255.0, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB")


# ----------------------------------------------------------------------------
# Tasks: each one entry of TASKS, everything about it in one place

@dataclasses.dataclass(frozen=True)
class Task:
    """A task: what its prompt asks and shows, how its answer is written (the prompt's example
    and the label, rule 1), where its coordinates are, how an answer is rewarded and how the
    task is evaluated. Adding a task is one more entry in TASKS plus its reward function
    (docs/adding-a-task.md)."""
    ask: Callable       # (sample, coordinate wording) -> the question, before the format instruction
    example: str        # the answer the prompt shows as its format
    write: Callable     # (answer, style, confidences) -> the text inside <answer></answer> (rule 1)
    plain: Callable     # answer -> the same answer in the dataset's own compact style (rule 1 off)
    reward: Callable    # (answer text or None, answer, giou=...) -> {component: value in [0, 1]}
    metrics: Callable   # (samples, answer texts or None, conv, info, out_dir) -> {metric: value}
    headline: tuple     # the metrics a run prints and draws, the one it is judged by first
    boxes: Callable = lambda answer, f: answer  # f applied to each box of an answer (coordinates)
    make: Callable = None  # (rng, i) -> (sample fields, image size, [(colour, box)]): built-in data


def task_of(sample):
    """A sample's Task; an unknown one is a DataError, never another task's branch."""
    if sample.get("task") not in TASKS:
        raise DataError(f"{sample.get('id', 'a sample')}: unknown task {sample.get('task')!r} (known: {', '.join(TASKS)})")
    return TASKS[sample["task"]]


def parse_failure_rate(answers):
    return float(np.mean([a is None or not a for a in answers]))


# classification: a label, rewarded by exact match after normalisation

def classification_question(sample, coords):
    classes = sample.get("classes") or []
    if 0 < len(classes) <= 30:  # longer lists cost more prompt than they help
        return sample["query"] + " Answer with one of: " + ", ".join(classes) + "."
    return sample["query"]


def classification_metrics(samples, answers, conv, info=None, out_dir=None):
    ok = [rewards.classification_reward(a, s["answer"]) for a, s in zip(answers, samples)]
    return {"accuracy": float(np.mean(ok)), "parse_failure_rate": parse_failure_rate(answers)}


def one_shape(rng, i):
    """The synthetic classification prompt: what colour is the one shape (balanced classes)?"""
    size, names = (56, 56), list(COLOURS)
    colour = names[i % len(names)]
    shapes = [(colour, _place(rng, size, 1, 20, 40)[0])]
    return dict(answer=colour, query="What colour is the shape?", classes=names, colour=colour), size, shapes


# detection: a list of boxes with confidences, or "No Objects"; rewarded by IoU and confidence

def detection_question(sample, coords):
    q = sample["query"]
    return (f"Detect every {q} in the image. Give each as a bounding box [x1, y1, x2, y2] in {coords}, "
            f"with a confidence from 0 to 1 with two decimals. If there is no {q}, answer No Objects.")


def write_detections(boxes, style, confidences=None):
    if not boxes:
        return "No Objects"
    confidences = confidences or [1.0] * len(boxes)
    item = "{%(q)sPosition%(q)s: [%%s], %(q)sConfidence%(q)s: %%s}" % {"q": style["quote"]}
    return "[" + ", ".join(item % (", ".join(str(v) for v in box), c if isinstance(c, str) else f"{c:.2f}")
                           for box, c in zip(boxes, confidences)) + "]"


def plain_detections(boxes):
    return json.dumps([{"Position": b, "Confidence": 1} for b in boxes], separators=(",", ":")) if boxes else "No Objects"


def detection_metrics(samples, answers, conv, info=None, out_dir=None):
    """COCO mAP as Visual-RFT reports it: the mean over the evaluated categories of each
    category's AP (IoU .50:.95, all areas, 100 detections), from pycocotools."""
    coco = (info or {}).get("coco") or coco_from_samples(samples)
    results, failures = [], 0
    for a, s in zip(answers, samples):
        boxes, confs, no_objects = rewards.parse_detections(a) if a else ([], [], False)
        failures += not (boxes or no_objects)
        for b, c in zip(boxes, confs):
            x1, y1, x2, y2 = to_pixels(b, s["size"], prompt_convention(s, conv))
            results.append({"image_id": s["image_id"], "category_id": s["category_id"],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": c})
    if out_dir:
        with open(os.path.join(out_dir, "coco_results.json"), "w") as f:
            json.dump(results, f)
    cat_ids, img_ids = sorted({s["category_id"] for s in samples}), sorted({s["image_id"] for s in samples})
    per_cat = {}
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            E = COCOeval(coco, coco.loadRes(results), "bbox")
            E.params.imgIds, E.params.catIds = img_ids, cat_ids
            E.evaluate()
            E.accumulate()
        prec = E.eval["precision"]                       # [IoU, recall, category, area, maxDets]
        for k, c in enumerate(cat_ids):
            p, p50 = prec[:, :, k, 0, -1], prec[0, :, k, 0, -1]
            if (p > -1).any():  # -1: the category has no ground truth here
                per_cat[coco.cats[c]["name"]] = (float(p[p > -1].mean()), float(p50[p50 > -1].mean()))
    else:  # nothing predicted: every category with ground truth here scores 0
        per_cat = {coco.cats[c]["name"]: (0.0, 0.0) for c in cat_ids
                   if coco.getAnnIds(imgIds=img_ids, catIds=[c], iscrowd=False)}
    aps = list(per_cat.values())
    return {"mAP": 100 * float(np.mean([a for a, _ in aps])) if aps else 0.0,
            "AP50": 100 * float(np.mean([a for _, a in aps])) if aps else 0.0,
            "per_category": {k: 100 * v[0] for k, v in per_cat.items()},
            "parse_failure_rate": failures / len(samples)}


def coco_from_samples(samples):
    """A pycocotools ground truth for samples that did not come from a COCO file."""
    images, anns, cats = {}, [], {}
    for s in samples:
        images[s["image_id"]] = {"id": s["image_id"], "width": s["size"][0], "height": s["size"][1]}
        cats[s["category_id"]] = {"id": s["category_id"], "name": s["query"]}
        for x1, y1, x2, y2 in s["answer"]:
            anns.append({"id": len(anns) + 1, "image_id": s["image_id"], "category_id": s["category_id"],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": list(images.values()), "annotations": anns, "categories": list(cats.values())}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection_scene(rng, i):
    """The synthetic detection prompt: every box of one colour; every fourth asks for an absent one."""
    size, shapes = _scene(rng)
    names, present = list(COLOURS), i % 4 != 3
    absent = [c for c in names if c not in dict(shapes)]
    target = shapes[int(rng.integers(len(shapes)))][0] if present else absent[int(rng.integers(len(absent)))]
    return (dict(answer=[b for c, b in shapes if c == target], query=f"{target} shape", image_id=i,
                 category_id=names.index(target) + 1, colour=target), size, shapes)


# grounding: one box; rewarded by IoU (or GIoU)

def write_box(box, style, confidences=None):
    return "(%s,%s),(%s,%s)" % tuple(box) if style["pairs"] else "[" + ", ".join(str(v) for v in box) + "]"


def grounding_metrics(samples, answers, conv, info=None, out_dir=None):
    boxes = [rewards.parse_box(a) if a else None for a in answers]
    ious = [rewards.iou(to_pixels(b, s["size"], prompt_convention(s, conv)), s["answer"]) if b else 0.0
            for b, s in zip(boxes, samples)]
    return {"mIoU": float(np.mean(ious)), "acc@0.5": float(np.mean([v >= 0.5 for v in ious])),
            "parse_failure_rate": float(np.mean([b is None for b in boxes]))}


def grounding_scene(rng, i):
    """The synthetic grounding prompt: the box of one of the shapes, named by its colour."""
    size, shapes = _scene(rng)
    target, box = shapes[int(rng.integers(len(shapes)))]
    return dict(answer=box, query=f"the {target} shape", colour=target), size, shapes


TASKS = {
    "classification": Task(
        ask=classification_question, example="label", write=lambda label, style, c=None: str(label), plain=str,
        reward=lambda text, label, **_: {"accuracy": rewards.classification_reward(text, label)},
        metrics=classification_metrics, headline=("accuracy",), make=one_shape),
    "detection": Task(
        ask=detection_question, example=write_detections([["x1", "y1", "x2", "y2"]], {"quote": '"'}, ["0.90"]),
        write=write_detections, plain=plain_detections,
        reward=lambda text, boxes, **_: dict(zip(("iou", "confidence"), rewards.detection_reward(text, boxes))),
        metrics=detection_metrics, headline=("mAP", "AP50"),
        boxes=lambda boxes, f: [f(b) for b in boxes], make=detection_scene),
    "grounding": Task(
        ask=lambda s, coords: f"Locate {s['query']} and give its bounding box [x1, y1, x2, y2] in {coords}.",
        example=write_box(["x1", "y1", "x2", "y2"], {"pairs": False}),
        write=write_box, plain=lambda box: json.dumps(box, separators=(",", ":")),
        reward=lambda text, box, giou=False: {"iou": rewards.grounding_reward(text, box, giou)},
        metrics=grounding_metrics, headline=("mIoU", "acc@0.5"), boxes=lambda box, f: f(box), make=grounding_scene),
}


# ----------------------------------------------------------------------------
# The built-in synthetic task: coloured shapes on a noisy background

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "purple": (150, 50, 190), "white": (245, 245, 245)}


def _draw(rng, size, shapes, shift):
    """shapes: [(colour, box)]; shift draws circles on a brighter, noisier background."""
    w, h = size
    base, noise = (160, 40) if shift else (110, 20)
    px = np.clip(rng.normal(base, noise, (h, w, 3)), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    for colour, (x1, y1, x2, y2) in shapes:
        if shift:
            cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
            inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
        else:
            inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
        px[inside] = COLOURS[colour]
    return Image.fromarray(px.astype(np.uint8))


def _place(rng, size, n, lo, hi):
    """n non-overlapping squares inside the image."""
    boxes = []
    while len(boxes) < n:
        s = int(rng.integers(lo, hi + 1))
        x, y = int(rng.integers(0, size[0] - s + 1)), int(rng.integers(0, size[1] - s + 1))
        b = [x, y, x + s, y + s]
        if all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in boxes):
            boxes.append(b)
    return boxes


def synthetic(task, n, seed, split="train", shift=False):
    """n deterministic samples of a task's built-in data (its `make`). Train and eval draw from
    disjoint seeds; `shift` is an out-of-distribution variant (circles, other background) for
    generalisation tests."""
    make = TASKS[task].make if task in TASKS else None
    if make is None:
        raise DataError(f"task {task!r} has no built-in synthetic data ({', '.join(t for t in TASKS if TASKS[t].make)} "
                        f"have): pass --data" if task in TASKS else f"unknown task {task!r} (known: {', '.join(TASKS)})")
    rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split], int(shift)])
    out = []
    for i in range(n):
        fields, size, shapes = make(rng, i)
        out.append(dict(task=task, id=f"synthetic {split}: record {i}", **fields,
                        image=_draw(rng, size, shapes, shift), size=size))
    return out


def _scene(rng):
    """One to three shapes of different colours in a 112x112 image: [(colour, box)]."""
    size, names = (112, 112), list(COLOURS)
    k = int(rng.integers(1, 4))
    return size, list(zip(rng.choice(names, k, replace=False).tolist(), _place(rng, size, k, 20, 40)))


def restrict(samples, colours):
    """Synthetic samples about `colours` only (a class list shrinks too)."""
    colours = [c.strip() for c in colours]
    for c in colours:
        if c not in COLOURS:
            raise DataError(f"--categories: {c!r} is not a synthetic colour ({', '.join(COLOURS)})")
    out = [dict(s, classes=colours) if "classes" in s else s for s in samples if s["colour"] in colours]
    if not out:
        raise DataError("--categories: no synthetic samples left")
    return out


# ----------------------------------------------------------------------------
# Loading real data: every record is checked when loaded

def _first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__


def _regular_file(path, what):
    """A path that exists and is a plain file: a FIFO would block the reader forever, a
    device would stream without end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}")
    except OSError as e:
        raise DataError(f"cannot read {what} {path} ({e.strerror or e})")
    if stat.S_ISDIR(mode):
        raise DataError(f"{what} path is a folder: {path}")
    if not stat.S_ISREG(mode):
        raise DataError(f"{what} {path} is not a regular file (a FIFO, a device or a socket)")


def _check_processable(w, h, name):
    """Whatever the Qwen2-VL image processor would refuse at some step, refused at load:
    its own smart_resize makes its checks (an aspect ratio over 200 raises; the pixel
    bounds only scale the image, so the defaults stand for any --min/--max-pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    try:
        smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    except Exception as e:
        raise DataError(f"image {name} ({w}x{h}): the Qwen2-VL image processor refuses it ({_first_line(e)})")


def _image_size(image):
    """(w, h) after EXIF rotation of a path or embedded bytes. The image is decoded once
    (at reduced scale where the format allows), so a truncated or corrupt file fails here,
    when the data is loaded, not at some step of training; nothing is kept. So does an
    image the processor would refuse."""
    name = "embedded image" if isinstance(image, bytes) else image
    if not isinstance(image, bytes):
        _regular_file(image, "image")
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))  # JPEG: decode at 1/8
            im.load()
    except FileNotFoundError:
        raise DataError(f"image not found: {name}")
    except IsADirectoryError:
        raise DataError(f"image path is a folder: {name}")
    except Exception as e:
        raise DataError(f"cannot read image {name}: {_first_line(e)}")
    _check_processable(w, h, name)
    return w, h


def _check_box(box, size):
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise DataError(f"box {box!r} is not four numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"box {list(box)} is degenerate (needs x2 > x1 and y2 > y1)")
    w, h = size
    if x1 < -1 or y1 < -1 or x2 > w + 1 or y2 > h + 1:  # one pixel of rounding slack
        raise DataError(f"box {list(box)} lies outside the {w}x{h} image")
    return [max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)]


def _read_json(path):
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not an error
            return json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})")
    except RecursionError:
        raise DataError(f"{path}: malformed JSON (nested too deeply)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: line {getattr(e, 'lineno', '?')}: malformed JSON ({getattr(e, 'msg', e)})")


def _read_records(path, data=None):
    """JSON list (already parsed as `data`, if given) or JSONL -> [(where, record)]."""
    if path.endswith(".jsonl"):
        try:
            with open(path, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
        out = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    out.append((f"{path}: line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: malformed JSON ({e.msg})")
                except RecursionError:
                    raise DataError(f"{path}: line {n}: malformed JSON (nested too deeply)")
        return out
    data = _read_json(path) if data is None else data
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records or a COCO/LVIS instances file")
    return [(f"{path}: record {i}", r) for i, r in enumerate(data)]


def _hf_files(path):
    """Parquet files of a Hugging Face dataset: the file itself, or every one in the folder."""
    if path.endswith(".parquet"):
        return [path]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".parquet"))


def is_hf_dataset(path):
    return path.endswith(".parquet") or os.path.isdir(path) and (
        any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        or bool(_hf_files(path)))


def _read_hf(path):
    """Visual-RFT's released data: a `save_to_disk` folder or parquet file(s) of
    {image, problem, solution} whose `image` column holds the image itself (SPEC §5).
    Read through the optional `datasets` package; the images stay encoded until used."""
    try:
        import datasets
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: a Hugging Face dataset; reading it needs the datasets package "
                        f"(pip install datasets)")
    try:
        if _hf_files(path) and not os.path.exists(os.path.join(path, "dataset_dict.json")) \
                and not os.path.exists(os.path.join(path, "state.json")):
            table = pyarrow.concat_tables([pyarrow.parquet.read_table(f) for f in _hf_files(path)])
        else:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds)) if len(ds) == 1 else None
                if split is None:
                    raise DataError(f"{path}: splits {sorted(ds)} and none is 'train'")
                ds = ds[split]
            table = ds.with_format("arrow")[:]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read as a Hugging Face dataset ({str(e).splitlines()[0][:200]})")
    missing = {"image", "problem", "solution"} - set(table.column_names)
    if missing:
        raise DataError(f"{path}: columns {sorted(table.column_names)}; needs image, problem and solution")
    rows = table.select(["image", "problem", "solution"]).to_pylist()
    for r in rows:  # the Image feature stores {"bytes": PNG/JPEG bytes, "path": ...}
        if isinstance(r["image"], dict):
            r["image"] = r["image"].get("bytes") or r["image"].get("path")
    return [(f"{path}: row {i}", r) for i, r in enumerate(rows)]


_LOOKS_LIKE_BOXES = re.compile(r"""position|[\[(]\s*["']?[-+]?\d+(?:\.\d*)?["']?\s*,|^\s*[\[{]""", re.I)


def _parse_solution(solution, size, problem):
    """A Visual-RFT record's solution ('<answer>...</answer>', boxes in 0..1000) and problem ->
    (task, pixel answer, query). Detection lists and 'No Objects' are detection, about the
    category its problem names ("...the category 'dog'..."); one box, [x1, y1, x2, y2] or LISA's
    (x1,y1),(x2,y2), is grounding; anything that looks like boxes but can't be read is an
    error, never a class label. The query of the others is the problem itself."""
    text = rewards.extract_answer(solution)
    text = solution.strip() if text is None else text
    w, h = size
    to_px = lambda b: [b[0] * w / 1000, b[1] * h / 1000, b[2] * w / 1000, b[3] * h / 1000]
    boxes, _, no_objects = rewards.parse_detections(text)
    items = len(rewards.detection_items(text))
    if boxes and len(boxes) < items:  # the label must keep every box it lists
        raise DataError(f"solution {text[:80]!r}: {items - len(boxes)} of its {items} items cannot be read "
                        f"(or repeat a box)")
    if boxes or no_objects:
        quoted = re.search(r"""category ['"]([^'"]{1,60})['"]""", problem)
        return "detection", [_check_box(to_px(b), size) for b in boxes], quoted.group(1) if quoted else problem
    box = rewards.parse_box(text)
    if box is not None and "position" not in text.lower():
        return "grounding", _check_box(to_px(box), size), problem
    if _LOOKS_LIKE_BOXES.search(text):
        raise DataError(f"solution {text[:80]!r} looks like boxes but cannot be read")
    if not text:
        raise DataError("empty solution")
    return "classification", text, problem


def _text_field(r, key):
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        v = str(v)  # a numeric class id
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"'{key}' must be a non-empty string (got {v!r:.60})")
    return v.strip()


def _record(where, r, root, classes):
    """One {image, ...} record -> sample. Visual-RFT's notebook names the image `image_path`."""
    if not isinstance(r, dict) or not ({"image", "image_path"} & set(r)):
        raise DataError("not a record with an 'image' (or 'image_path') field")
    image = r["image"] if "image" in r else r["image_path"]
    if not isinstance(image, (str, bytes)) or not image:
        raise DataError(f"'image' must be a path (got {image!r:.60})")
    if isinstance(image, str):
        image = os.path.join(root, image)
    s = {"id": where, "image": image, "size": _image_size(image)}
    if "solution" in r:  # Visual-RFT: {image, problem, solution}
        solution, problem = _text_field(r, "solution"), _text_field(r, "problem")
        task, answer, query = _parse_solution(solution, s["size"], problem)
        query = _text_field(r, "category") if "category" in r else query
        s.update(task=task, answer=answer, solution=solution, problem=problem, query=str(query))
    elif "bbox" in r:  # grounding: {image, expression, bbox}
        s.update(task="grounding", answer=_check_box(r["bbox"], s["size"]), query=_text_field(r, "expression"))
    elif "label" in r:  # classification: {image, label}
        label = _text_field(r, "label")
        if classes is not None and label not in classes:
            raise DataError(f"label {label!r} is not in the class list")
        s.update(task="classification", answer=label, query="What is the category of the main object in the image?")
    else:
        raise DataError("record needs 'solution', 'bbox' or 'label'")
    return _learnable(s)


def _learnable(s):
    """A label must earn the full answer reward against itself: one that cannot (a label with no
    letter or digit, one holding <answer> tags) would make rule 3 fire on every group, A_y = 0,
    and nothing would be learnt from it. -> s, or a DataError saying so."""
    conv = Convention("qwen2_vl", MIN_PIXELS, MAX_PIXELS)
    label = gt_completion(s, conv)
    short = {k: v for k, v in score(s, label, model_answer(s, conv)).items() if k != "think" and v < 1.0}
    if short:
        k, v = next(iter(short.items()))
        raise DataError(f"its label, written {label!r:.80}, earns {k} {v:.2f} of 1 against itself: nothing could be "
                        f"learnt from it (a label needs a letter or a digit, and no <answer> tags)")
    return s


def _guard(where, fn, skip_bad, skipped):
    """Run fn(); a DataError names `where` and either stops or, with --skip-bad, warns."""
    try:
        return fn()
    except DataError as e:
        msg = f"{where}: {e}"
        if not skip_bad:
            raise DataError(msg)
        print(f"warning: skipped {msg}")
        skipped.append(msg)
        return None


def _few_shot(samples, key, shots, seed):
    """Keep `shots` samples per key(sample), chosen deterministically from the seed."""
    groups = collections.defaultdict(list)
    for s in samples:
        groups[key(s)].append(s)
    out = []
    for k in sorted(groups):
        g = groups[k]
        random.Random(f"{seed}:{k}").shuffle(g)
        out += g[:shots]
    return out


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Every field of a COCO/LVIS file that visurf or pycocotools reads, and what it must be
# ('?': may be absent). Ids are integers and names text: anything else breaks the index
# silently, or pycocotools with a traceback.
FIELD_TYPES = {
    "int": ("an integer", _is_int),
    "name": ("a name", lambda v: isinstance(v, str) and bool(v.strip())),
    "path": ("a file name", lambda v: isinstance(v, str) and bool(v.strip())),
    "number": ("a number", _is_number),
    "flag": ("0 or 1", lambda v: _is_int(v) and v in (0, 1)),
    "bbox": ("four numbers [x, y, width, height]", lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v))),
}
COCO_FIELDS = {
    "categories": {"id": "int", "name": "name"},
    "images": {"id": "int", "file_name": "path?", "coco_url": "path?", "width": "number?", "height": "number?"},
    "annotations": {"id": "int", "image_id": "int", "category_id": "int", "bbox": "bbox", "iscrowd": "flag?",
                    "area": "number?"},
}


def _check_fields(x, fields):
    """One COCO/LVIS entry: present, and of its type, field by field."""
    required = [k for k, t in fields.items() if not t.endswith("?")]
    if not isinstance(x, dict) or any(k not in x for k in required):
        raise DataError(f"needs the fields {', '.join(required)}")
    for k, t in fields.items():
        what, ok = FIELD_TYPES[t.rstrip("?")]
        if k in x and not ok(x[k]):
            raise DataError(f"{k} must be {what} (got {x[k]!r:.40})")
    if "file_name" in fields and "file_name" not in x and "coco_url" not in x:
        raise DataError("needs a file_name (or a coco_url)")
    return True


def load_coco(path, data, images, categories=None, shots=None, negatives=0.0, seed=0,
              skip_bad=False, split="train"):
    """COCO or LVIS instances JSON -> detection prompts, one per (image, category).

    train: `shots` images per category (all if None), plus round(negatives * #prompts)
           "No Objects" prompts for selected categories absent from a selected image.
    eval:  every image holding a selected category, asked about every selected category.
    """
    skipped = []
    if not (isinstance(data, dict) and {"images", "annotations", "categories"} <= set(data)):
        raise DataError(f"{path}: not a COCO/LVIS instances file (needs images, annotations, categories)")
    bad_images = set()
    for kind in ("categories", "images", "annotations"):
        if not isinstance(data[kind], list):
            raise DataError(f"{path}: {kind} must be a list")
        kept = []
        for i, x in enumerate(data[kind]):
            if _guard(f"{path}: {kind}[{i}]", lambda: _check_fields(x, COCO_FIELDS[kind]), skip_bad, skipped):
                kept.append(x)
            elif kind == "annotations" and isinstance(x, dict) and _is_int(x.get("image_id")):
                bad_images.add(x["image_id"])  # its image's label would lack a box: skipped with it
        data[kind] = kept
    if bad_images:
        print(f"warning: {path}: skipped image ids {sorted(bad_images)[:10]}"
              f"{' ...' if len(bad_images) > 10 else ''} with the bad annotations")
        data["images"] = [x for x in data["images"] if x["id"] not in bad_images]
    for kind in ("images", "categories"):
        ids = collections.Counter(x["id"] for x in data[kind])
        dup = [i for i, n in ids.items() if n > 1]
        if dup:
            raise DataError(f"{path}: {kind}: id {dup[0]!r} appears {ids[dup[0]]} times")
    for a in data["annotations"]:  # LVIS has no iscrowd; COCOeval wants it
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    by_name = {c["name"]: c["id"] for c in data["categories"]}
    names = [n.strip() for n in categories.split(",")] if categories else sorted(by_name, key=by_name.get)
    for n in names:
        if n not in by_name:
            raise DataError(f"{path}: unknown category {n!r} in --categories")
    cat_ids = [by_name[n] for n in names]

    img_info, boxes = {}, {}
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        where = f"{path}: image id {img_id}"
        fname = info.get("file_name") or os.path.basename(info["coco_url"])

        def check_image():
            p = os.path.join(images, fname)
            size = _image_size(p)
            got = {}
            for a in coco.imgToAnns.get(img_id, []):
                if a["category_id"] in cat_ids and not a.get("iscrowd"):
                    b = a["bbox"]
                    xyxy = [b[0], b[1], b[0] + b[2], b[1] + b[3]]
                    try:
                        got.setdefault(a["category_id"], []).append(_check_box(xyxy, size))
                    except DataError as e:
                        raise DataError(f"annotation id {a.get('id')}: {e}")
            return p, size, got

        if not any(a["category_id"] in cat_ids for a in coco.imgToAnns.get(img_id, [])):
            continue  # images without a selected category are never opened
        r = _guard(where, check_image, skip_bad, skipped)
        if r is not None:
            img_info[img_id] = r[:2]
            boxes[img_id] = r[2]

    def sample(img_id, cat_id):
        p, size = img_info[img_id]
        answer = boxes[img_id].get(cat_id, [])
        name = coco.cats[cat_id]["name"]
        return {"task": "detection", "id": f"{path}: image id {img_id}", "image": p, "size": size,
                "answer": answer, "query": name.replace("_", " "),
                "image_id": img_id, "category_id": cat_id}

    if split == "eval":
        out = [sample(i, c) for i in img_info for c in cat_ids]
    else:
        pos = [sample(i, c) for i in img_info for c in cat_ids if c in boxes[i]]
        if shots:
            pos = _few_shot(pos, lambda s: s["category_id"], shots, seed)
        absent = sorted({(s["image_id"], c) for s in pos for c in cat_ids if c not in boxes[s["image_id"]]})
        random.Random(f"{seed}:negatives").shuffle(absent)
        out = pos + [sample(i, c) for i, c in absent[:round(negatives * len(pos))]]
    return _finish(out, path, skipped, coco=coco, category_ids=cat_ids)


def load_classification_folder(path):
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    records = [(f"{path}: {c}/{f}", {"image": os.path.join(c, f), "label": c})
               for c in classes for f in sorted(os.listdir(os.path.join(path, c)))
               if f.lower().endswith(IMAGE_EXTENSIONS)]
    return records, classes


def load(path, images=None, categories=None, shots=None, negatives=0.0, seed=0, skip_bad=False,
         split="train"):
    """Any supported dataset -> (samples, info). `info` has task, classes, coco, category_ids."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if not (os.path.isdir(path) or os.path.isfile(path)):  # a FIFO would block the reader forever
        raise DataError(f"{path}: not a regular file or folder (a FIFO, a device or a socket)")
    if is_hf_dataset(path):
        records, classes = _read_hf(path), None
        root = images or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    elif os.path.isdir(path):
        records, classes = load_classification_folder(path)
        root = path
    else:
        data = _read_json(path) if path.endswith(".json") else None
        if isinstance(data, dict):
            return load_coco(path, data, images or os.path.dirname(path), categories, shots,
                             negatives, seed, skip_bad, split)
        records, classes = _read_records(path, data), None
        root = images or os.path.dirname(os.path.abspath(path))
    if categories:  # for classification: the class list every label must be in
        classes = [c.strip() for c in categories.split(",")]
    skipped, out = [], []
    for where, r in records:
        s = _guard(where, lambda: _record(where, r, root, classes), skip_bad, skipped)
        if s is not None:
            out.append(s)
    tasks = {s["task"] for s in out}
    if len(tasks) > 1:
        raise DataError(f"{path}: records mix tasks {sorted(tasks)}; use one task per file")
    if negatives:
        raise DataError(f"{path}: --negatives makes 'No Objects' prompts from a COCO/LVIS file; records bring their own")
    if tasks == {"grounding"} and (shots or categories):
        raise DataError(f"{path}: --shots and --categories select by category or class; grounding records have neither")
    if tasks == {"detection"}:
        if categories:  # the selected categories only
            names = [c.strip() for c in categories.split(",")]
            for n in names:
                if n not in {s["query"] for s in out}:
                    raise DataError(f"{path}: no record asks about the category {n!r} (--categories)")
            out = [s for s in out if s["query"] in names]
        if shots:  # K records per category, as for COCO
            out = _few_shot(out, lambda s: s["query"], shots, seed)
        # ids for COCOeval: one image per record, one category per query
        queries = sorted({s["query"] for s in out})
        for i, s in enumerate(out):
            s.update(image_id=i, category_id=1 + queries.index(s["query"]))
    if tasks == {"classification"}:
        classes = classes or sorted({s["answer"] for s in out})
        for s in out:
            s["classes"] = classes
        if shots:
            out = _few_shot(out, lambda s: s["answer"], shots, seed)
    return _finish(out, path, skipped, classes=classes)


def _finish(samples, path, skipped, **info):
    if not samples:
        raise DataError(f"{path}: no samples left after filtering" +
                        (f" ({len(skipped)} bad records skipped)" if skipped else ""))
    if skipped:
        print(f"warning: {path}: skipped {len(skipped)} bad records")
    info.update(task=samples[0]["task"], skipped=len(skipped))
    info.setdefault("classes", samples[0].get("classes"))
    return samples, info
