"""Process-quality regression: one task = one extrusion line (machine + product) with its own response.

Inputs are the four process settings as the line's own sensors report them, in physical units:

    temperature  melt temperature            180 .. 260  degC
    pressure     die pressure                 50 .. 150  bar
    speed        screw speed                  30 .. 120  rpm
    feed         feed rate                    20 .. 60   kg/h

The target `quality` is a quality score (10 = perfect part). Every line has its own process window:

    z_i     = (true_i - optimum_i) / half_width_i              true_T = measured_T - sensor_offset
    quality = peak + gauge_offset
              - gain * (c_T z_T^2 + c_P z_P^2 + c_S z_S^2 + c_F z_F^2 + rho z_S z_F) + noise

with, per task, optimum_i uniform in the middle of the window, curvatures c_i in [0.5, 1.5], gain in
[0.5, 1.5], a speed x feed interaction rho in [-0.8, 0.8] (the throughput-per-revolution coupling:
raising the feed is only good when the screw speed rises with it), a thermocouple offset in [-8, 8] degC
and a quality-gauge offset in [-1, 1]; measurement noise sd 0.1. docs/tasks.md has the full table.

Splits come from disjoint seed streams (meta_train.tasks.common): a test task is never a training task.
`python -m meta_train.tasks.quality --dump-task out.npz --n 500 --seed 7` writes one unseen test task.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import from_dict
from ..errors import ConfigError
from . import TaskBatch
from .common import check_split, task_ids, task_uniforms

FEATURES = ["temperature", "pressure", "speed", "feed"]
UNITS = {"temperature": "degC", "pressure": "bar", "speed": "rpm", "feed": "kg/h", "quality": "score (10 = perfect)"}
RANGES = {"temperature": (180.0, 260.0), "pressure": (50.0, 150.0), "speed": (30.0, 120.0), "feed": (20.0, 60.0)}
PARAM_NAMES = ["opt_temperature", "opt_pressure", "opt_speed", "opt_feed", "c_temperature", "c_pressure",
               "c_speed", "c_feed", "gain", "rho", "sensor_offset", "gauge_offset"]


@dataclass
class QualityOptions:
    seed: int = 0
    noise: float = 0.1
    peak: float = 8.0
    # optimum_i is drawn in [lo + f * width, hi - f * width]; 0.1 = the middle 80 % of the window
    optimum_margin: float = 0.1
    gain_min: float = 0.5
    gain_max: float = 2.0
    curvature_min: float = 0.8
    curvature_max: float = 1.2
    interaction_max: float = 0.5
    sensor_offset_max: float = 8.0
    gauge_offset_max: float = 1.0
    features: list[str] = field(default_factory=lambda: list(FEATURES))


class QualitySource:
    kind = "regression"
    loss = "mse"

    def __init__(self, opts: QualityOptions):
        if opts.features != FEATURES:
            raise ConfigError(f"task.features of the quality family is fixed to {FEATURES}")
        if not 0 <= opts.optimum_margin < 0.5:
            raise ConfigError("task.optimum_margin must be in [0, 0.5)")
        if 2 * opts.curvature_min <= opts.interaction_max:
            raise ConfigError("task.interaction_max must stay below 2 * curvature_min (the bowl must stay convex)")
        self.opts = opts
        self.lo = torch.tensor([RANGES[f][0] for f in FEATURES], dtype=torch.float64)
        self.hi = torch.tensor([RANGES[f][1] for f in FEATURES], dtype=torch.float64)

    @classmethod
    def from_config(cls, cfg: dict) -> "QualitySource":
        return cls(from_dict(QualityOptions, cfg, "task"))

    # --- the generator -------------------------------------------------------------------------
    def task_params(self, ids) -> torch.Tensor:
        """[len(ids), 12] task parameters (PARAM_NAMES order), a pure function of (seed, task id)."""
        o = self.opts
        u = task_uniforms(o.seed, ids, 12)
        width = self.hi - self.lo
        opt = u[:, 0:4] * (1 - 2 * o.optimum_margin) * width + self.lo + o.optimum_margin * width
        curv = o.curvature_min + (o.curvature_max - o.curvature_min) * u[:, 4:8]
        gain = o.gain_min + (o.gain_max - o.gain_min) * u[:, 8:9]
        rho = o.interaction_max * (2 * u[:, 9:10] - 1)
        sensor = o.sensor_offset_max * (2 * u[:, 10:11] - 1)
        gauge = o.gauge_offset_max * (2 * u[:, 11:12] - 1)
        return torch.cat([opt, curv, gain, rho, sensor, gauge], dim=1)

    def response(self, params: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Quality of measured settings x [..., n, 4] for task params [..., 12] (float64 in, float64 out)."""
        half = (self.hi - self.lo) / 2
        opt, curv = params[..., None, 0:4], params[..., None, 4:8]
        gain, rho = params[..., None, 8], params[..., None, 9]
        sensor, gauge = params[..., None, 10], params[..., None, 11]
        true = x.clone()
        true[..., 0] = x[..., 0] - sensor
        z = (true - opt) / half
        bowl = (curv * z**2).sum(-1) + rho * z[..., 2] * z[..., 3]
        y = self.opts.peak + gauge - gain * bowl
        return y if noise is None else y + self.opts.noise * noise

    def _settings(self, batch: int, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.rand(batch, n, 4, generator=generator, dtype=torch.float64)

    def _points(self, params, n, generator):
        x = self._settings(params.shape[0], n, generator)
        y = self.response(params, x, torch.randn(x.shape[:-1], generator=generator, dtype=torch.float64))
        return x.float(), y.float()

    # --- the TaskSource protocol ---------------------------------------------------------------
    def model_spec_defaults(self) -> dict:
        # measured settings are uniform over the operating window in every split: exact statistics
        mean = ((self.lo + self.hi) / 2).tolist()
        std = ((self.hi - self.lo) / math.sqrt(12)).tolist()
        return {"in_features": 4, "out_features": 1,
                "input_transform": {"kind": "standardize", "mean": mean, "std": std}}

    def sample(self, split: str, batch: int, shots: int, query: int, generator: torch.Generator) -> TaskBatch:
        check_split(split)
        params = self.task_params(task_ids(split, batch, generator))
        sx, sy = self._points(params, shots, generator)
        qx, qy = self._points(params, query, generator)
        return TaskBatch(sx, sy, qx, qy)

    def pretrain_batch(self, size: int, generator: torch.Generator):
        params = self.task_params(task_ids("train", size, generator))
        x, y = self._points(params, 1, generator)
        return x[:, 0], y[:, 0]

    def describe(self) -> dict:
        return {"name": "quality", "kind": self.kind, "feature_names": list(FEATURES), "target_name": "quality",
                "class_names": None, "units": dict(UNITS), "ranges": {k: list(v) for k, v in RANGES.items()}}


def unseen_task_id(seed: int) -> int:
    """The task id of `--seed` in the test stream (deterministic, never a training task)."""
    return task_ids("test", 1, torch.Generator().manual_seed(int(seed)))[0]


def write_task_file(path: str | Path, n: int, seed: int, opts: QualityOptions | None = None) -> dict:
    """Dump `n` samples of one unseen test task to an .npz (no pickles):

    x [n, 4] float32 (measured settings, physical units), y [n] float32 (noisy quality),
    y_clean [n] float32 (noise-free), feature_names, target_name, task_params + param_names (for the
    record), task_id, seed. Returns a short summary.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    source = QualitySource(opts or QualityOptions())
    tid = unseen_task_id(seed)
    params = source.task_params([tid])[0]
    gen = torch.Generator().manual_seed(int(seed) + 1)
    x = source._settings(1, n, gen)
    noise = torch.randn(x.shape[:-1], generator=gen, dtype=torch.float64)
    y = source.response(params[None], x, noise)[0]
    y_clean = source.response(params[None], x)[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x[0].numpy().astype(np.float32), y=y.numpy().astype(np.float32),
             y_clean=y_clean.numpy().astype(np.float32), feature_names=np.array(FEATURES),
             target_name=np.array("quality"), task_params=params.numpy(), param_names=np.array(PARAM_NAMES),
             task_id=np.array(tid, dtype=np.int64), seed=np.array(int(seed), dtype=np.int64))
    return {"path": str(path), "n": n, "seed": int(seed), "task_id": tid,
            "params": dict(zip(PARAM_NAMES, [round(float(v), 4) for v in params]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meta_train.tasks.quality",
                                     description="Dump one unseen quality test task for the line simulator.")
    parser.add_argument("--dump-task", required=True, metavar="OUT.npz")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7, help="which test task (any integer)")
    parser.add_argument("--config", help="YAML whose task: section sets the family options (e.g. configs/quality.yaml)")
    args = parser.parse_args(argv)
    opts = QualityOptions()
    if args.config:
        import yaml

        task = dict((yaml.safe_load(Path(args.config).read_text()) or {}).get("task") or {})
        if task.pop("name", "quality") != "quality":
            raise SystemExit(f"{args.config}: task.name is not quality")
        opts = from_dict(QualityOptions, task, "task")
    print(json.dumps(write_task_file(args.dump_task, args.n, args.seed, opts)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
