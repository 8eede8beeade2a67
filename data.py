"""
Datasets, prompts and answers for visurf.

A sample is a plain dict:
    task      "detection" | "classification" | "grounding"
    id        where it came from, for error messages ("file.jsonl: record 3")
    image     a path (opened lazily) or a PIL image (synthetic data)
    size      (width, height) of the image after EXIF orientation
    answer    ground truth in ORIGINAL-IMAGE PIXELS: a list of [x1, y1, x2, y2] boxes
              (empty: "No Objects"), one box, or a label string
    query     the category (detection), the referring expression (grounding), the
              question (classification)
    plus      classes (classification), image_id / category_id (COCO, for COCOeval),
              problem / solution (Visual-RFT records: their own question and answer text)

Boxes are converted to and from the model's convention in one place,
`to_model` / `to_pixels`: Qwen2-VL writes 0..1000 of the original width and height,
Qwen2.5-VL writes pixels of the image its processor resized. The convention a
completion is written and scored in is the one its prompt asks for
(`prompt_convention`): a Visual-RFT record's own question says 0..1000 for every model.
"""
import collections
import contextlib
import io
import json
import math
import os
import random
import re
import stat

import numpy as np
from PIL import Image, ImageOps
from pycocotools.coco import COCO

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
    """The ground truth in the prompt's convention: what rewards.score compares against."""
    a, size, conv = sample["answer"], sample["size"], prompt_convention(sample, conv)
    if sample["task"] == "detection":
        return [to_model(b, size, conv) for b in a]
    if sample["task"] == "grounding":
        return to_model(a, size, conv)
    return a


# ----------------------------------------------------------------------------
# Prompts and answers

def answer_style(sample):
    """How the prompt's example writes an answer. Ours: double-quoted keys, [x1, y1, x2, y2].
    A record's own question may show single-quoted keys (Visual-RFT detection) or
    (x1,y1),(x2,y2) (Visual-RFT's LISA grounding); rule 1 follows what it shows."""
    p = (sample.get("problem") or "").replace(" ", "")
    return {"quote": "'" if "'Position'" in p else '"', "pairs": "(x1,y1),(x2,y2)" in p}


def format_answer(task, value, confidences=None, style=None):
    """The text inside <answer></answer>. The prompt's example and the ground truth
    (rule 1) both come from here, so they share keys, quotes and spacing."""
    style = style or {"quote": '"', "pairs": False}
    if task == "detection":
        if not value:
            return "No Objects"
        confidences = confidences or [1.0] * len(value)
        item = "{%(q)sPosition%(q)s: [%%s], %(q)sConfidence%(q)s: %%s}" % {"q": style["quote"]}
        return "[" + ", ".join(item % (", ".join(str(v) for v in box), c if isinstance(c, str) else f"{c:.2f}")
                               for box, c in zip(value, confidences)) + "]"
    if task == "grounding":
        if style["pairs"]:
            return "(%s,%s),(%s,%s)" % tuple(value)
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def dataset_answer(sample, conv):
    """The same answer as the dataset itself writes it: a Visual-RFT record's own solution,
    else compact JSON (no spaces) in the prompt's coordinates, or the bare label."""
    if sample.get("solution"):
        own = rewards.extract_answer(sample["solution"])
        return sample["solution"].strip() if own is None else own
    answer, compact = model_answer(sample, conv), dict(separators=(",", ":"))
    if sample["task"] == "detection":
        return json.dumps([{"Position": b, "Confidence": 1} for b in answer], **compact) if answer else "No Objects"
    return json.dumps(answer, **compact) if sample["task"] == "grounding" else str(answer)


def gt_completion(sample, conv, align=True):
    """Rule 1: the label written exactly as a rollout writes its answer. With the rule off,
    the same answer in the dataset's own style, its tags padded with spaces as in
    Visual-RFT's LISA solutions: it earns the same answer reward, only its tokens differ."""
    if not align:
        return "<answer> " + dataset_answer(sample, conv) + " </answer>"
    return "<answer>" + format_answer(sample["task"], model_answer(sample, conv), style=answer_style(sample)) + "</answer>"


def prompt_text(sample, conv):
    """Our question, with the format it expects. A record's own question (Visual-RFT's
    `problem`) already carries its format and example, so it is used verbatim."""
    if sample.get("problem"):
        return sample["problem"]
    task, coords = sample["task"], COORDS[conv.family]
    if task == "detection":
        example = format_answer(task, [["x1", "y1", "x2", "y2"]], ["0.90"])
        ask = (f"Detect every {sample['query']} in the image. Give each as a bounding box "
               f"[x1, y1, x2, y2] in {coords}, with a confidence from 0 to 1 with two decimals. "
               f"If there is no {sample['query']}, answer No Objects.")
    elif task == "grounding":
        example = format_answer(task, ["x1", "y1", "x2", "y2"])
        ask = f"Locate {sample['query']} and give its bounding box [x1, y1, x2, y2] in {coords}."
    else:
        example = "label"
        classes = sample.get("classes") or []
        ask = sample["query"]
        if 0 < len(classes) <= 30:  # longer lists cost more prompt than they help
            ask += " Answer with one of: " + ", ".join(classes) + "."
    return ask + " " + THINK.format(example=example)


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
        # integers: 16-bit range unless larger; floats: 0..1 unless larger; else their maximum
        fits = px.max() <= (1.0 if im.mode == "F" else 65535.0)
        top = (1.0 if im.mode == "F" else 65535.0) if fits else px.max()
        im = Image.fromarray(np.clip(px / top * 255.0, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB")


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
    """n deterministic samples. Train and eval draw from disjoint seeds; `shift` is an
    out-of-distribution variant (circles, other background) for generalisation tests."""
    rng = np.random.default_rng([seed, {"train": 0, "eval": 1}[split], int(shift)])
    names, out = list(COLOURS), []
    for i in range(n):
        s = {"task": task, "id": f"synthetic {split}: record {i}"}
        if task == "classification":
            size, colour = (56, 56), names[i % len(names)]  # balanced classes
            shapes = [(colour, _place(rng, size, 1, 20, 40)[0])]
            s.update(answer=colour, query="What colour is the shape?", classes=names)
        else:
            size = (112, 112)
            k = int(rng.integers(1, 4))
            shapes = list(zip(rng.choice(names, k, replace=False).tolist(), _place(rng, size, k, 20, 40)))
            if task == "detection":
                present = i % 4 != 3  # every fourth prompt asks for an absent colour
                absent = [c for c in names if c not in dict(shapes)]
                target = shapes[int(rng.integers(k))][0] if present else absent[int(rng.integers(len(absent)))]
                s.update(answer=[b for c, b in shapes if c == target], query=f"{target} shape",
                         image_id=i, category_id=names.index(target) + 1)
            else:
                target, box = shapes[int(rng.integers(k))]
                s.update(answer=box, query=f"the {target} shape")
        s.update(image=_draw(rng, size, shapes, shift), size=size)
        out.append(s)
    return out


def restrict(samples, colours):
    """Synthetic samples about `colours` only (classification: the class list shrinks too)."""
    colours = [c.strip() for c in colours]
    for c in colours:
        if c not in COLOURS:
            raise DataError(f"--categories: {c!r} is not a synthetic colour ({', '.join(COLOURS)})")
    colour = lambda s: s["answer"] if s["task"] == "classification" else s["query"].split()[-2]
    out = [dict(s, classes=colours) if s["task"] == "classification" else s
           for s in samples if colour(s) in colours]
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


def _parse_solution(solution, size):
    """A Visual-RFT solution ('<answer>...</answer>', boxes in 0..1000) -> (task, pixel answer).
    Detection lists and 'No Objects' are detection; one box, [x1, y1, x2, y2] or LISA's
    (x1,y1),(x2,y2), is grounding; anything that looks like boxes but can't be read is an
    error, never a class label."""
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
        return "detection", [_check_box(to_px(b), size) for b in boxes]
    box = rewards.parse_box(text)
    if box is not None and "position" not in text.lower():
        return "grounding", _check_box(to_px(box), size)
    if _LOOKS_LIKE_BOXES.search(text):
        raise DataError(f"solution {text[:80]!r} looks like boxes but cannot be read")
    if not text:
        raise DataError("empty solution")
    return "classification", text


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
        task, answer = _parse_solution(solution, s["size"])
        quoted = re.search(r"""category ['"]([^'"]{1,60})['"]""", problem)  # "...the category 'dog'..."
        query = _text_field(r, "category") if "category" in r else \
            quoted.group(1) if quoted and task == "detection" else problem
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
