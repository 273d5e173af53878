"""Taillard's JSSP instances (OR-Library format), their best-known bounds and the L2D paper's makespans.

The data directory is always an argument (see ../shared/data/taillard/README.md for its layout).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from shopfloor.instance import JobShopInstance


def read_instance(path: str | Path) -> JobShopInstance:
    """Line 1: `n m`; then per job m pairs `machine duration` in route order (machines from 0)."""
    path = Path(path)
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if not rows or len(rows[0]) != 2:
        raise ValueError(f"{path}: first line must be 'jobs machines'")
    n, m = int(rows[0][0]), int(rows[0][1])
    body = rows[1:]
    if len(body) != n or any(len(r) != 2 * m for r in body):
        raise ValueError(f"{path}: expected {n} job lines of {2 * m} numbers")
    arr = np.array(body, dtype=np.int64)
    return JobShopInstance(arr[:, 0::2], arr[:, 1::2], n_machines=m, name=path.stem)


def load_instances(data_dir: str | Path, names: list[str] | None = None) -> dict[str, JobShopInstance]:
    inst_dir = Path(data_dir) / "instances"
    if not inst_dir.is_dir():
        raise FileNotFoundError(f"no instances/ folder in Taillard data dir {data_dir!r}")
    names = names or sorted(p.stem for p in inst_dir.glob("ta*.txt"))
    return {name: read_instance(inst_dir / f"{name}.txt") for name in names}


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_bounds(data_dir: str | Path) -> dict[str, dict]:
    """instance -> {jobs, machines, lower_bound, upper_bound (best-known makespan), optimal}."""
    out = {}
    for r in _read_csv(Path(data_dir) / "bounds.csv"):
        out[r["instance"]] = {"jobs": int(r["jobs"]), "machines": int(r["machines"]),
                              "lower_bound": int(r["lower_bound"]), "upper_bound": int(r["upper_bound"]),
                              "optimal": r["optimal"] == "yes"}
    return out


def load_l2d(data_dir: str | Path) -> dict[str, dict]:
    """instance -> the L2D paper's published makespans (rules, learned policies) and the bound it used."""
    out = {}
    for r in _read_csv(Path(data_dir) / "l2d_neurips2020_makespans.csv"):
        out[r["instance"]] = {k: (int(v) if v not in ("", "yes", "no") else v) for k, v in r.items() if k != "instance"}
    return out
