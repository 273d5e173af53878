"""Vibration fault diagnosis: one task = one machine; 4-way episodes healthy / inner race / outer race / ball.

Each machine (drawn from the split's own seed stream) has its own shaft speed, load, bearing (from a
small catalogue of deep-groove ball bearings), two structural resonances with their damping, transmission
gains, fault severities, shaft-harmonic levels and noise floor. A window is an accelerometer signal in g
sampled at `sample_rate`:

    x(t) = a1 sin(2 pi fr t + p1) + a2 sin(2 pi 2fr t + p2)                  imbalance / misalignment
         + sum_k A_k h(t - t_k)                                              bearing impacts (faults only)
         + noise

- impact times t_k: a train at the fault's characteristic frequency with 1 % slip jitter (rolling elements
  slide a little), random phase. Outer race: BPFO = n/2 fr (1 - d/D cos a); inner race:
  BPFI = n/2 fr (1 + d/D cos a); ball: 2 BSF = D/d fr (1 - (d/D cos a)^2) (a ball hits both races).
- amplitudes A_k: severity x load factor; the outer-race defect sits in the load zone (constant amplitude),
  the inner-race defect rotates through it (modulated at fr), the ball's at the cage frequency
  FTF = fr/2 (1 - d/D cos a).
- h: each impact rings two structural resonances (exp-decaying sines, housing 1.5-3 kHz, bearing/sensor
  mount 3-5.5 kHz), weighted by a path gain: an inner-race or ball impact crosses one more interface
  than an outer-race one, so it reaches the sensor weaker and low-passed; plus a short non-oscillating
  pulse (the impact's rigid-body part) that puts lines at the fault frequency and harmonics.

The model sees raw windows; the Spectrum transform inside the model (log band power via a fixed DFT
matmul) is the preprocessing, exported inside the graph. Splits are disjoint seed streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import from_dict
from ..errors import ConfigError
from . import TaskBatch
from .common import check_split, task_ids, task_uniforms

CLASSES = ["healthy", "inner_race", "outer_race", "ball"]
# (name, rolling elements n, ball diameter d [mm], pitch diameter D [mm], contact angle [deg])
BEARINGS = [("6205", 9, 7.94, 39.04, 0.0), ("6203", 8, 6.75, 28.5, 0.0), ("6308", 8, 15.0, 65.0, 0.0),
            ("6312", 8, 22.2, 85.0, 0.0), ("7205", 13, 7.94, 38.5, 25.0)]
N_PARAMS = 20


@dataclass
class VibrationOptions:
    seed: int = 0
    sample_rate: float = 12000.0
    window: int = 1024
    bins: int = 64
    rpm_min: float = 900.0
    rpm_max: float = 3600.0
    load_min: float = 0.0  # fraction of rated load
    load_max: float = 1.0
    resonance1_min: float = 1500.0
    resonance1_max: float = 3000.0
    resonance2_min: float = 3000.0
    resonance2_max: float = 5500.0
    severity_min: float = 0.3  # impact amplitude in g at full load, per fault class and machine
    severity_max: float = 1.5
    noise_min: float = 0.02  # g rms
    noise_max: float = 0.10
    slip: float = 0.01


class VibrationSource:
    kind = "classification"
    loss = "cross_entropy"
    pretrain_classes = len(CLASSES)

    def __init__(self, opts: VibrationOptions):
        if opts.window < 64 or opts.bins < 2 or opts.bins > opts.window // 2:
            raise ConfigError("task.window must be >= 64 and 2 <= task.bins <= window / 2")
        if not (0 < opts.rpm_min <= opts.rpm_max):
            raise ConfigError("task.rpm_min must be > 0 and <= rpm_max")
        if opts.resonance2_max >= opts.sample_rate / 2:
            raise ConfigError("task.resonance2_max must be below the Nyquist frequency sample_rate / 2")
        self.opts = opts
        self.n_way = len(CLASSES)
        geo = torch.tensor([[n, d, D, math.radians(a)] for _, n, d, D, a in BEARINGS], dtype=torch.float64)
        n, d, D, a = geo.unbind(1)
        r = d / D * torch.cos(a)
        # characteristic frequencies per shaft Hz: [BPFI, BPFO, 2 BSF, FTF]
        self.orders = torch.stack([n / 2 * (1 + r), n / 2 * (1 - r), D / d * (1 - r**2), 0.5 * (1 - r)], dim=1)

    @classmethod
    def from_config(cls, cfg: dict) -> "VibrationSource":
        return cls(from_dict(VibrationOptions, cfg, "task"))

    # --- machines ----------------------------------------------------------------------------
    def machines(self, ids) -> dict:
        o = self.opts
        u = task_uniforms(o.seed, ids, N_PARAMS)
        lerp = lambda lo, hi, v: lo + (hi - lo) * v  # noqa: E731
        bearing = (u[:, 0] * len(BEARINGS)).long().clamp_max(len(BEARINGS) - 1)
        return {
            "fr": lerp(o.rpm_min, o.rpm_max, u[:, 1]) / 60.0,
            "load": lerp(o.load_min, o.load_max, u[:, 2]),
            "orders": self.orders[bearing],  # [B, 4]
            "f1": lerp(o.resonance1_min, o.resonance1_max, u[:, 3]),
            "f2": lerp(o.resonance2_min, o.resonance2_max, u[:, 4]),
            "zeta1": lerp(0.02, 0.08, u[:, 5]),
            "zeta2": lerp(0.02, 0.08, u[:, 6]),
            "w2": lerp(0.3, 1.0, u[:, 7]),  # weight of the second resonance
            "severity": lerp(o.severity_min, o.severity_max, u[:, 8:11]),  # IR, OR, ball
            "mod": lerp(0.3, 0.9, u[:, 11]),  # modulation depth through the load zone
            "path": lerp(0.4, 0.8, u[:, 12]),  # inner race / ball transmission loss
            "a1": lerp(0.01, 0.1, u[:, 13]),
            "a2": lerp(0.005, 0.05, u[:, 14]),
            "noise": lerp(o.noise_min, o.noise_max, u[:, 15]),
            "pulse": lerp(0.05, 0.3, u[:, 16]),  # rigid-body part of an impact
            "gain": lerp(0.8, 1.25, u[:, 17]),  # sensor sensitivity
        }

    def windows(self, m: dict, cls: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One window per row: machine params m (each [N, ...]) and class index cls [N] -> [N, window]."""
        o = self.opts
        fs, w = o.sample_rate, o.window
        n = cls.shape[0]
        tail = 256
        length = w + tail
        t = torch.arange(w, dtype=torch.float64) / fs
        rnd = lambda *s: torch.rand(*s, generator=generator, dtype=torch.float64)  # noqa: E731
        fr = m["fr"][:, None]
        x = m["a1"][:, None] * torch.sin(2 * math.pi * fr * t + 2 * math.pi * rnd(n, 1))
        x = x + m["a2"][:, None] * torch.sin(2 * math.pi * 2 * fr * t + 2 * math.pi * rnd(n, 1))
        x = x.float() + m["noise"][:, None].float() * torch.randn(n, w, generator=generator)

        faulty = cls > 0
        if faulty.any():
            # characteristic frequency and modulation frequency of each window's fault
            order_idx = torch.tensor([0, 0, 1, 2])[cls]  # healthy rows get a dummy, masked below
            f_fault = m["fr"] * m["orders"].gather(1, order_idx[:, None])[:, 0]
            f_mod = torch.where(cls == 1, m["fr"], torch.where(cls == 3, m["fr"] * m["orders"][:, 3], torch.zeros_like(m["fr"])))
            k_max = int(math.ceil(length / fs * float(f_fault.max()))) + 2
            k = torch.arange(k_max, dtype=torch.float64)
            period = 1.0 / f_fault[:, None]
            jitter = 1 + o.slip * torch.randn(n, k_max, generator=generator, dtype=torch.float64)
            times = period * rnd(n, 1) + torch.cumsum(period * jitter, dim=1) - period * jitter[:, :1]
            sev = m["severity"].gather(1, (cls.clamp_min(1) - 1)[:, None])[:, 0]
            amp = sev * (0.3 + 0.7 * m["load"]) * faulty.double()
            amp = amp * torch.where(cls == 2, torch.ones_like(amp), m["path"])
            depth = torch.where(cls == 2, torch.zeros_like(m["mod"]), m["mod"])  # outer race: stationary defect
            modulation = 1 + depth[:, None] * torch.cos(2 * math.pi * f_mod[:, None] * (times - tail / fs) + 2 * math.pi * rnd(n, 1))
            a_k = amp[:, None] * modulation * (0.9 + 0.2 * rnd(n, k_max))
            pos = (times * fs).round().long()
            keep = pos < length
            impulses = torch.zeros(n, length)
            impulses.scatter_add_(1, pos.clamp_max(length - 1), (a_k * keep).float())
            # impulse response: two resonances + a short rigid-body pulse; inner race / ball is low-passed
            th = torch.arange(tail, dtype=torch.float64) / fs
            r1 = torch.exp(-m["zeta1"][:, None] * 2 * math.pi * m["f1"][:, None] * th) * torch.sin(2 * math.pi * m["f1"][:, None] * th)
            r2 = torch.exp(-m["zeta2"][:, None] * 2 * math.pi * m["f2"][:, None] * th) * torch.sin(2 * math.pi * m["f2"][:, None] * th)
            w2 = m["w2"] * torch.where(cls == 2, torch.ones_like(amp), m["path"])
            pulse = m["pulse"][:, None] * torch.exp(-th * fs / 6.0)
            h = (r1 + w2[:, None] * r2 + pulse).float()
            size = length + tail  # >= length + tail - 1: a linear, not circular, convolution
            conv = torch.fft.irfft(torch.fft.rfft(impulses, size) * torch.fft.rfft(h, size), size)
            x = x + conv[:, tail:length]
        return (m["gain"][:, None] * x).float()

    # --- the TaskSource protocol ---------------------------------------------------------------
    def sample(self, split: str, batch: int, shots: int, query: int, generator: torch.Generator) -> TaskBatch:
        check_split(split)
        m = self.machines(task_ids(split, batch, generator))
        c = self.n_way
        per_class = shots + query
        # episode label j <- class perm[j]: a fresh class -> label assignment per task
        perm = torch.stack([torch.randperm(c, generator=generator) for _ in range(batch)])  # [B, c]
        cls = perm[:, :, None].expand(batch, c, per_class).reshape(-1)
        rows = {k: v.repeat_interleave(c * per_class, dim=0) for k, v in m.items()}
        x = self.windows(rows, cls, generator).view(batch, c, per_class, -1)
        labels = torch.arange(c)[None, :, None].expand(batch, c, per_class)
        sx = x[:, :, :shots].reshape(batch, c * shots, -1)
        qx = x[:, :, shots:].reshape(batch, c * query, -1)
        sy = labels[:, :, :shots].reshape(batch, -1)
        qy = labels[:, :, shots:].reshape(batch, -1)
        return TaskBatch(sx, sy, qx, qy)

    def pretrain_batch(self, size: int, generator: torch.Generator):
        m = self.machines(task_ids("train", size, generator))
        cls = torch.randint(0, self.n_way, (size,), generator=generator)
        return self.windows(m, cls, generator), cls

    def model_spec_defaults(self) -> dict:
        o = self.opts
        return {"in_features": o.window, "out_features": self.n_way,
                "input_transform": {"kind": "spectrum", "window": o.window, "bins": o.bins}}

    def describe(self) -> dict:
        o = self.opts
        return {"name": "vibration", "kind": self.kind, "feature_names": [f"a[{i}]" for i in range(o.window)],
                "target_name": "condition", "class_names": list(CLASSES), "sample_rate": o.sample_rate,
                "window": o.window, "bins": o.bins, "units": "g"}
