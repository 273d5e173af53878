"""Tiny runs and hand-written checkpoints for tests/export (a helper module, not a test file).

Training is a few dozen iterations: the exporter's correctness does not depend on how well the model
learned, only on the graph matching `adapt`."""

from __future__ import annotations

from pathlib import Path

import torch

from meta_train import checkpoint
from meta_train.algorithms import resolve
from meta_train.config import AlgorithmConfig, Config, load_config, to_dict
from meta_train.inner import init_inner_lrs
from meta_train.model import build_model, init_params
from meta_train.train import train

REPO = Path(__file__).resolve().parents[2]


def train_run(out: Path, algorithm: str, iterations: int = 30, steps: int = 2) -> Path:
    overrides = [
        f"algorithm.name={algorithm}", f"algorithm.inner_steps={steps}", f"train.iterations={iterations}",
        "train.meta_batch=4", "train.progress=false", "train.checkpoint_every=0", "model.hidden=[16,16]",
        "baselines.pretrain_iterations=40",  # the pooled model meta-export now ships: cheap here
    ]
    train(load_config(None, overrides), out)
    return out


def write_checkpoint(out: Path, spec: dict, *, algorithm: str = "maml", steps: int = 1, loss: str = "mse",
                     source: dict | None = None, task: dict | None = None, lr: float = 0.05, seed: int = 0,
                     perturb_lrs: bool = False) -> Path:
    """A checkpoint in meta_train/train.py's form for a model no task source produces yet."""
    torch.manual_seed(seed)
    cfg = Config(task=task or {"name": "not-available-here"})
    cfg.algorithm = AlgorithmConfig(name=algorithm, inner_steps=steps, inner_lr=lr)
    model = build_model(spec)
    alg = resolve(cfg.algorithm, loss)
    params = init_params(model, torch.Generator().manual_seed(seed))
    lrs = init_inner_lrs(params, alg.inner)
    if perturb_lrs:  # learned rates differ per element / step; a graph that ignored them would show
        lrs = {n: r * (0.5 + torch.rand(r.shape)) for n, r in lrs.items()}
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(
        out / checkpoint.FILENAME, model_spec=spec, config=to_dict(cfg),
        source=source or {"name": "handmade", "kind": "regression" if loss == "mse" else "classification"},
        algorithm=alg, params=params, inner_lrs=lrs, iteration=0, optimizer={}, generator_state=torch.Generator().get_state(),
    )
    return out


QUALITY_SPEC = {
    "in_features": 4, "hidden": [16, 16], "out_features": 1, "activation": "relu",
    "input_transform": {"kind": "standardize", "mean": [180.0, 2.5, 60.0, 0.3], "std": [12.0, 0.4, 9.0, 0.05]},
}

SPECTRUM_SPEC = {
    "in_features": 1024, "hidden": [64, 64], "out_features": 5, "activation": "relu",
    "input_transform": {"kind": "spectrum", "window": 1024, "bins": 64},
}
