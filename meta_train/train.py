"""Meta-training loop: sample a meta-batch, take one meta-gradient step, log, checkpoint.

Under `torchrun` each process takes its slice of the same global meta-batch (every rank draws it from
the same seeded generator) and the meta-gradients are averaged with all-reduce: DDP over the task batch.
A functional parameter dict makes this a plain all-reduce; there is no module to wrap.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .algorithms import Algorithm, meta_gradient, resolve
from .config import Config, to_dict
from .errors import ConfigError
from .inner import init_inner_lrs
from .model import build_model, init_params
from .tasks import build_source


def model_spec(cfg: Config, source) -> dict:
    return {**source.model_spec_defaults(), "hidden": list(cfg.model.hidden), "activation": cfg.model.activation}


def meta_lr_at(cfg: Config, iteration: int) -> float:
    t = cfg.train
    if t.schedule == "constant":
        return t.meta_lr
    progress = min(iteration / max(t.iterations, 1), 1.0)
    return t.min_meta_lr + 0.5 * (t.meta_lr - t.min_meta_lr) * (1 + math.cos(math.pi * progress))


class Distributed:
    """World size 1 unless launched by torchrun; then gloo on CPU, nccl on CUDA."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def average(self, tensors: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def close(self) -> None:
        # Without an orderly teardown a rank can exit while gloo threads still run: SIGABRT at exit.
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled and sys.stderr.isatty()
        self.t0 = time.time()
        self.last = 0.0

    def update(self, iteration: int, loss: float) -> None:
        now = time.time()
        if not self.enabled or (now - self.last < 0.2 and iteration < self.total):
            return
        self.last = now
        done = iteration - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - iteration) / max(rate, 1e-9)
        bar = "#" * int(30 * iteration / self.total)
        sys.stderr.write(
            f"\r[{bar:<30}] {iteration}/{self.total} meta-loss {loss:.4f} {rate:.0f} it/s eta {eta:.0f}s "
        )
        if iteration >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _leaves(params: dict, lrs: dict) -> list[torch.Tensor]:
    return list(params.values()) + [r for r in lrs.values() if r.requires_grad]


def meta_step(model, alg: Algorithm, params: dict, lrs: dict, optimizer, batch, iteration: int, cfg: Config,
              ddp: "Distributed | None" = None, fast: bool | None = None) -> float:
    """One outer update: meta-gradient, average over processes, clip, Adam step. Returns the meta-loss.

    The benchmark in benchmarks/trainer_speed.py times exactly this function.
    """
    loss, param_grads, lr_grads = meta_gradient(model, alg, params, lrs, batch, iteration, fast=fast)
    grads = [param_grads[n] for n in params] + [lr_grads[n] for n in lrs if lrs[n].requires_grad]
    loss_buf = loss.detach().reshape(1).clone()
    if ddp is not None:
        ddp.average(grads + [loss_buf])
    if cfg.train.grad_clip > 0:  # one foreach norm over all gradients, not one reduction per tensor
        total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        scale = min(1.0, cfg.train.grad_clip / (float(total) + 1e-12))
    else:
        scale = 1.0
    for leaf, g in zip(_leaves(params, lrs), grads):  # the gradients are fresh tensors: no copy unless scaled
        leaf.grad = g * scale if scale < 1.0 else g
    for group in optimizer.param_groups:
        group["lr"] = meta_lr_at(cfg, iteration)
    optimizer.step()
    with torch.no_grad():  # a learned inner rate may not turn into gradient ascent
        for r in lrs.values():
            if r.requires_grad:
                r.clamp_(min=0.0)
    return float(loss_buf)


def train(cfg: Config, out_dir: str | Path, resume: bool = False, max_iterations: int | None = None,
          source=None) -> Path:
    """Meta-train according to `cfg`; write checkpoint.pt and metrics.jsonl into `out_dir`.

    `source` replaces the one `cfg.task` describes (benchmarks pass a feature-caching wrapper of it).
    """
    out_dir = Path(out_dir)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no GPU is visible")
    ddp = Distributed(cfg.device)
    if ddp.world > 1 and cfg.train.meta_batch % ddp.world:
        raise ConfigError(f"train.meta_batch={cfg.train.meta_batch} must divide by the {ddp.world} processes")

    torch.manual_seed(cfg.seed)
    source = build_source(cfg.task) if source is None else source
    spec = model_spec(cfg, source)
    model = build_model(spec).to(device)
    alg: Algorithm = resolve(cfg.algorithm, source.loss)
    task_gen = torch.Generator().manual_seed(cfg.seed)
    params = {n: p.to(device).requires_grad_() for n, p in init_params(model, torch.Generator().manual_seed(cfg.seed)).items()}
    lrs = {n: r.to(device).requires_grad_(alg.inner.learn_lr) for n, r in init_inner_lrs(params, alg.inner).items()}
    optimizer = torch.optim.Adam(_leaves(params, lrs), lr=cfg.train.meta_lr, fused=device.type in ("cpu", "cuda"))
    start = 0

    ckpt_path = out_dir / checkpoint.FILENAME
    if resume:
        state = checkpoint.load(ckpt_path)
        with torch.no_grad():
            for n in params:
                params[n].copy_(state["params"][n])
            for n in lrs:
                lrs[n].copy_(state["inner_lrs"][n])
        optimizer.load_state_dict(state["optimizer"])
        task_gen.set_state(state["generator_state"])
        start = int(state["iteration"])

    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(out_dir / "metrics.jsonl", "a") if ddp.is_main else None
    stop = cfg.train.iterations if max_iterations is None else min(cfg.train.iterations, start + max_iterations)
    progress = Progress(cfg.train.iterations, start, cfg.train.progress and ddp.is_main)
    running, t0 = None, time.time()

    def save(iteration):
        if ddp.is_main:
            checkpoint.save(
                ckpt_path,
                model_spec=spec,
                config=to_dict(cfg),
                source=source.describe(),
                algorithm=alg,
                params={n: p.detach().cpu() for n, p in params.items()},
                inner_lrs={n: r.detach().cpu() for n, r in lrs.items()},
                iteration=iteration,
                optimizer=optimizer.state_dict(),
                generator_state=task_gen.get_state(),
            )

    for iteration in range(start, stop):
        batch = source.sample("train", cfg.train.meta_batch, cfg.train.shots, cfg.train.query, task_gen)
        batch = batch.shard(ddp.rank, ddp.world).to(device)
        loss_value = meta_step(model, alg, params, lrs, optimizer, batch, iteration, cfg, ddp)
        running = loss_value if running is None else 0.98 * running + 0.02 * loss_value
        done = iteration + 1
        progress.update(done, running)
        if metrics and (done % cfg.train.log_every == 0 or done == stop):
            record = {"iteration": done, "meta_loss": loss_value, "meta_loss_ema": running,
                      "meta_lr": meta_lr_at(cfg, iteration), "elapsed_s": round(time.time() - t0, 3)}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
            save(done)
    save(stop)
    if metrics:
        metrics.close()
    ddp.close()
    return ckpt_path
