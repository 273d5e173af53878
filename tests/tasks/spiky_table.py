"""A machine-controller-style table with rare sensor glitches: a few readings ~50 scale units out after
standardisation (the issue-11 table that sent MAML to inf, then NaN)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CONFIG = {"name": "table", "task_column": "exp", "target": "target"}


def write_spiky_csv(path: Path, tasks: int = 8, rows: int = 400, seed: int = 0, glitch: float = 250.0) -> Path:
    """Per experiment a smooth regression of three signals; one glitch row in each of two experiments."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["exp", "power", "speed", "feed", "target"])
        for t in range(tasks):
            a = rng.normal(size=3)
            for i in range(rows):
                x = rng.normal(size=3)
                if t == 1 and i == 17:
                    x[0] = glitch
                if t == 6 and i == 40:
                    x[1] = -glitch
                y = float(a @ np.tanh(x)) + 0.05 * rng.normal()
                w.writerow([f"E{t}", *np.round(x, 4), round(y, 4)])
    return path


def write_power_csv(path: Path, tasks: int = 8, rows: int = 60, seed: int = 0) -> Path:
    """A target in the user's own units, far from O(1): spindle power ~5000 W +- a few hundred per experiment."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["exp", "speed", "feed", "depth", "power_w"])
        for t in range(tasks):
            a = rng.normal(size=3)
            for _ in range(rows):
                speed, feed, depth = rng.uniform(2000, 8000), rng.uniform(0.05, 0.3), rng.uniform(0.5, 3.0)
                z = np.array([(speed - 5000) / 1700, (feed - 0.175) / 0.07, (depth - 1.75) / 0.7])
                power = 5000 + 300 * float(a @ np.tanh(z)) + 10 * rng.normal()
                w.writerow([f"E{t}", round(speed, 1), round(feed, 4), round(depth, 3), round(power, 2)])
    return path
