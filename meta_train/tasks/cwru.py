"""CWRU bearing data (real recordings): cross-load few-shot fault diagnosis (Feng et al., KBS 2022).

    task:
      name: cwru
      data_dir: ../shared/data/cwru     # required: the folder with 12k_drive_end/ and normal_load0.npz
      source_loads: [3]                 # meta-train on these motor loads (HP)
      target_load: 0                    # adapt and test on this one
      protocol: faults9                 # or healthy10
      window: 1024
      bins: 64

Splits: "train" = episodes from the source load(s), first 80 % of every recording; "val" = source-load
episodes from the last 20 %; "test" = target-load episodes from the whole recording. In every episode
the support windows of a class come from one half of that class's region and the query windows from the
other half (which half is drawn per episode): support and query never share a sample.

Protocols (the data has the healthy baseline at 0 HP only):
- faults9: 9-way, the nine fault classes (IR/OR/B x 0.007/0.014/0.021 in) at every load.
- healthy10: 10-way test episodes that include `normal`, a class never seen in meta-training (it exists at
  0 HP only, so target_load must be 0 and 0 may not be a source load). Meta-training episodes hold the nine
  faults on nine of the ten labels (a random nine per episode), so the ten-way head is trained symmetric.

The healthy baseline (97.mat, `DE` of normal_load0.npz) is treated as 48 kHz and decimated by 4 with a
windowed-sinc anti-alias filter (normal_sample_rate: 48000; set 12000 to take it as is): read as 48 kHz its
spectral lines (147.7, 161.7, 191.6 Hz) coincide with the lines of the 12 kHz fault recordings at the same
load; read as 12 kHz they sit 4x lower. See docs/tasks.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import from_dict
from ..errors import ConfigError, DataError
from . import TaskBatch
from .common import check_split, shared_data_dir

FAULTS = ["IR007", "IR014", "IR021", "OR007", "OR014", "OR021", "B007", "B014", "B021"]
LOADS = (0, 1, 2, 3)
PROTOCOLS = ("faults9", "healthy10")
TRAIN_FRACTION = 0.8


@dataclass
class CWRUOptions:
    data_dir: str = ""
    source_loads: list[int] = field(default_factory=lambda: [3])
    target_load: int = 0
    protocol: str = "faults9"
    window: int = 1024
    bins: int = 64
    max_samples: int | None = None  # use only the first N values of every recording (tests)
    normal_sample_rate: int = 48000


def default_data_dir() -> str | None:
    """$CWRU_DATA, else the repo-relative ../shared/data/cwru when it exists (tests and benchmarks)."""
    return shared_data_dir("cwru", "CWRU_DATA")


def _read_column(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: file not found (is task.data_dir the CWRU folder?)")
    try:
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True))
        values = table.column(0).to_numpy().astype(np.float32)
    except ImportError:  # pragma: no cover
        values = np.loadtxt(path, dtype=np.float32)
    except Exception as e:
        raise DataError(f"{path}: cannot read one float per line: {e}") from None
    if not np.isfinite(values).all():
        raise DataError(f"{path}: non-finite value at line {int(np.flatnonzero(~np.isfinite(values))[0]) + 1}")
    return values


def decimate4(x: np.ndarray) -> np.ndarray:
    """48 kHz -> 12 kHz: 127-tap Hamming-windowed sinc low-pass at 5.4 kHz, then every 4th sample."""
    taps = 127
    n = np.arange(taps) - (taps - 1) / 2
    cutoff = 5400.0 / 48000.0
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(taps)
    h /= h.sum()
    return np.convolve(x.astype(np.float64), h, mode="same")[::4].astype(np.float32)


class CWRUSource:
    kind = "classification"
    loss = "cross_entropy"

    def __init__(self, opts: CWRUOptions):
        o = self.opts = opts
        if not o.data_dir:
            raise ConfigError("task.data_dir is required for cwru (the folder with 12k_drive_end/ and normal_load0.npz)")
        if o.protocol not in PROTOCOLS:
            raise ConfigError(f"task.protocol must be one of {PROTOCOLS}, got {o.protocol!r}")
        loads = list(o.source_loads)
        if not loads or any(l not in LOADS for l in loads) or o.target_load not in LOADS:
            raise ConfigError(f"task.source_loads and task.target_load must be loads in {LOADS}")
        if o.target_load in loads:
            raise ConfigError("task.target_load must not be one of task.source_loads (a cross-load protocol)")
        if o.protocol == "healthy10" and (o.target_load != 0 or 0 in loads):
            raise ConfigError("protocol healthy10 needs target_load: 0 and no 0 among source_loads "
                              "(the healthy baseline exists at 0 HP only)")
        if o.window < 64 or not 2 <= o.bins <= o.window // 2:
            raise ConfigError("task.window must be >= 64 and 2 <= task.bins <= window / 2")
        if o.normal_sample_rate not in (12000, 48000):
            raise ConfigError("task.normal_sample_rate must be 12000 or 48000")
        self.n_way = 9 if o.protocol == "faults9" else 10
        self.class_names = FAULTS + (["normal"] if o.protocol == "healthy10" else [])
        self.pretrain_classes = len(FAULTS)
        root = Path(o.data_dir)
        if not (root / "12k_drive_end").is_dir():
            raise DataError(f"{root}: no 12k_drive_end/ folder here (task.data_dir must be the CWRU folder)")
        self.recordings: dict[tuple[int, str], torch.Tensor] = {}
        for load in sorted(set(loads + [o.target_load])):
            for name in FAULTS:
                self.recordings[(load, name)] = self._limit(_read_column(root / "12k_drive_end" / f"load{load}" / f"{name}.csv"))
        if o.protocol == "healthy10":
            path = root / "normal_load0.npz"
            if not path.exists():
                raise DataError(f"{path}: file not found (needed by protocol healthy10)")
            with np.load(path, allow_pickle=False) as z:
                if "DE" not in z:
                    raise DataError(f"{path}: no array 'DE'")
                de = np.asarray(z["DE"], dtype=np.float32).reshape(-1)
            if o.normal_sample_rate == 48000:
                de = decimate4(de)
            self.recordings[(0, "normal")] = self._limit(de)
        short = [f"load{l}/{n}" for (l, n), r in self.recordings.items() if len(r) * (1 - TRAIN_FRACTION) / 2 < o.window + 1]
        if short:
            raise DataError(f"recordings too short for window {o.window}: {short}")

    def _limit(self, x: np.ndarray) -> torch.Tensor:
        if self.opts.max_samples:
            x = x[: self.opts.max_samples]
        return torch.from_numpy(np.ascontiguousarray(x))

    @classmethod
    def from_config(cls, cfg: dict) -> "CWRUSource":
        return cls(from_dict(CWRUOptions, cfg, "task"))

    # --- episodes ---------------------------------------------------------------------------------
    def _region(self, split: str, rec: torch.Tensor) -> tuple[int, int]:
        n = len(rec)
        cut = int(n * TRAIN_FRACTION)
        return {"train": (0, cut), "val": (cut, n), "test": (0, n)}[split]

    def _windows(self, rec: torch.Tensor, lo: int, hi: int, count: int, gen: torch.Generator) -> torch.Tensor:
        starts = torch.randint(lo, hi - self.opts.window + 1, (count,), generator=gen)
        return rec[starts[:, None] + torch.arange(self.opts.window)]

    def _episode(self, split, classes, load, shots, query, gen):
        """Support/query windows of the given classes (episode label = position in `classes`)."""
        sx, qx = [], []
        for name in classes:
            rec = self.recordings[(load, name)]
            lo, hi = self._region(split, rec)
            mid = (lo + hi) // 2
            halves = [(lo, mid), (mid, hi)]
            if torch.rand((), generator=gen) < 0.5:
                halves.reverse()
            sx.append(self._windows(rec, *halves[0], shots, gen))
            qx.append(self._windows(rec, *halves[1], query, gen))
        return torch.cat(sx), torch.cat(qx)

    def sample(self, split: str, batch: int, shots: int, query: int, generator: torch.Generator) -> TaskBatch:
        check_split(split)
        out = ([], [], [], [])
        for _ in range(batch):
            if split == "test":
                load = self.opts.target_load
                names = self.class_names
                perm = torch.randperm(self.n_way, generator=generator)
                classes = [names[i] for i in perm.tolist()]
                labels = torch.arange(self.n_way)
            else:
                loads = self.opts.source_loads
                load = loads[int(torch.randint(0, len(loads), (1,), generator=generator))]
                perm = torch.randperm(len(FAULTS), generator=generator)
                classes = [FAULTS[i] for i in perm.tolist()]
                # healthy10: the nine faults on a random nine of the ten labels
                labels = torch.randperm(self.n_way, generator=generator)[: len(FAULTS)]
            sx, qx = self._episode(split, classes, load, shots, query, generator)
            out[0].append(sx)
            out[1].append(labels.repeat_interleave(shots))
            out[2].append(qx)
            out[3].append(labels.repeat_interleave(query))
        return TaskBatch(*(torch.stack(a) for a in out))

    def pretrain_batch(self, size: int, generator: torch.Generator):
        """Source-load windows (meta-train region) with global fault labels (index into FAULTS)."""
        loads = self.opts.source_loads
        load_idx = torch.randint(0, len(loads), (size,), generator=generator).tolist()
        cls = torch.randint(0, len(FAULTS), (size,), generator=generator)
        xs = []
        for li, c in zip(load_idx, cls.tolist()):
            rec = self.recordings[(loads[li], FAULTS[c])]
            xs.append(self._windows(rec, *self._region("train", rec), 1, generator)[0])
        return torch.stack(xs), cls

    def model_spec_defaults(self) -> dict:
        o = self.opts
        return {"in_features": o.window, "out_features": self.n_way,
                "input_transform": {"kind": "spectrum", "window": o.window, "bins": o.bins}}

    def describe(self) -> dict:
        o = self.opts
        return {"name": "cwru", "kind": self.kind, "feature_names": [f"a[{i}]" for i in range(o.window)],
                "target_name": "condition", "class_names": list(self.class_names), "protocol": o.protocol,
                "source_loads": list(o.source_loads), "target_load": o.target_load, "sample_rate": 12000,
                "window": o.window, "bins": o.bins, "units": "g"}
