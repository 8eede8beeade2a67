"""
How long scoring a completion takes (data.score: the think format, then the task's rewards.py
functions) on long completions (issue: well under 10 ms for 4,000 characters). Median of
repeated calls, per task, on well-formed and on adversarial text.

    python bench/rewards_speed.py
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402


def timed(task, text, answer, reps=200):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        data.score(task, text, answer)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    item = '{"Position": [120, 45, 380, 610], "Confidence": 0.87}, '
    think = "<think>" + "The object on the left looks like a bus. " * 85 + "</think>"
    cases = {
        "detection, 4k chars, 18 boxes": ("detection", think + "<answer>[" + item * 18 + "]</answer>",
                                         [[120, 45, 380, 610], [500, 500, 700, 900]]),
        "detection, 4k chars, no tags": ("detection", ("[{'position': [[1, 2, 3, 4]], " * 150)[:4000], [[1, 2, 3, 4]]),
        "detection, 4k chars of '{'": ("detection", "<answer>" + "{" * 4000 + "</answer>", [[1, 2, 3, 4]]),
        "grounding, 4k chars of '['": ("grounding", "<answer>" + "[" * 4000 + "</answer>", [1, 2, 3, 4]),
        "grounding, 4k digits": ("grounding", "<answer>[" + "1" * 4000 + "</answer>", [1, 2, 3, 4]),
        "detection, 4k spaces in a confidence": (
            "detection", '<answer>{"Position": [1, 2, 3, 4], "Confidence": ' + " " * 4000 + "}</answer>", [[1, 2, 3, 4]]),
        "classification, 4k chars": ("classification", think + "<answer>school bus</answer>", "school bus"),
        "grounding, 4k chars": ("grounding", think + "<answer>[120, 45, 380, 610]</answer>", [100, 40, 380, 600]),
        "detection, 100k chars": ("detection", think + "<answer>[" + item * 1800 + "]</answer>", [[120, 45, 380, 610]]),
    }
    print("| completion | characters | median ms |\n|---|---|---|")
    for name, (task, text, answer) in cases.items():
        print(f"| {name} | {len(text)} | {timed(task, text, answer, 20 if len(text) > 10000 else 200):.3f} |")


if __name__ == "__main__":
    main()
