import csv
import os
from pathlib import Path

import numpy as np
import pytest

from meta_train.tasks.cwru import default_data_dir


def write_lines_csv(path: Path, tasks: int = 8, rows: int = 30, seed: int = 0, classes=("A", "B", "C")) -> Path:
    """A user-style CSV: one row per part, several lines (tasks), a timestamp column to leave out."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["line", "temp", "pressure", "ts", "quality", "grade"])
        for t in range(tasks):
            a, b = rng.normal(size=2)
            for i in range(rows):
                x1, x2 = rng.uniform(180, 260), rng.uniform(50, 150)
                q = a * (x1 - 220) / 40 + b * (x2 - 100) / 50 + 0.1 * rng.normal()
                w.writerow([f"L{t}", round(x1, 2), round(x2, 2), i, round(q, 4), classes[i % len(classes)]])
    return path


@pytest.fixture
def make_csv():
    return write_lines_csv


@pytest.fixture
def lines_csv(tmp_path):
    return write_lines_csv(tmp_path / "lines.csv")


@pytest.fixture(scope="session")
def cwru_dir():
    path = default_data_dir()
    if not path or not (Path(path) / "12k_drive_end").is_dir():
        if os.environ.get("CI"):  # in CI a skipped test is a failure in disguise
            pytest.fail(f"CWRU data not found at {path!r}: CI needs it (../shared/data/cwru, or set CWRU_DATA)")
        pytest.skip("CWRU data not found (set CWRU_DATA)")
    return path


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cmapss_dir():
    from meta_train.tasks.cmapss import default_data_dir as cmapss_default

    path = cmapss_default()
    if not path or not (Path(path) / "train_FD001.txt.gz").exists():
        if os.environ.get("CI"):  # as for CWRU: in CI a skipped test is a failure in disguise
            pytest.fail(f"C-MAPSS data not found at {path!r}: CI needs it (../shared/data/cmapss)")
        pytest.skip("C-MAPSS data not found (../shared/data/cmapss)")
    return path
