"""Run by torchrun in the DDP test: one meta-gradient on this rank's shard, averaged over ranks."""

import sys

import torch

from meta_train.algorithms import meta_gradient, resolve
from meta_train.config import AlgorithmConfig
from meta_train.inner import init_inner_lrs
from meta_train.model import build_model, init_params
from meta_train.tasks.sinusoid import SinusoidOptions, SinusoidSource
from meta_train.train import Distributed, leave_worker


def main(out_path: str, algorithm: str) -> None:
    ddp = Distributed("cpu")
    model = build_model({"in_features": 1, "hidden": [40, 40], "out_features": 1})
    params = {k: v.requires_grad_() for k, v in init_params(model, torch.Generator().manual_seed(0)).items()}
    alg = resolve(AlgorithmConfig(name=algorithm, inner_steps=2), "mse")
    lrs = {n: r.requires_grad_(alg.inner.learn_lr) for n, r in init_inner_lrs(params, alg.inner).items()}
    batch = SinusoidSource(SinusoidOptions()).sample("train", 8, 10, 10, torch.Generator().manual_seed(1))
    _, grads, lr_grads = meta_gradient(model, alg, params, lrs, batch.shard(ddp.rank, ddp.world))
    tensors = list(grads.values()) + list(lr_grads.values())
    ddp.average(tensors)
    if ddp.is_main:
        torch.save({"world": ddp.world, "grads": grads, "lr_grads": lr_grads}, out_path)
    ddp.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave_worker(0)
