"""The C-MAPSS task source against the raw files: conditions, per-condition scaling, windows, labels, splits."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from meta_train.errors import ConfigError, DataError
from meta_train.tasks import build_source
from meta_train.tasks.cmapss import CONDITIONS, operating_condition


@pytest.fixture(scope="module")
def source(cmapss_dir):
    return build_source({"name": "cmapss", "data_dir": cmapss_dir, "sources": ["FD001", "FD004"], "target": "FD002"})


def raw(cmapss_dir, name):
    with gzip.open(Path(cmapss_dir) / name, "rt") as f:
        return np.loadtxt(f)


def test_every_row_falls_on_one_of_the_six_conditions(cmapss_dir):
    fd002, fd001 = raw(cmapss_dir, "train_FD002.txt.gz"), raw(cmapss_dir, "train_FD001.txt.gz")
    cond = operating_condition(fd002[:, 2:5])
    assert sorted(set(cond.tolist())) == [0, 1, 2, 3, 4, 5]
    # the assignment is the README's rounding rule (setting 1 to integer, 2 to 2 decimals, 3 to integer)
    rounded = np.c_[fd002[:, 2].round(), fd002[:, 3].round(2), fd002[:, 4].round()]
    assert np.array_equal(rounded, CONDITIONS[cond])
    assert (operating_condition(fd001[:, 2:5]) == 0).all()
    with pytest.raises(DataError, match="row 2: settings .* match none"):
        operating_condition(np.array([[0, 0, 100], [30, 0.5, 80]]), "")


def test_per_condition_scaling_removes_the_condition_offsets(cmapss_dir, source):
    rows = raw(cmapss_dir, "train_FD002.txt.gz")
    cond = operating_condition(rows[:, 2:5])
    sensor2 = rows[:, 5 + 2 - 1]
    raw_means = [sensor2[cond == c].mean() for c in range(6)]
    assert max(raw_means) - min(raw_means) > 50  # raw: the condition dominates (in units of about 0.5)
    z = torch.cat([u.x for u in source.units[("FD002", "train")]])[:, 0].numpy()
    means = [z[cond == c].mean() for c in range(6)]
    # scaled with the *source* statistics (FD001 + FD004): the target's conditions line up near 0
    assert max(abs(m) for m in means) < 0.5
    # and the source rows themselves are exactly standardised per condition
    src = torch.cat([u.x for u in source.units[("FD004", "train")] + source.units[("FD001", "train")]]).numpy()
    src_cond = np.concatenate([operating_condition(raw(cmapss_dir, f"train_{n}.txt.gz")[:, 2:5]) for n in ("FD004", "FD001")])
    for c in range(6):
        assert np.allclose(src[src_cond == c].mean(0), 0, atol=1e-3)
        assert np.allclose(src[src_cond == c].std(0), 1, atol=1e-3)


def test_window_and_label_match_the_raw_file(cmapss_dir, source):
    rows = raw(cmapss_dir, "train_FD002.txt.gz")
    unit = rows[rows[:, 0] == 7]
    cols = [5 + s - 1 for s in source.opts.sensors]
    cond = operating_condition(unit[:, 2:5])
    expect = (unit[:, cols] - source.mean[cond]) / source.std[cond]
    u = source.units[("FD002", "train")][6]
    t = len(unit) - 40  # 39 cycles after this one: RUL 39
    x = source.window_at(u, torch.tensor([t]))[0]
    assert np.allclose(x.numpy(), expect[t - 29 : t + 1], atol=1e-4)
    assert float(source.labels(u, torch.tensor([t]))[0]) * 125 == pytest.approx(39)
    assert float(source.labels(u, torch.tensor([10]))[0]) == 1.0  # capped at 125 early in life


def test_short_test_units_are_front_padded_and_scored_on_the_rul_file(cmapss_dir, source):
    x, y = source.last_windows("FD002")
    rul = raw(cmapss_dir, "RUL_FD002.txt.gz")
    assert x.shape == (259, 30, 14) and np.array_equal(y.numpy(), rul)  # cap_test_rul false: uncapped
    units = source.units[("FD002", "test")]
    i = min(range(len(units)), key=lambda j: len(units[j].x))
    n = len(units[i].x)
    assert n < 30
    assert torch.equal(x[i][: 30 - n], units[i].x[0].expand(30 - n, -1))
    assert torch.equal(x[i][30 - n :], units[i].x)


def test_tasks_are_sub_datasets_with_k_units(source):
    gen = torch.Generator().manual_seed(0)
    b = source.sample("train", 3, 2, 16, gen)
    assert b.support_x.shape == (3, 2 * 20, 30, 14) and b.query_x.shape == (3, 16, 30, 14)
    assert float(b.support_y.max()) <= 1.0 and float(b.support_y.min()) >= 0.0
    train = {id(u) for _, us in source.split_units("train") for u in us}
    val = {id(u) for _, us in source.split_units("val") for u in us}
    assert not train & val and len(val) == 20 + 49  # every 5th unit of FD001 (100) and FD004 (249)
    t = source.sample("test", 2, 5, 300, gen)
    true_rul = set(source.last_windows("FD002")[1].tolist())
    assert {round(v * 125) for v in t.query_y.flatten().tolist()} <= true_rul


def test_config_errors(cmapss_dir, tmp_path):
    base = {"name": "cmapss", "data_dir": cmapss_dir}
    with pytest.raises(ConfigError, match="must not be one of task.sources"):
        build_source({**base, "sources": ["FD001"], "target": "FD001"})
    with pytest.raises(ConfigError, match="unknown config key 'task.windw'"):
        build_source({**base, "windw": 30})
    with pytest.raises(ConfigError, match="data_dir is required"):
        build_source({"name": "cmapss"})
    with pytest.raises(DataError, match="not a folder"):
        build_source({"name": "cmapss", "data_dir": str(tmp_path / "nope")})
    # FD001 runs at sea level only: FD002's other five conditions cannot be normalised from it
    with pytest.raises(DataError, match="occurs in the target but not in the sources"):
        build_source({**base, "sources": ["FD001"], "target": "FD002"})
    # sensor 1 (fan inlet temperature) is set by the condition alone: constant, dropped by default
    with pytest.raises(DataError, match=r"sensors \[1\] are constant"):
        build_source({**base, "sources": ["FD001"], "target": "FD003", "sensors": [1, 2, 3]})
