"""User tables: historical data of several lines / machines / products as meta-learning tasks.

    task:
      name: table
      path: data/lines.csv          # .csv (any other suffix) or .parquet / .pq; relative to the working dir
      task_column: line             # rows with the same value form one task
      features: [temperature, pressure]   # or features_except: [timestamp]; neither = all other columns
      target: quality
      kind: regression              # or classification
      n_way: 3                      # classification only; default = every class
      split: {val: 0.15, test: 0.15}
      seed: 0
      scaling: {inputs: standard, target: none, clip: 5.0}   # inputs robust|none, target standard|robust

- Tasks (never rows) are split into meta-train / meta-val / meta-test by a seeded shuffle of the task ids.
- Regression episodes: K support + Q query rows, disjoint. If a task has fewer than K + Q rows the query
  rows are drawn with replacement from the rows that are not in the support set (K + 1 rows are needed).
- Classification episodes: N-way K-shot, a fresh class -> label permutation per episode; every class needs
  K + 1 rows in the task (query rows per class as above). `query` counts rows per class.
- Tasks that cannot make an episode (too few rows, too few classes) are named in a DataWarning and skipped.
- Feature scaling (task.scaling.inputs: standard mean/std by default, robust median/IQR with clipping, or none)
  and optional target scaling (task.scaling.target) are fitted on the meta-train tasks only and travel in
  the model spec (meta_train/scaling.py); episodes carry targets in model units, task_rows() the user's.
- Bad input raises DataError naming the file and the column / row (rows are 1-based data rows; in a CSV
  with a header row, data row r is line r + 1).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import scaling
from ..config import from_dict
from ..errors import ConfigError, DataError
from . import TaskBatch
from .common import check_split


class DataWarning(UserWarning):
    """A task that is skipped (too few rows or classes); the message names it and says why."""


@dataclass
class SplitOptions:
    val: float = 0.15
    test: float = 0.15


@dataclass
class ScalingOptions:
    inputs: str = "standard"  # standard | robust | none (meta_train/scaling.py)
    target: str = "none"  # none | standard | robust (regression only)
    clip: float | None = 5.0  # robust inputs: scaled values are clipped to [-clip, clip]; null: no clipping


@dataclass
class TableOptions:
    path: str = ""
    task_column: str = ""
    target: str = ""
    kind: str = "regression"
    features: list[str] | None = None
    features_except: list[str] | None = None
    n_way: int | None = None
    split: SplitOptions = field(default_factory=SplitOptions)
    seed: int = 0
    scaling: ScalingOptions = field(default_factory=ScalingOptions)


def _read(path: Path):
    try:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a train dependency
        raise DataError(f"reading {path} needs pyarrow ({e})") from None
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path)
        return pacsv.read_csv(path)
    except Exception as e:  # pyarrow's own parse errors carry the row
        raise DataError(f"{path}: cannot read as {'Parquet' if path.suffix.lower() in ('.parquet', '.pq') else 'CSV'}: {e}") from None


def _row_hint(path: Path, i: int) -> str:
    where = f"row {i + 1}"
    if path.suffix.lower() not in (".parquet", ".pq"):
        where += f" (line {i + 2} of the file)"
    return where


def _numeric(table, name: str, path: Path) -> np.ndarray:
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if col.null_count:
        i = int(np.flatnonzero(np.asarray(col.is_null()))[0])
        raise DataError(f"{path}: column {name!r} has a missing value (empty/NaN) at {_row_hint(path, i)}")
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        values = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    else:
        raw = col.cast(pa.string()).to_pylist()
        values = np.empty(len(raw), dtype=np.float64)
        for i, v in enumerate(raw):
            try:
                values[i] = float(v)
            except (TypeError, ValueError):
                raise DataError(f"{path}: column {name!r} is not numeric: {v!r} at {_row_hint(path, i)}") from None
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: column {name!r} has a non-finite value ({values[i]}) at {_row_hint(path, i)}")
    return values


def _labels(table, name: str, path: Path) -> list[str]:
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if col.null_count:
        i = int(np.flatnonzero(np.asarray(col.is_null()))[0])
        raise DataError(f"{path}: column {name!r} has a missing value at {_row_hint(path, i)}")
    values = col.to_pylist()
    if pa.types.is_floating(col.type):
        for i, v in enumerate(values):
            if isinstance(v, float) and math.isnan(v):
                raise DataError(f"{path}: column {name!r} has a NaN at {_row_hint(path, i)}")
        values = [int(v) if float(v).is_integer() else v for v in values]  # 1.0 -> "1"
    return [str(v) for v in values]


class TableSource:
    loss: str

    def __init__(self, opts: TableOptions):
        self.opts = o = opts
        for key in ("path", "task_column", "target"):
            if not getattr(o, key):
                raise ConfigError(f"task.{key} is required for a table task")
        if o.kind not in ("regression", "classification"):
            raise ConfigError(f"task.kind must be regression or classification, got {o.kind!r}")
        if o.features is not None and o.features_except is not None:
            raise ConfigError("give task.features or task.features_except, not both")
        if not (0 <= o.split.val < 1 and 0 <= o.split.test < 1 and o.split.val + o.split.test < 1):
            raise ConfigError("task.split.val and task.split.test must be in [0, 1) and sum to less than 1")
        if o.n_way is not None and o.kind != "classification":
            raise ConfigError("task.n_way is for kind: classification only")
        if o.n_way is not None and o.n_way < 2:
            raise ConfigError("task.n_way must be >= 2")
        if o.scaling.inputs not in scaling.INPUT_MODES:
            raise ConfigError(f"task.scaling.inputs must be one of {scaling.INPUT_MODES}, got {o.scaling.inputs!r}")
        if o.scaling.target not in scaling.TARGET_MODES:
            raise ConfigError(f"task.scaling.target must be one of {scaling.TARGET_MODES}, got {o.scaling.target!r}")
        if o.scaling.target != "none" and o.kind != "regression":
            raise ConfigError("task.scaling.target is for kind: regression only (class labels are not scaled)")
        if o.scaling.clip is not None and not o.scaling.clip > 0:
            raise ConfigError(f"task.scaling.clip must be > 0 or null, got {o.scaling.clip}")
        self.kind = o.kind
        self.loss = "mse" if o.kind == "regression" else "cross_entropy"
        self._warned: set = set()
        self._load(Path(o.path))

    @classmethod
    def from_config(cls, cfg: dict) -> "TableSource":
        return cls(from_dict(TableOptions, cfg, "task"))

    # --- loading ---------------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        o = self.opts
        table = _read(path)
        columns = list(table.column_names)
        if table.num_rows == 0:
            raise DataError(f"{path}: no data rows")
        for role, name in (("task_column", o.task_column), ("target", o.target)):
            if name not in columns:
                raise DataError(f"{path}: missing column {name!r} (task.{role}); the file has {columns}")
        if o.features is not None:
            missing = [c for c in o.features if c not in columns]
            if missing:
                raise DataError(f"{path}: missing feature column(s) {missing}; the file has {columns}")
            features = list(o.features)
        else:
            excluded = list(o.features_except or [])
            missing = [c for c in excluded if c not in columns]
            if missing:
                raise DataError(f"{path}: task.features_except names column(s) {missing} that the file lacks")
            features = [c for c in columns if c not in excluded and c not in (o.task_column, o.target)]
        for c in (o.task_column, o.target):
            if c in features:
                raise ConfigError(f"column {c!r} cannot be both a feature and the task column / target")
        if not features:
            raise DataError(f"{path}: no feature columns left")
        self.path, self.feature_names = path, features
        x = np.stack([_numeric(table, c, path) for c in features], axis=1).astype(np.float32)
        task_of_row = _labels(table, o.task_column, path)

        if self.kind == "regression":
            y = _numeric(table, o.target, path).astype(np.float32)
            self.class_names = None
        else:
            labels = _labels(table, o.target, path)
            self.class_names = sorted(set(labels), key=_natural_key)
            if len(self.class_names) < 2:
                raise DataError(f"{path}: label column {o.target!r} has only one class ({self.class_names[0]!r})")
            index = {c: i for i, c in enumerate(self.class_names)}
            y = np.array([index[v] for v in labels], dtype=np.int64)
            self.n_way = o.n_way or len(self.class_names)
            if self.n_way > len(self.class_names):
                raise ConfigError(f"task.n_way={self.n_way} but {path} column {o.target!r} has only "
                                  f"{len(self.class_names)} classes {self.class_names}")

        rows_of: dict[str, list[int]] = {}
        for i, t in enumerate(task_of_row):
            rows_of.setdefault(t, []).append(i)
        for t, rows in rows_of.items():
            if len(rows) < 2:
                raise DataError(f"{path}: task {t!r} (column {o.task_column!r}) has only one row ({_row_hint(path, rows[0])});"
                                " a task needs a support and a query row - check task_column or drop the row")
        names = sorted(rows_of, key=_natural_key)
        n = len(names)
        n_test = max(1, round(o.split.test * n)) if o.split.test > 0 else 0
        n_val = max(1, round(o.split.val * n)) if o.split.val > 0 else 0
        if n - n_test - n_val < 1:
            raise DataError(f"{path}: {n} task(s) in column {o.task_column!r} cannot be split into meta-train "
                            f"(>= 1), meta-val ({n_val}) and meta-test ({n_test}) tasks")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(o.seed)).tolist()
        shuffled = [names[i] for i in order]
        self.split_tasks = {
            "test": sorted(shuffled[:n_test], key=_natural_key),
            "val": sorted(shuffled[n_test:n_test + n_val], key=_natural_key),
            "train": sorted(shuffled[n_test + n_val:], key=_natural_key),
        }
        self.tasks = {}
        for t, rows in rows_of.items():
            idx = np.asarray(rows)
            entry = {"x": torch.from_numpy(x[idx]), "y": torch.from_numpy(y[idx])}
            if self.kind == "classification":
                entry["by_class"] = {int(c): torch.from_numpy(np.flatnonzero(y[idx] == c)) for c in np.unique(y[idx])}
            self.tasks[t] = entry

        for entry in self.tasks.values():  # episodes are in model units; y_raw keeps the user's (dump-task)
            entry["y_raw"] = entry["y"]
        self._fit_train()
        self.fingerprint = data_fingerprint(features, x, y, task_of_row)
        if self.kind == "classification":
            for split, tasks in self.split_tasks.items():
                few = [(t, len(self.tasks[t]["by_class"])) for t in tasks if len(self.tasks[t]["by_class"]) < self.n_way]
                if few:
                    warnings.warn(f"{path}: skipping {split} task(s) with fewer than n_way={self.n_way} classes: "
                                  + ", ".join(f"{t!r} has {k}" for t, k in few), DataWarning, stacklevel=2)
                    self._warned.update((split, t, "classes") for t, _ in few)

    def _fit_train(self) -> None:
        """Input and target scaling and the pooled rows, fitted on the meta-train tasks only: validation,
        test and (cross-validation) held-out tasks never leak into them."""
        o = self.opts
        train = self.split_tasks["train"]
        train_x = torch.cat([self.tasks[t]["x"] for t in train])
        self.input_transform, constant = scaling.fit_inputs(train_x.numpy(), o.scaling.inputs, o.scaling.clip)
        if constant.any():
            warnings.warn(f"{self.path}: feature(s) {[f for f, c in zip(self.feature_names, constant) if c]} are "
                          "constant over the meta-train tasks; they are passed through unscaled", DataWarning, stacklevel=3)
        if self.input_transform is not None:
            self.mean, self.std = np.asarray(self.input_transform["mean"]), np.asarray(self.input_transform["std"])
        self.target_transform = None
        if self.kind == "regression":
            raw = torch.cat([self.tasks[t]["y_raw"] for t in train]).numpy()
            self.target_transform = scaling.fit_target(raw, o.scaling.target)
            center, scale = scaling.target_affine({"target_transform": self.target_transform})
            for entry in self.tasks.values():
                entry["y"] = ((entry["y_raw"].double() - center) / scale).float()
        self.train_x = train_x
        self.train_y = torch.cat([self.tasks[t]["y"] for t in train])

    def with_split(self, split_tasks: dict[str, list[str]]) -> "TableSource":
        """This table with its tasks split as given (cross-validation folds); scaling refitted on the new
        meta-train tasks, so a held-out task never leaks into it."""
        named = [t for part in split_tasks.values() for t in part]
        unknown = sorted(set(named) - set(self.tasks))
        if unknown or len(named) != len(set(named)) or not split_tasks.get("train"):
            raise ConfigError(f"a split needs >= 1 train task and each known task at most once (unknown: {unknown})")
        other = copy.copy(self)
        other.split_tasks = {k: sorted(split_tasks.get(k, []), key=_natural_key) for k in ("train", "val", "test")}
        other._warned = set(self._warned)
        other.tasks = {t: dict(e) for t, e in self.tasks.items()}  # _fit_train rescales "y": not the original's
        other._fit_train()
        return other

    # --- episodes ---------------------------------------------------------------------------------
    def _usable(self, split: str, shots: int) -> list[str]:
        usable, skipped = [], []
        for t in self.split_tasks[split]:
            entry = self.tasks[t]
            if self.kind == "regression":
                if len(entry["y"]) >= shots + 1:
                    usable.append(t)
                else:
                    skipped.append((t, f"has {len(entry['y'])} rows, needs K+1 = {shots + 1}"))
            else:
                rich = [c for c, r in entry["by_class"].items() if len(r) >= shots + 1]
                if len(rich) >= self.n_way:
                    usable.append(t)
                elif len(entry["by_class"]) >= self.n_way:
                    skipped.append((t, f"has only {len(rich)} class(es) with >= K+1 = {shots + 1} rows, "
                                       f"needs n_way = {self.n_way}"))
        fresh = [(t, why) for t, why in skipped if (split, t, shots) not in self._warned]
        if fresh:
            warnings.warn(f"{self.path}: skipping {split} task(s) at K={shots}: "
                          + "; ".join(f"{t!r} {why}" for t, why in fresh), DataWarning, stacklevel=3)
            self._warned.update((split, t, shots) for t, _ in fresh)
        if not usable:
            raise DataError(f"{self.path}: no {split} task can make a K={shots} episode "
                            f"({len(self.split_tasks[split])} {split} task(s); see the warnings above)")
        return usable

    @staticmethod
    def _draw(rows: torch.Tensor, shots: int, query: int, gen: torch.Generator):
        perm = rows[torch.randperm(len(rows), generator=gen)]
        support, rest = perm[:shots], perm[shots:]
        if len(rest) >= query:
            q = rest[:query]
        else:  # too few rows for a disjoint query set of this size: repeat the non-support rows
            q = rest[torch.randint(0, len(rest), (query,), generator=gen)]
        return support, q

    def sample(self, split: str, batch: int, shots: int, query: int, generator: torch.Generator) -> TaskBatch:
        check_split(split)
        usable = self._usable(split, shots)
        picks = torch.randint(0, len(usable), (batch,), generator=generator).tolist()
        out = ([], [], [], [])
        for p in picks:
            entry = self.tasks[usable[p]]
            if self.kind == "regression":
                s, q = self._draw(torch.arange(len(entry["y"])), shots, query, generator)
                parts = (entry["x"][s], entry["y"][s], entry["x"][q], entry["y"][q])
            else:
                rich = [c for c, r in entry["by_class"].items() if len(r) >= shots + 1]
                chosen = [rich[i] for i in torch.randperm(len(rich), generator=generator)[: self.n_way].tolist()]
                # position in `chosen` is the episode label: a random class -> label assignment
                ss, sq = [], []
                for c in chosen:
                    s, q = self._draw(entry["by_class"][c], shots, query, generator)
                    ss.append(s)
                    sq.append(q)
                s, q = torch.cat(ss), torch.cat(sq)
                sy = torch.arange(self.n_way).repeat_interleave(shots)
                qy = torch.arange(self.n_way).repeat_interleave(query)
                parts = (entry["x"][s], sy, entry["x"][q], qy)
            for acc, t in zip(out, parts):
                acc.append(t)
        return TaskBatch(*(torch.stack(a) for a in out))

    @property
    def pretrain_classes(self) -> int:
        return len(self.class_names) if self.class_names else 1

    def pretrain_batch(self, size: int, generator: torch.Generator):
        i = torch.randint(0, len(self.train_y), (size,), generator=generator)
        return self.train_x[i], self.train_y[i]

    def model_spec_defaults(self) -> dict:
        spec = {"in_features": len(self.feature_names),
                "out_features": 1 if self.kind == "regression" else self.n_way,
                "input_transform": self.input_transform}
        if self.target_transform is not None:
            spec["target_transform"] = self.target_transform
        return spec

    def describe(self) -> dict:
        return {"name": "table", "kind": self.kind, "feature_names": list(self.feature_names),
                "target_name": self.opts.target, "class_names": self.class_names,
                "n_way": getattr(self, "n_way", None), "path": str(self.path),
                "split_tasks": {k: v[:1000] for k, v in self.split_tasks.items()},
                "scaling": {"inputs": self.opts.scaling.inputs, "target": self.opts.scaling.target,
                            "clip": self.opts.scaling.clip},
                "data_fingerprint": self.fingerprint}

    def task_rows(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of one task's rows in the user's units, in file order: what a line would publish (dump-task)."""
        entry = self.tasks[task]
        return entry["x"].numpy(), entry.get("y_raw", entry["y"]).numpy()


def data_fingerprint(features: list[str], x: np.ndarray, y: np.ndarray, tasks: list[str]) -> str:
    """sha256 over the parsed values that decide the split and the episodes, not the file's bytes or path:
    a re-saved or moved file with the same numbers is the same data."""
    import hashlib

    h = hashlib.sha256("\x1f".join(features).encode())
    for part in (np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)):
        h.update(part.tobytes())
    h.update("\x1f".join(tasks).encode())
    return h.hexdigest()


def _natural_key(s: str):
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)
