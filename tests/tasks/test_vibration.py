"""The synthetic vibration family: bearing physics in the signal, raw windows in, Spectrum in the model."""

import math

import torch

from meta_train.model import build_model, init_params
from meta_train.tasks import build_source
from meta_train.tasks.vibration import CLASSES


def test_episodes_are_four_way_with_shuffled_labels_and_raw_windows():
    s = build_source({"name": "vibration", "window": 512, "bins": 32})
    b = s.sample("train", 6, 3, 4, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (6, 12, 512) and b.query_x.shape == (6, 16, 512)
    assert b.support_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    spec = {**s.model_spec_defaults(), "hidden": [16]}
    assert spec["input_transform"] == {"kind": "spectrum", "window": 512, "bins": 32}
    model = build_model(spec)
    out = torch.func.functional_call(model, init_params(model, torch.Generator().manual_seed(0)), (b.query_x[0],))
    assert out.shape == (16, 4)
    assert s.describe()["class_names"] == CLASSES and s.pretrain_classes == 4
    x, y = s.pretrain_batch(8, torch.Generator())
    assert x.shape == (8, 512) and y.max() < 4


def _envelope_peak(x, fs, fmax):
    env = (x - x.mean()).abs()
    spec = torch.fft.rfft(env - env.mean()).abs()
    freqs = torch.fft.rfftfreq(len(x), 1 / fs)
    keep = (freqs > 5) & (freqs < fmax)
    return float(freqs[keep][spec[keep].argmax()])


def test_outer_race_fault_repeats_at_bpfo():
    s = build_source({"name": "vibration", "window": 8192, "noise_min": 0.001, "noise_max": 0.001})
    m = s.machines([777])
    m["load"][:] = 1.0
    m["a1"][:] = 0.0
    m["a2"][:] = 0.0
    bpfo = float(m["fr"] * m["orders"][:, 1])
    x = s.windows(m, torch.tensor([2]), torch.Generator().manual_seed(0))[0]
    peak = _envelope_peak(x, s.opts.sample_rate, 1.5 * bpfo)
    assert math.isclose(peak, bpfo, rel_tol=0.05), (peak, bpfo)
    healthy = s.windows(m, torch.tensor([0]), torch.Generator().manual_seed(0))[0]
    assert float(x.std()) > 3 * float(healthy.std())


def test_machines_differ_between_splits_and_are_deterministic():
    s = build_source({"name": "vibration", "window": 256, "bins": 16})
    a = s.sample("test", 2, 1, 1, torch.Generator().manual_seed(5))
    b = s.sample("test", 2, 1, 1, torch.Generator().manual_seed(5))
    assert torch.equal(a.query_x, b.query_x)
