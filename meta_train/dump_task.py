"""`meta-train dump-task`: one task of any source as the line simulator's task file (docs/protocol.md, "Task file").

    np.savez(path, x=float32[n, *input_shape], y=[n], feature_names=str[F])

x are raw features (what the line publishes; the bundle scales them itself) and y labels in the user's units
(regression) or class indices (classification). A table's task is its own rows in file order, as the line
produced them; a synthetic source's is one task drawn from the split, `rows` samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError


def task_arrays(source, split: str, task: str | None, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, y, description) of one task of `split`."""
    if hasattr(source, "task_rows"):  # a table: the real rows of a named task
        names = source.split_tasks[split]
        if task is None:
            if not names:
                raise DataError(f"the {split} split has no tasks")
            task = names[0]
        elif task not in source.tasks:
            raise DataError(f"no task {task!r} in {source.path} (the {split} split has {names})")
        if source.kind == "classification" and source.n_way != len(source.class_names):
            raise ConfigError(f"a classification table with task.n_way={source.n_way} < its "
                              f"{len(source.class_names)} classes has no fixed class index to write; "
                              "dump it with n_way = every class")
        x, y = source.task_rows(task)
        where = "" if task in names else f" (not in the {split} split: the run may have trained on it)"
        return x[:rows], y[:rows], f"task {task!r}{where}, {min(rows, len(y))} rows in file order"
    if task is not None:
        raise ConfigError("--task names a table's task; other sources draw one task from the split (--seed)")
    if source.kind == "classification":  # shots and query count per class: n_way * (shots + query) rows
        n_way = int(source.model_spec_defaults()["out_features"])
        per_class = max(2, -(-rows // n_way))
        b = source.sample(split, 1, 1, per_class - 1, torch.Generator().manual_seed(seed))
    else:
        b = source.sample(split, 1, 1, max(rows - 1, 1), torch.Generator().manual_seed(seed))
    x = torch.cat([b.support_x[0], b.query_x[0]]).numpy()
    y = torch.cat([b.support_y[0], b.query_y[0]]).numpy()
    order = np.random.default_rng(seed).permutation(len(y))[:rows]  # classes interleaved, as a line would
    return x[order], y[order], f"one {split} task drawn with seed {seed}, {len(order)} samples"


def write(path: str | Path, x: np.ndarray, y: np.ndarray, feature_names: list[str] | None) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"--out {path}: the simulator reads .npz task files")
    path.parent.mkdir(parents=True, exist_ok=True)
    y = y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
    arrays = {"x": np.ascontiguousarray(x, dtype=np.float32), "y": y}
    if feature_names:
        arrays["feature_names"] = np.array([str(f) for f in feature_names])
    np.savez(path, **arrays)
    return path
