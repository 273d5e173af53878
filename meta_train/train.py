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

from . import checkpoint, split_guard
from .algorithms import Algorithm, meta_gradient, resolve, splits_tasks
from .config import Config, to_dict
from .errors import ConfigError, NonFiniteError
from .inner import init_inner_lrs
from .model import build_model, init_params
from .tasks import build_source


def model_spec(cfg: Config, source) -> dict:
    m = cfg.model
    spec = {**source.model_spec_defaults(), "hidden": list(m.hidden), "activation": m.activation}
    if m.kind == "cnn1d":
        spec.update(kind="cnn1d", channels=list(m.channels), kernel=m.kernel)
    return spec


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


def leave_worker(code: int) -> None:
    """End a torchrun worker process now, without interpreter finalization (call it last: nothing after runs).

    Why: gloo's worker threads outlive destroy_process_group, and at finalization Python kills a thread that
    asks for the GIL; when that is one of gloo's, the process aborts (std::terminate, SIGABRT, exit -6) after
    all its work is done, and torchrun reports the run failed. Seen in ~5 % of 2-rank runs on this machine (gdb:
    a pt_gloo_runloop thread in pthread_exit while the main thread was in Py_FinalizeEx's final collection).
    Everything train() writes is closed and fsynced before it returns.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Progress:
    """A tqdm bar on a terminal; anywhere else (a log file, a pipe, CI) plain log lines from tqdm's formatter.

    A bar's carriage returns make one unreadable line in a log, so off a terminal a line is written at the
    `train.log_every` iterations, at most one per `every_s` seconds, and always one at the end.
    """

    FORMAT = "{desc}: {n}/{total} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, total: int, start: int, enabled: bool, log_every: int, every_s: float, stream=None):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.total, self.start, self.log_every, self.every_s = total, start, max(log_every, 1), every_s
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.bar = tqdm(total=total, initial=start, file=self.stream, desc="meta-train", unit="it",
                        dynamic_ncols=True, disable=not self.tty, leave=True)
        self.format_meter = tqdm.format_meter
        self.t0 = self.last = time.time()

    def update(self, iteration: int, loss: float, force: bool = False) -> None:
        if self.tty:
            self.bar.set_postfix_str(f"meta-loss {loss:.4g}", refresh=False)
            self.bar.update(iteration - self.bar.n)
            return
        if not self.enabled:
            return
        now = time.time()
        final = force or iteration >= self.total
        if not final and (iteration % self.log_every or now - self.last < self.every_s):
            return
        self.last = now
        elapsed = now - self.t0
        rate = (iteration - self.start) / elapsed if elapsed > 0 else None
        line = self.format_meter(iteration, self.total, elapsed, prefix="meta-train", rate=rate,
                                 bar_format=self.FORMAT, postfix=f"meta-loss {loss:.4g}")
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, iteration: int | None = None, loss: float | None = None) -> None:
        """Ends the bar; off a terminal, a last line for a run stopped before `total` (max_iterations, an error)."""
        if iteration is not None and loss is not None and not self.tty and iteration < self.total:
            self.update(iteration, loss, force=True)
        self.bar.close()


_HEAP_KEPT = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS. Returns whether set.

    A meta-batch allocates and frees the same few MiB every iteration (per-task weights, the inner loop's tape).
    With glibc's defaults the top of the heap is trimmed (and blocks over its dynamic mmap threshold are
    unmapped) after each iteration, so the next one page-faults it back in: at B=100 with 5 second-order inner
    steps that was ~800 page faults and ~1.6 ms of kernel time in a ~7 ms iteration. Process-wide; idempotent;
    a no-op where the C library is not glibc.
    """
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        _HEAP_KEPT = bool(libc.mallopt(m_trim_threshold, 256 << 20)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        _HEAP_KEPT = False
    return _HEAP_KEPT


def _leaves(params: dict, lrs: dict) -> list[torch.Tensor]:
    return list(params.values()) + [r for r in lrs.values() if r.requires_grad]


class OuterOptimizer:
    """Adam over every trainable tensor (the parameters, then the learnable inner rates), stored flat.

    The tensors in `params` / `lrs` are replaced by leaf views into one flat tensor, so gradient clipping is one
    norm and the fused Adam step is one kernel on one tensor instead of a handful per parameter (the meta-gradient
    code still sees a dict of ordinary leaf tensors). `state_dict()` / `load_state_dict()` use the per-tensor layout
    of `torch.optim.Adam(_leaves(params, lrs))`, the checkpoint format from before the flat storage: checkpoints
    written either way resume either way.
    """

    def __init__(self, params: dict, lrs: dict, lr: float, fused: bool | None = None):
        self.keys = [("params", n) for n in params] + [("lrs", n) for n in lrs if lrs[n].requires_grad]
        leaves = _leaves(params, lrs)
        self.shapes = [t.shape for t in leaves]
        self.sizes = [t.numel() for t in leaves]
        with torch.no_grad():
            self.flat = torch.cat([t.detach().reshape(-1) for t in leaves]).requires_grad_()
        views = [v.view(shape) for v, shape in zip(self.flat.detach().split(self.sizes), self.shapes)]
        for (where, name), view in zip(self.keys, views):
            (params if where == "params" else lrs)[name] = view.requires_grad_()
        self.adam = torch.optim.Adam([self.flat], lr=lr, fused=fused)

    @property
    def param_groups(self):
        return self.adam.param_groups

    def step(self, flat_grad: torch.Tensor, lr: float) -> None:
        group = self.adam.param_groups[0]
        group["lr"] = lr
        direct = (group["fused"] and hasattr(torch, "_fused_adam_") and not group["amsgrad"]
                  and not group["capturable"] and not group["differentiable"]
                  and not group.get("decoupled_weight_decay", False))
        if not direct:
            self.flat.grad = flat_grad
            self.adam.step()
            self.flat.grad = None
            return
        # The fused kernel on the one tensor, as torch.optim.Adam(fused=True).step() would call it (same state,
        # initialised the same way), without its per-call bookkeeping (~15 us of a ~350 us iteration at B=25).
        state = self.adam.state[self.flat]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=self.flat.device)
            state["exp_avg"] = torch.zeros_like(self.flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(self.flat, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            state["step"].add_(1)
            torch._fused_adam_([self.flat], [flat_grad], [state["exp_avg"]], [state["exp_avg_sq"]], [],
                               [state["step"]], amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                               weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                               grad_scale=None, found_inf=None)

    def state_dict(self) -> dict:
        flat = self.adam.state_dict()
        group = {**flat["param_groups"][0], "params": list(range(len(self.sizes)))}
        state = {}
        if 0 in flat["state"]:
            st = flat["state"][0]
            for i, (part_avg, part_sq, shape) in enumerate(
                zip(st["exp_avg"].split(self.sizes), st["exp_avg_sq"].split(self.sizes), self.shapes)
            ):
                state[i] = {"step": st["step"].clone(), "exp_avg": part_avg.view(shape).clone(),
                            "exp_avg_sq": part_sq.view(shape).clone()}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, per_tensor: dict) -> None:
        groups = per_tensor["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.sizes):
            raise ValueError("optimizer state does not match the trainable tensors")
        ids = groups[0]["params"]
        state = {}
        if per_tensor["state"]:
            parts = [per_tensor["state"].get(i) for i in ids]
            step = next(p["step"] for p in parts if p is not None)
            state[0] = {"step": torch.as_tensor(step).clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                state[0][key] = torch.cat([
                    (p[key] if p is not None else torch.zeros(shape)).reshape(-1)
                    for p, shape in zip(parts, self.shapes)
                ])
        self.adam.load_state_dict({"state": state, "param_groups": [{**groups[0], "params": [0]}]})


def meta_threads(cfg: Config, model, alg: Algorithm, params: dict, lrs: dict, batch, device: torch.device,
                 fast: bool | None = None) -> int:
    """Set torch's intra-op threads for this run and return the meta-gradient's task threads (1: no split).

    `train.threads` (0: torch's current intra-op count, one per core by default). Where the meta-gradient runs as
    TorchScript kernels on the CPU (algorithms.splits_tasks) the tasks are split over that many threads and torch's
    intra-op threads are set to 1: per-task matrices this small gain little inside each op, and OpenMP threads
    spinning after each intra-op region take the cores the chunks run on (B=100, 5 second-order steps, 2 cores: the
    split gradient took 3.7 ms with the rest of the loop at 2 intra-op threads, ~2.2 ms alone). Anything else keeps
    them as its intra-op threads.
    """
    threads = cfg.train.threads or torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and splits_tasks(model, alg, params, lrs, batch, fast=fast):
        torch.set_num_threads(1)
        return threads
    torch.set_num_threads(threads)
    return 1


class NonFiniteStep(NonFiniteError):
    """This iteration's meta-loss or meta-gradient is not finite; the outer step was not taken."""

    def __init__(self, iteration: int, loss: float):
        what = f"meta-loss {loss}" if not math.isfinite(loss) else f"meta-gradient (meta-loss {loss:.4g})"
        super().__init__(f"non-finite {what} at iteration {iteration + 1}")
        self.iteration, self.loss = iteration, loss


def meta_step(model, alg: Algorithm, params: dict, lrs: dict, optimizer: OuterOptimizer, batch, iteration: int,
              cfg: Config, ddp: "Distributed | None" = None, fast: bool | None = None, threads: int = 1) -> float:
    """One outer update: meta-gradient, average over processes, clip, Adam step. Returns the meta-loss.

    `optimizer` is the OuterOptimizer that holds `params` and `lrs`; `threads` is meta_threads'. The benchmark in
    benchmarks/trainer_speed.py times exactly this function.
    """
    loss, param_grads, lr_grads = meta_gradient(model, alg, params, lrs, batch, iteration, fast=fast, threads=threads)
    parts = [param_grads[n] for n in params] + [lr_grads[n] for n in lrs if lrs[n].requires_grad]
    # one flat gradient (the loss rides along for the all-reduce): clipping is one norm, Adam one tensor
    flat = torch.cat([g.reshape(-1) for g in parts] + [loss.detach().reshape(1)])
    if ddp is not None:
        ddp.average([flat])
    grad, loss_value = flat[:-1], float(flat[-1])
    # Checked before the Adam step, so the parameters stay the last finite ones; under DDP every rank decides
    # alike (they hold the same average). The clipping norm is NaN/inf exactly when an element is (or the norm
    # overflows, which clipping could not undo either), so with clipping on the check costs nothing extra; an
    # isfinite reduction costs ~9 us per iteration on the sinusoid MLP (1,762 values), ~2.5 % of one iteration.
    total = float(torch.linalg.vector_norm(grad)) if cfg.train.grad_clip > 0 else None
    finite = math.isfinite(total) if total is not None else bool(torch.isfinite(grad).all())
    if not (finite and math.isfinite(loss_value)):
        raise NonFiniteStep(iteration, loss_value)
    if total is not None and total + 1e-12 > cfg.train.grad_clip:
        grad.mul_(cfg.train.grad_clip / (total + 1e-12))
    optimizer.step(grad, meta_lr_at(cfg, iteration))
    with torch.no_grad():  # a learned inner rate may not turn into gradient ascent
        for r in lrs.values():
            if r.requires_grad:
                r.clamp_(min=0.0)
    return loss_value


def nonfinite_tensors(params: dict, lrs: dict) -> list[str]:
    """Names of the parameters / inner rates holding a NaN or an infinity (empty when all are finite)."""
    bad = [n for n, p in params.items() if not bool(torch.isfinite(p).all())]
    return bad + [f"inner rate of {n}" for n, r in lrs.items() if not bool(torch.isfinite(r).all())]


def train(cfg: Config, out_dir: str | Path, resume: bool = False, max_iterations: int | None = None,
          source=None) -> Path:
    """Meta-train according to `cfg`; write checkpoint.pt and metrics.jsonl into `out_dir`.

    `source` replaces the one `cfg.task` describes (benchmarks pass a feature-caching wrapper of it).
    """
    out_dir = Path(out_dir)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no GPU is visible")
    keep_freed_memory()
    ddp = Distributed(cfg.device)
    if ddp.world > 1 and cfg.train.meta_batch % ddp.world:
        raise ConfigError(f"train.meta_batch={cfg.train.meta_batch} must divide by the {ddp.world} processes")

    torch.manual_seed(cfg.seed)
    source = build_source(cfg.task) if source is None else source
    spec = model_spec(cfg, source)
    split = split_guard.identity(dict(cfg.task), source)  # eval refuses to score on another split
    model = build_model(spec).to(device)
    alg: Algorithm = resolve(cfg.algorithm, source.loss)
    task_gen = torch.Generator().manual_seed(cfg.seed)
    params = {n: p.to(device).requires_grad_() for n, p in init_params(model, torch.Generator().manual_seed(cfg.seed)).items()}
    lrs = {n: r.to(device).requires_grad_(alg.inner.learn_lr) for n, r in init_inner_lrs(params, alg.inner).items()}
    optimizer = OuterOptimizer(params, lrs, cfg.train.meta_lr, fused=device.type in ("cpu", "cuda"))
    start, state = 0, {}

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
    progress = Progress(cfg.train.iterations, start, cfg.train.progress and ddp.is_main, cfg.train.log_every,
                        cfg.train.progress_every_s)
    # a resumed run that takes no step still reports the loss it ended with
    running, last_loss, t0 = state.get("meta_loss_ema"), state.get("meta_loss"), time.time()
    intra_op_threads, task_threads = torch.get_num_threads(), None
    skips = int(state.get("nonfinite_skips", 0)) if resume else 0
    saved = {"iteration": start if resume else None}  # this run's last checkpoint on disk (all finite)

    def log(record: dict) -> None:
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def save(iteration):
        bad = nonfinite_tensors(params, lrs)
        if bad:  # cannot follow a checked step in practice; never overwrite a finite checkpoint with it
            raise NonFiniteError(f"non-finite parameters {bad} at iteration {iteration}; {kept(saved['iteration'])}")
        if ddp.is_main:
            checkpoint.save(
                ckpt_path,
                model_spec=spec,
                config=to_dict(cfg),
                source=source.describe(),
                algorithm=alg,
                params={n: p.detach().cpu().clone() for n, p in params.items()},  # not views of the flat store
                inner_lrs={n: r.detach().cpu().clone() for n, r in lrs.items()},
                iteration=iteration,
                optimizer=optimizer.state_dict(),
                generator_state=task_gen.get_state(),
                meta_loss=last_loss,
                meta_loss_ema=running,
                nonfinite_skips=skips,
                split=split,
            )
        saved["iteration"] = iteration

    def kept(iteration) -> str:
        if iteration is None:
            return (f"no checkpoint of this run was written yet (train.checkpoint_every={cfg.train.checkpoint_every})"
                    f"; nothing in {out_dir} is from it")
        return f"the last finite checkpoint, {ckpt_path} (iteration {iteration}), is kept"

    done = start
    try:
        for iteration in range(start, stop):
            batch = source.sample("train", cfg.train.meta_batch, cfg.train.shots, cfg.train.query, task_gen)
            batch = batch.shard(ddp.rank, ddp.world).to(device)
            if task_threads is None:
                task_threads = meta_threads(cfg, model, alg, params, lrs, batch, device)
            done = iteration + 1
            try:
                loss_value = meta_step(model, alg, params, lrs, optimizer, batch, iteration, cfg, ddp,
                                       threads=task_threads)
            except NonFiniteStep as e:
                if cfg.train.on_nonfinite == "skip_batch" and skips < cfg.train.max_nonfinite_skips:
                    skips += 1  # the outer step was not taken: the parameters are this batch's starting ones
                    log({"iteration": done, "skipped": "non-finite meta-loss or gradient", "nonfinite_skips": skips})
                    continue
                log({"iteration": done, "error": str(e), "nonfinite_skips": skips})
                skipped = (f" after skipping {skips} non-finite batch(es) (train.max_nonfinite_skips="
                           f"{cfg.train.max_nonfinite_skips})" if cfg.train.on_nonfinite == "skip_batch" else "")
                raise NonFiniteError(
                    f"{e}: training stopped{skipped}; {kept(saved['iteration'])}. Likely causes: extreme feature "
                    f"or target values (see task.scaling in docs/tasks.md), or a too large algorithm.inner_lr "
                    f"({cfg.algorithm.inner_lr}) or train.meta_lr ({cfg.train.meta_lr})") from None
            last_loss = loss_value
            running = loss_value if running is None else 0.98 * running + 0.02 * loss_value
            progress.update(done, running)
            if done % cfg.train.log_every == 0 or done == stop:
                log({"iteration": done, "meta_loss": loss_value, "meta_loss_ema": running,
                     "meta_lr": meta_lr_at(cfg, iteration), "elapsed_s": round(time.time() - t0, 3)})
            if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0:
                save(done)
        save(stop)
    finally:
        torch.set_num_threads(intra_op_threads)  # the caller's setting, as it was (meta_threads changes it)
        progress.close(done, running)
        if metrics:
            metrics.close()
    ddp.close()
    return ckpt_path
