"""CWRU on a small slice of the real files: protocols, disjoint support/query regions, config and data errors."""

import numpy as np
import pytest
import torch

from meta_train.errors import ConfigError, DataError
from meta_train.tasks import build_source
from meta_train.tasks.cwru import FAULTS, decimate4

SLICE = 20000


def cwru(cwru_dir, **kw):
    return build_source({"name": "cwru", "data_dir": cwru_dir, "max_samples": SLICE, "window": 512, "bins": 32, **kw})


def test_faults9_cross_load_episodes(cwru_dir):
    s = cwru(cwru_dir, source_loads=[3], target_load=0)
    assert set(k[0] for k in s.recordings) == {0, 3} and len(s.recordings) == 18
    b = s.sample("train", 3, 2, 4, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (3, 18, 512) and b.query_y.shape == (3, 36)
    assert sorted(b.support_y[0].tolist()) == sorted(list(range(9)) * 2)
    t = s.sample("test", 2, 1, 2, torch.Generator().manual_seed(0))
    assert t.support_x.shape == (2, 9, 512)
    spec = s.model_spec_defaults()
    assert spec["out_features"] == 9 and spec["input_transform"]["kind"] == "spectrum"
    x, y = s.pretrain_batch(10, torch.Generator())
    assert x.shape == (10, 512) and int(y.max()) < 9 and s.pretrain_classes == 9


def test_healthy10_puts_normal_only_in_target_episodes(cwru_dir):
    s = cwru(cwru_dir, source_loads=[1, 2], target_load=0, protocol="healthy10")
    assert s.class_names == FAULTS + ["normal"] and s.model_spec_defaults()["out_features"] == 10
    train = s.sample("train", 20, 1, 1, torch.Generator().manual_seed(0))
    assert train.support_x.shape == (20, 9, 512)
    labels_used = {tuple(sorted(row.tolist())) for row in train.support_y}
    assert len(labels_used) > 1 and all(len(set(l)) == 9 for l in labels_used)  # a random nine of ten
    test = s.sample("test", 2, 3, 2, torch.Generator().manual_seed(0))
    assert test.support_x.shape == (2, 30, 512) and sorted(set(test.support_y[0].tolist())) == list(range(10))
    normal = s.recordings[(0, "normal")]
    assert abs(len(normal) - SLICE) <= 1  # decimated 48 kHz -> 12 kHz before the slice


def test_support_and_query_never_share_a_sample(cwru_dir):
    s = cwru(cwru_dir)
    for k in s.recordings:  # replace the signal by its sample index to see where windows came from
        s.recordings[k] = torch.arange(len(s.recordings[k]), dtype=torch.float32) + 1e6 * FAULTS.index(k[1])
    for split in ("train", "val", "test"):
        b = s.sample(split, 4, 3, 5, torch.Generator().manual_seed(1))
        for t in range(4):
            sup = set(b.support_x[t].reshape(-1).tolist())
            qry = set(b.query_x[t].reshape(-1).tolist())
            assert not sup & qry
            used = sup | qry
            cut = int(SLICE * 0.8)
            idx = {v % 1e6 for v in used}
            if split == "train":
                assert max(idx) < cut
            if split == "val":
                assert min(idx) >= cut


def test_config_and_data_errors(cwru_dir, tmp_path):
    with pytest.raises(ConfigError, match="data_dir is required"):
        build_source({"name": "cwru"})
    with pytest.raises(ConfigError, match="healthy10 needs target_load: 0"):
        cwru(cwru_dir, source_loads=[0], target_load=1, protocol="healthy10")
    with pytest.raises(ConfigError, match="must not be one of"):
        cwru(cwru_dir, source_loads=[0, 3], target_load=3)
    with pytest.raises(ConfigError, match="task.source_load"):
        build_source({"name": "cwru", "data_dir": cwru_dir, "source_load": 3})
    with pytest.raises(DataError, match="no 12k_drive_end"):
        build_source({"name": "cwru", "data_dir": str(tmp_path)})


def test_decimate4_keeps_the_band_and_removes_aliases():
    t = np.arange(48000 * 2) / 48000.0
    low = decimate4(np.sin(2 * np.pi * 1000 * t))
    high = decimate4(np.sin(2 * np.pi * 9000 * t))  # would alias to 3 kHz at 12 kHz
    assert len(low) == 24000
    assert 0.65 < low[1000:-1000].std() < 0.75 and high[1000:-1000].std() < 0.01
