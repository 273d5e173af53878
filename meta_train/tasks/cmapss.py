"""NASA C-MAPSS turbofan run-to-failure data: remaining useful life (RUL) from few target units.

    task:
      name: cmapss
      data_dir: ../shared/data/cmapss   # required: the folder with {train,test,RUL}_FD00x.txt.gz
      sources: [FD001, FD003, FD004]    # meta-train on these sub-datasets
      target: FD002                     # adapt to this one from K of its training units, test on its test units
      window: 30                        # W cycles per window
      rul_cap: 125                      # piecewise-linear target: min(RUL, cap)
      cap_test_rul: false               # also cap the true RUL of the official test units when scoring
      sensors: [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]
      condition_norm: true              # standardise every sensor per operating condition
      windows_per_unit: 20              # support windows drawn from each of the K support units
      val_every: 5                      # every 5th training unit of a source sub-dataset is meta-val

A task is a sub-dataset (operating conditions x fault modes) with K *units* as its support set: `shots`
counts run-to-failure units, not windows. Support = `windows_per_unit` windows from each of K units;
query = `query` windows from other units of the same sub-dataset. Splits:
- "train": source sub-datasets, their training units except every `val_every`-th (by unit number);
- "val": the same sub-datasets, the held-out units (support and query both from them);
- "test": the target: support from K of its *training* units, query = the last window of its official test
  units (drawn with repetition when query exceeds their number), labelled from `RUL_FD00x`.
So meta-training rehearses exactly what adaptation does: K labelled run-to-failure histories of a
sub-dataset, then prediction on other engines of it. See docs/tasks.md ("C-MAPSS").

Labels are in model units, RUL / rul_cap (the spec's `target_transform` maps them back to cycles).
Preprocessing happens here, not inside the model: a window is [W, sensors] of standardised readings.
`describe()` carries the condition centres and the per-condition statistics so that a device can repeat it.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import from_dict
from ..errors import ConfigError, DataError
from . import TaskBatch
from .common import check_split, shared_data_dir

SUBSETS = ("FD001", "FD002", "FD003", "FD004")
DEFAULT_SENSORS = [2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21]
# The six operating conditions (setting 1, 2, 3) of FD002/FD004 (FD001/FD003 run at the first only).
CONDITIONS = np.array([[0, 0.0, 100], [10, 0.25, 100], [20, 0.70, 100], [25, 0.62, 60], [35, 0.84, 100],
                       [42, 0.84, 100]], dtype=np.float64)
# Settings are scaled by these before the nearest-centre assignment, so each axis spans about 1; the
# farthest row of the eight train/test files is 0.0024 from its centre in these units; the closest two
# centres are 0.17 apart.
SETTING_SCALE = np.array([42.0, 0.84, 40.0])
MAX_CONDITION_DISTANCE = 0.05
COLUMNS = 26  # unit, cycle, 3 settings, 21 sensors


@dataclass
class CMAPSSOptions:
    data_dir: str = ""
    sources: list[str] = field(default_factory=lambda: ["FD001", "FD003", "FD004"])
    target: str = "FD002"
    window: int = 30
    rul_cap: int = 125
    cap_test_rul: bool = False
    sensors: list[int] = field(default_factory=lambda: list(DEFAULT_SENSORS))
    condition_norm: bool = True
    windows_per_unit: int = 20
    val_every: int = 5


def default_data_dir() -> str | None:
    """The repo-relative ../shared/data/cmapss when it exists (tests and benchmarks)."""
    return shared_data_dir("cmapss")


def read_table(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: file not found (is task.data_dir the C-MAPSS folder?)")
    try:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as whitespace-separated numbers: {e}") from None
    if rows.shape[1] != COLUMNS:
        raise DataError(f"{path}: expected {COLUMNS} columns (unit, cycle, 3 settings, 21 sensors), got {rows.shape[1]}")
    if not np.isfinite(rows).all():
        raise DataError(f"{path}: non-finite value in row {int(np.flatnonzero(~np.isfinite(rows).all(1))[0]) + 1}")
    return rows


def read_rul(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, dtype=np.float64, ndmin=1)


def operating_condition(settings: np.ndarray, where: str = "") -> np.ndarray:
    """Index (0..5) of the nearest known operating condition for every row of settings [n, 3]."""
    d = np.linalg.norm((settings[:, None, :] - CONDITIONS[None]) / SETTING_SCALE, axis=-1)
    cond = d.argmin(1)
    far = d[np.arange(len(cond)), cond] > MAX_CONDITION_DISTANCE
    if far.any():
        r = int(np.flatnonzero(far)[0])
        raise DataError(f"{where}row {r + 1}: settings {settings[r].tolist()} match none of the six C-MAPSS "
                        "operating conditions")
    return cond


@dataclass
class Unit:
    x: torch.Tensor  # [T, sensors] standardised
    rul_end: float  # RUL after the last cycle (0 for training units)


class CMAPSSSource:
    kind = "regression"
    loss = "mse"

    def __init__(self, opts: CMAPSSOptions):
        o = self.opts = opts
        if not o.data_dir:
            raise ConfigError("task.data_dir is required for cmapss (the folder with train_FD001.txt.gz ...)")
        bad = [s for s in [*o.sources, o.target] if s not in SUBSETS]
        if bad or not o.sources:
            raise ConfigError(f"task.sources and task.target must be among {SUBSETS}, got {bad or o.sources}")
        if o.target in o.sources:
            raise ConfigError("task.target must not be one of task.sources (a cross-domain protocol)")
        if o.window < 1 or o.rul_cap < 1 or o.windows_per_unit < 1 or o.val_every < 2:
            raise ConfigError("task.window, rul_cap and windows_per_unit must be >= 1, val_every >= 2")
        if not o.sensors or any(s not in range(1, 22) for s in o.sensors) or len(set(o.sensors)) != len(o.sensors):
            raise ConfigError(f"task.sensors must be distinct sensor numbers 1..21, got {o.sensors}")
        root = Path(o.data_dir)
        if not root.is_dir():
            raise DataError(f"{root}: task.data_dir is not a folder")
        cols = [5 + s - 1 for s in o.sensors]
        raw = {}
        for name in dict.fromkeys([*o.sources, o.target]):
            for part in ("train", "test"):
                rows = read_table(root / f"{part}_{name}.txt.gz")
                where = f"{part}_{name}: "
                cond = operating_condition(rows[:, 2:5], where) if o.condition_norm else np.zeros(len(rows), int)
                raw[(name, part)] = (rows[:, 0].astype(int), rows[:, cols], cond)
        self.mean, self.std = self._fit(raw)
        self.units: dict[tuple[str, str], list[Unit]] = {}
        for (name, part), (unit_ids, values, cond) in raw.items():
            z = ((values - self.mean[cond]) / self.std[cond]).astype(np.float32)
            starts = np.flatnonzero(np.r_[True, unit_ids[1:] != unit_ids[:-1]])
            pieces = np.split(z, starts[1:])
            rul = read_rul(root / f"RUL_{name}.txt.gz") if part == "test" else np.zeros(len(pieces))
            if len(rul) != len(pieces):
                raise DataError(f"RUL_{name}: {len(rul)} lines for {len(pieces)} test units")
            self.units[(name, part)] = [Unit(torch.from_numpy(p), float(r)) for p, r in zip(pieces, rul)]

    def _fit(self, raw) -> tuple[np.ndarray, np.ndarray]:
        """Per-condition sensor mean/std over the source training rows only (never the target)."""
        o = self.opts
        values = np.concatenate([raw[(s, "train")][1] for s in o.sources])
        cond = np.concatenate([raw[(s, "train")][2] for s in o.sources])
        mean = np.zeros((len(CONDITIONS), len(o.sensors)))
        std = np.ones((len(CONDITIONS), len(o.sensors)))
        needed = set(np.unique(np.concatenate([raw[(n, p)][2] for n, p in raw])).tolist())
        for c in sorted(needed):
            rows = values[cond == c]
            if len(rows) < 2:
                raise DataError(f"operating condition {c} ({CONDITIONS[c].tolist()}) occurs in the target but not in "
                                f"the sources {o.sources}: its sensors cannot be normalised (add a source that has it)")
            mean[c], std[c] = rows.mean(0), rows.std(0)
            flat = [s for s, v in zip(o.sensors, std[c]) if v < 1e-6]
            if flat:
                raise DataError(f"sensors {flat} are constant at operating condition {c} in the sources: drop them "
                                "from task.sensors (they carry no information and cannot be standardised)")
        return mean, std

    @classmethod
    def from_config(cls, cfg: dict) -> "CMAPSSSource":
        return cls(from_dict(CMAPSSOptions, cfg, "task"))

    # --- windows ----------------------------------------------------------------------------------
    def window_at(self, unit: Unit, ends: torch.Tensor) -> torch.Tensor:
        """Windows [n, W, sensors] ending at cycle indices `ends`; cycles before the first repeat the first."""
        idx = (ends[:, None] - self.opts.window + 1 + torch.arange(self.opts.window)).clamp_min(0)
        return unit.x[idx]

    def labels(self, unit: Unit, ends: torch.Tensor) -> torch.Tensor:
        """Capped RUL at those cycles, in model units (RUL / cap)."""
        rul = (len(unit.x) - 1 - ends).float() + unit.rul_end
        return rul.clamp(max=float(self.opts.rul_cap)) / self.opts.rul_cap

    def unit_windows(self, unit: Unit, count: int | None, gen: torch.Generator | None):
        """`count` random full windows of a run-to-failure unit (all of them when count is None)."""
        first = min(self.opts.window - 1, len(unit.x) - 1)
        if count is None:
            ends = torch.arange(first, len(unit.x))
        else:
            ends = torch.randint(first, len(unit.x), (count,), generator=gen)
        return self.window_at(unit, ends), self.labels(unit, ends)

    def last_windows(self, subset: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The official test: last window of every test unit and its true RUL in cycles (capped if asked)."""
        units = self.units[(subset, "test")]
        x = torch.stack([self.window_at(u, torch.tensor([len(u.x) - 1]))[0] for u in units])
        y = torch.tensor([u.rul_end for u in units], dtype=torch.float32)
        return x, (y.clamp(max=float(self.opts.rul_cap)) if self.opts.cap_test_rul else y)

    def split_units(self, split: str) -> list[tuple[str, list[Unit]]]:
        """(sub-dataset, its candidate units) for the split's tasks."""
        o = self.opts
        if split == "test":
            return [(o.target, self.units[(o.target, "train")])]
        keep = (lambda i: i % o.val_every != o.val_every - 1) if split == "train" else (lambda i: i % o.val_every == o.val_every - 1)
        return [(s, [u for i, u in enumerate(self.units[(s, "train")]) if keep(i)]) for s in o.sources]

    def support(self, units: list[Unit], gen: torch.Generator | None):
        parts = [self.unit_windows(u, self.opts.windows_per_unit, gen) for u in units]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def sample(self, split: str, batch: int, shots: int, query: int, generator: torch.Generator) -> TaskBatch:
        check_split(split)
        pools = self.split_units(split)
        out = ([], [], [], [])
        for _ in range(batch):
            subset, units = pools[int(torch.randint(0, len(pools), (1,), generator=generator))]
            reserve = 0 if split == "test" else 1  # train/val: at least one unit left for the query
            if shots + reserve > len(units):
                raise DataError(f"{subset} ({split}) has {len(units)} units: too few for K = {shots} support units"
                                + (" and a query unit" if reserve else ""))
            order = torch.randperm(len(units), generator=generator).tolist()
            sx, sy = self.support([units[i] for i in order[:shots]], generator)
            if split == "test":
                tx, ty = self.last_windows(subset)
                pick = torch.randint(0, len(tx), (query,), generator=generator)
                qx, qy = tx[pick], ty[pick] / self.opts.rul_cap
            else:
                rest = [units[i] for i in order[shots:]]
                which = torch.randint(0, len(rest), (query,), generator=generator).tolist()
                q = [self.unit_windows(rest[i], 1, generator) for i in which]
                qx, qy = torch.cat([a for a, _ in q]), torch.cat([b for _, b in q])
            for acc, t in zip(out, (sx, sy, qx, qy)):
                acc.append(t)
        return TaskBatch(*(torch.stack(a) for a in out))

    def pretrain_batch(self, size: int, generator: torch.Generator):
        """Windows pooled over the meta-train units of every source sub-dataset."""
        units = [u for _, us in self.split_units("train") for u in us]
        which = torch.randint(0, len(units), (size,), generator=generator).tolist()
        parts = [self.unit_windows(units[i], 1, generator) for i in which]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def model_spec_defaults(self) -> dict:
        o = self.opts
        return {"in_features": len(o.sensors), "window": o.window, "out_features": 1,
                "input_transform": {"kind": "none"},
                "target_transform": {"kind": "affine", "center": 0.0, "scale": float(o.rul_cap)}}

    @property
    def rows_per_shot(self) -> int:
        """A shot is one run-to-failure unit: `windows_per_unit` support windows (the fair baselines' budget)."""
        return self.opts.windows_per_unit

    def describe(self) -> dict:
        o = self.opts
        return {"name": "cmapss", "kind": self.kind, "feature_names": [f"sensor_{s}" for s in o.sensors],
                "target_name": "rul", "sources": list(o.sources), "target": o.target, "window": o.window,
                "rul_cap": o.rul_cap, "cap_test_rul": o.cap_test_rul, "condition_norm": o.condition_norm,
                "conditions": CONDITIONS.tolist(), "condition_mean": self.mean.tolist(),
                "condition_std": self.std.tolist(), "units": "cycles"}
