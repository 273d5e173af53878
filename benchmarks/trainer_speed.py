"""Meta-training throughput (tasks/second) of our trainer against learn2learn 0.2.0 and higher 0.2.1.

A script, not a test. One run measures every implementation on every config, interleaved, so that the
noise of a shared machine hits them all alike, and reports tasks/s with its spread and the ratios.

Config (MAML paper, sinusoid): 1-40-40-1 ReLU MLP, K=10 support + 10 query points per task, MSE,
inner SGD lr 0.01, outer Adam lr 1e-3; meta-batch B in {25, 100}, {1, 5} inner steps, first and
second order. One *iteration* is everything the training loop does per meta-batch: sample the tasks,
run the inner loop, take the meta-gradient, step Adam. Throughput = B * iterations / seconds.

Implementations (all fed the same task batches from meta_train's SinusoidSource):
  ours        the repo's trainer: the body of meta_train.train.train()'s loop (meta_train.train.meta_step),
              calling meta_train.algorithms.meta_gradient (for this MLP under MSE: the batched-MLP fast path of
              meta_train/fast_mlp.py, first and second order derived by hand, no autograd), grad clipping and
              Adam on the flat parameter store (OuterOptimizer) exactly as train() does.
  ours_generic  (opt-in: --impls ... ours_generic) `ours` with meta_gradient(..., fast=False): the generic
              vmap-over-tasks torch.func.grad path, i.e. ours before the fast path (same fused Adam).
  l2l         learn2learn 0.2.0 as documented: per task maml.clone(), learner.adapt(loss) x steps,
              query loss / B .backward(); then Adam. first_order=True for FOMAML.
  higher      higher 0.2.1: per task innerloop_ctx(model, SGD, copy_initial_weights=False),
              diffopt.step(loss) x steps, query loss / B .backward(); then Adam. First order cuts the
              inner gradient with grad_callback=detach (the FOMAML identity Jacobian).
  proto_bmm   (prototype, --prototypes bmm) the benchmark's own copy of the batched-MLP inner loop (fixed
              scalar rate only); what `ours` now does through meta_train/fast_mlp.py.
  proto_flat  (prototype, --prototypes flat) proto_bmm plus one flat parameter tensor (fused Adam and clipping on
              one tensor) and, for first order, the meta-gradient by the same hand-derived backward.
  proto_compile  (prototype, opt-in: --prototypes compile) torch.compile of ours' meta-loss.

Before timing, every implementation's meta-gradient on one shared batch and one shared initialisation is
compared with ours (max relative difference printed); the run aborts if they disagree.

Like train(), the script asks glibc's malloc to keep freed memory (meta_train.train.keep_freed_memory);
process-wide, so every implementation runs under it.

Run in the peers venv (benchmarks/setup_peers.sh builds it), from the repo root:
    benchmarks/.peers/venv/bin/python benchmarks/trainer_speed.py --impls ours l2l higher \
        --out docs/results/trainer_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from meta_train.algorithms import meta_gradient, meta_loss, resolve  # noqa: E402
from meta_train.config import AlgorithmConfig, Config  # noqa: E402
from meta_train.inner import init_inner_lrs  # noqa: E402
from meta_train.model import build_model, init_params  # noqa: E402
from meta_train.tasks.sinusoid import SinusoidOptions, SinusoidSource  # noqa: E402
from meta_train.train import OuterOptimizer, keep_freed_memory, meta_lr_at, meta_step, meta_threads  # noqa: E402

HIDDEN = [40, 40]
SHOTS = QUERY = 10
INNER_LR = 0.01
META_LR = 1e-3
SEED = 0
TARGETS = {25: 20.0, 100: 50.0}  # required speed-up of ours over learn2learn, by meta-batch
THREADS = 1  # --threads: the CPU threads every implementation may use


@dataclass(frozen=True)
class Case:
    batch: int
    steps: int
    first_order: bool

    @property
    def label(self) -> str:
        return f"B={self.batch} steps={self.steps} {'1st' if self.first_order else '2nd'}"


def spec() -> dict:
    return {"in_features": 1, "out_features": 1, "input_transform": None, "hidden": HIDDEN, "activation": "relu"}


def initial_params() -> dict[str, torch.Tensor]:
    model = build_model(spec())
    return init_params(model, torch.Generator().manual_seed(SEED))


class Impl:
    """One implementation at one config: owns its parameters, optimizer and task generator."""

    name = "?"

    def __init__(self, case: Case):
        self.case = case
        self.source = SinusoidSource(SinusoidOptions())
        self.gen = torch.Generator().manual_seed(SEED)

    def sample(self):
        return self.source.sample("train", self.case.batch, SHOTS, QUERY, self.gen)

    def enter(self) -> None:
        """Before each timed slice: this implementation's thread settings (torch's are process-wide)."""
        torch.set_num_threads(THREADS)

    def iteration(self) -> None:
        raise NotImplementedError

    def meta_grads(self, batch) -> list[torch.Tensor]:
        """The meta-gradient on `batch`, in the order of meta_train's parameter dict (no optimizer step)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- ours


class Ours(Impl):
    """The loop body of meta_train.train.train() (single process, CPU, constant schedule)."""

    name = "ours"

    def __init__(self, case: Case):
        super().__init__(case)
        self.cfg = Config()
        self.cfg.train.meta_batch, self.cfg.train.shots, self.cfg.train.query = case.batch, SHOTS, QUERY
        self.cfg.train.meta_lr = META_LR
        self.cfg.algorithm = AlgorithmConfig(
            name="fomaml" if case.first_order else "maml", inner_steps=case.steps, inner_lr=INNER_LR
        )
        self.model = build_model(spec())
        self.alg = resolve(self.cfg.algorithm, self.source.loss)
        self.params = {n: p.clone().requires_grad_() for n, p in initial_params().items()}
        self.lrs = {n: r.requires_grad_(self.alg.inner.learn_lr) for n, r in init_inner_lrs(self.params, self.alg.inner).items()}
        self.optimizer = self.make_optimizer()
        self.it = 0
        # As train() decides with train.threads = --threads: the tasks split over the threads, intra-op 1 (fast path
        # as TorchScript), or the threads as torch's intra-op threads (anything else)
        self.cfg.train.threads = THREADS
        self.task_threads = meta_threads(self.cfg, self.model, self.alg, self.params, self.lrs, self.sample(),
                                         torch.device("cpu"), fast=self.fast)
        torch.set_num_threads(THREADS)

    fast = None  # meta_gradient's default: the batched-MLP fast path where supported

    def enter(self):
        torch.set_num_threads(1 if self.task_threads > 1 else THREADS)

    def make_optimizer(self):
        # As train.py builds it on CPU/CUDA (parameters as views into one flat tensor, fused Adam on it).
        return OuterOptimizer(self.params, self.lrs, self.cfg.train.meta_lr, fused=True)

    def gradient(self, batch):
        return meta_gradient(self.model, self.alg, self.params, self.lrs, batch, self.it, fast=self.fast,
                             threads=self.task_threads)

    def meta_grads(self, batch):
        _, param_grads, _ = self.gradient(batch)
        return [param_grads[n] for n in self.params]

    def iteration(self):
        # The trainer's own outer update (meta_train.train.meta_step); no DDP at world size 1.
        meta_step(self.model, self.alg, self.params, self.lrs, self.optimizer, self.sample().shard(0, 1), self.it,
                  self.cfg, fast=self.fast, threads=self.task_threads)
        self.it += 1


class OursGeneric(Ours):
    """`ours` forced onto the generic vmap path (meta_gradient(..., fast=False)): ours before the fast path."""

    name = "ours_generic"
    fast = False


# --------------------------------------------------------------------------------------------- peers


def peer_model() -> nn.Module:
    """The same MLP as a plain nn.Sequential (the peers' natural form), with ours' initial weights."""
    layers, width = [], 1
    for h in HIDDEN:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    with torch.no_grad():
        for p, init in zip(model.parameters(), initial_params().values()):
            p.copy_(init)
    return model


class Learn2Learn(Impl):
    name = "l2l"

    def __init__(self, case: Case):
        super().__init__(case)
        import learn2learn as l2l

        self.model = peer_model()
        self.maml = l2l.algorithms.MAML(self.model, lr=INNER_LR, first_order=case.first_order)
        self.optimizer = torch.optim.Adam(self.maml.parameters(), lr=META_LR)

    def accumulate(self, batch):
        b = batch.support_x.shape[0]
        sy, qy = batch.support_y.unsqueeze(-1), batch.query_y.unsqueeze(-1)
        for i in range(b):
            learner = self.maml.clone()
            for _ in range(self.case.steps):
                learner.adapt(F.mse_loss(learner(batch.support_x[i]), sy[i]))
            (F.mse_loss(learner(batch.query_x[i]), qy[i]) / b).backward()

    def meta_grads(self, batch):
        self.optimizer.zero_grad()
        self.accumulate(batch)
        return [p.grad.clone() for p in self.model.parameters()]

    def iteration(self):
        batch = self.sample()
        self.optimizer.zero_grad()
        self.accumulate(batch)
        self.optimizer.step()


class Higher(Impl):
    name = "higher"

    def __init__(self, case: Case):
        super().__init__(case)
        import higher

        self.higher = higher
        self.model = peer_model()
        self.inner_opt = torch.optim.SGD(self.model.parameters(), lr=INNER_LR)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=META_LR)
        self.callback = (lambda grads: [g.detach() for g in grads]) if case.first_order else None

    def accumulate(self, batch):
        b = batch.support_x.shape[0]
        sy, qy = batch.support_y.unsqueeze(-1), batch.query_y.unsqueeze(-1)
        for i in range(b):
            with self.higher.innerloop_ctx(self.model, self.inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(self.case.steps):
                    diffopt.step(F.mse_loss(fmodel(batch.support_x[i]), sy[i]), grad_callback=self.callback)
                (F.mse_loss(fmodel(batch.query_x[i]), qy[i]) / b).backward()

    def meta_grads(self, batch):
        self.optimizer.zero_grad()
        self.accumulate(batch)
        return [p.grad.clone() for p in self.model.parameters()]

    def iteration(self):
        batch = self.sample()
        self.optimizer.zero_grad()
        self.accumulate(batch)
        self.optimizer.step()


# --------------------------------------------------------------------------------------------- prototypes


def _linear(x, w, b):
    # x [B, N, in]; w [out, in] or [B, out, in]; b [out] or [B, out]
    return torch.matmul(x, w.transpose(-1, -2)) + b.unsqueeze(-2)


def mlp_grads(ws, bs, x, y):
    """Hand-derived backward of a ReLU MLP under per-task MSE (mean over the K points), batched over tasks.

    x [B, K, in], y [B, K]; ws/bs shared ([out, in]) or per task ([B, out, in]). Returns the per-task
    gradients (gw [B, out, in], gb [B, out] per layer) and the per-task losses [B]. Written with plain
    differentiable ops, so autograd can take its derivative again (the second-order MAML term).
    """
    n_layers, k = len(ws), x.shape[1]
    acts, pre, h = [x], [], x
    for i in range(n_layers):
        z = _linear(h, ws[i], bs[i])
        pre.append(z)
        h = torch.relu(z) if i < n_layers - 1 else z
        acts.append(h)
    err = acts[-1].squeeze(-1) - y
    d = (err * (2.0 / k)).unsqueeze(-1)  # dL/dout
    gw, gb = [None] * n_layers, [None] * n_layers
    for i in reversed(range(n_layers)):
        gw[i] = torch.matmul(d.transpose(-1, -2), acts[i])
        gb[i] = d.sum(-2)
        if i:
            d = torch.matmul(d, ws[i]) * (pre[i - 1] > 0)
    return gw, gb, (err * err).mean(-1)


def bmm_adapt(ws, bs, sx, sy, lr: float, steps: int, first_order: bool):
    """`steps` SGD steps on the support MSE for every task at once (one batched matmul per layer).

    With `first_order` the inner gradient is taken on detached weights: no graph through it, and the
    adapted weights depend on the initial ones with the identity as Jacobian (FOMAML).
    """
    for _ in range(steps):
        if first_order:
            with torch.no_grad():
                gw, gb, _ = mlp_grads([w.detach() for w in ws], [b.detach() for b in bs], sx, sy)
        else:
            gw, gb, _ = mlp_grads(ws, bs, sx, sy)
        ws = [w - lr * g for w, g in zip(ws, gw)]
        bs = [b - lr * g for b, g in zip(bs, gb)]
    return ws, bs


def bmm_query_losses(ws, bs, sx, sy, qx, qy, lr: float, steps: int, first_order: bool):
    """Per-task query MSE after adaptation; autograd differentiates it for the meta-gradient (exact second
    order: ReLU's second derivative is 0, as in autograd)."""
    ws, bs = bmm_adapt(ws, bs, sx, sy, lr, steps, first_order)
    h = qx
    for i in range(len(ws)):
        h = _linear(h, ws[i], bs[i])
        if i < len(ws) - 1:
            h = torch.relu(h)
    return ((h.squeeze(-1) - qy) ** 2).mean(-1)


class ProtoBmm(Ours):
    """`ours` with the meta-gradient from bmm_query_losses and a fused Adam; rest of the loop unchanged."""

    name = "proto_bmm"

    def gradient(self, batch):
        names = list(self.params)
        ws = [self.params[n] for n in names if n.endswith("weight")]
        bs = [self.params[n] for n in names if n.endswith("bias")]
        losses = bmm_query_losses(
            ws, bs, batch.support_x, batch.support_y, batch.query_x, batch.query_y,
            INNER_LR, self.case.steps, self.case.first_order,
        )
        loss = losses.mean()
        grads = torch.autograd.grad(loss, list(self.params.values()))
        return loss.detach(), dict(zip(names, grads)), {}


class ProtoFlat(Ours):
    """proto_bmm plus a leaner outer loop: all parameters in one flat leaf tensor (the layers are views),
    so gradient clipping and the fused Adam are a handful of ops instead of a handful per parameter; and
    for first order the meta-gradient is the same hand-derived backward at the adapted weights (no
    autograd at all). Second order still uses autograd through the batched inner loop."""

    name = "proto_flat"

    def __init__(self, case: Case):
        super().__init__(case)
        self.names = list(self.params)
        self.shapes = [self.params[n].shape for n in self.names]
        self.sizes = [self.params[n].numel() for n in self.names]
        self.theta = torch.cat([self.params[n].detach().reshape(-1) for n in self.names]).requires_grad_()
        self.optimizer = torch.optim.Adam([self.theta], lr=self.cfg.train.meta_lr, fused=True)

    def views(self, flat):
        parts = [t.view(s) for t, s in zip(flat.split(self.sizes), self.shapes)]
        return parts[0::2], parts[1::2]  # weights, biases (Linear layers in order)

    def flat_gradient(self, batch):
        steps, first_order = self.case.steps, self.case.first_order
        if first_order:
            with torch.no_grad():
                ws, bs = bmm_adapt(*self.views(self.theta.detach()), batch.support_x, batch.support_y, INNER_LR, steps, True)
                gw, gb, losses = mlp_grads(ws, bs, batch.query_x, batch.query_y)
                grad = torch.cat([g.mean(0).reshape(-1) for pair in zip(gw, gb) for g in pair])
            return losses.mean(), grad
        ws, bs = self.views(self.theta)
        loss = bmm_query_losses(ws, bs, batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                                INNER_LR, steps, False).mean()
        (grad,) = torch.autograd.grad(loss, [self.theta])
        return loss.detach(), grad

    def meta_grads(self, batch):
        _, grad = self.flat_gradient(batch)
        return [g.view(s) for g, s in zip(grad.split(self.sizes), self.shapes)]

    def iteration(self):
        cfg = self.cfg
        batch = self.sample()
        loss, grad = self.flat_gradient(batch)
        float(loss)
        scale = min(1.0, cfg.train.grad_clip / (float(grad.norm()) + 1e-12)) if cfg.train.grad_clip > 0 else 1.0
        self.theta.grad = grad * scale if scale != 1.0 else grad
        self.optimizer.param_groups[0]["lr"] = meta_lr_at(cfg, self.it)
        self.optimizer.step()
        self.it += 1


class ProtoCompile(Ours):
    """`ours` with meta_loss under torch.compile (the outer autograd.grad stays eager)."""

    name = "proto_compile"

    def __init__(self, case):
        super().__init__(case)
        self.compiled = torch.compile(meta_loss, dynamic=False)

    def gradient(self, batch):
        loss = self.compiled(self.model, self.alg, self.params, self.lrs, batch, 0)
        grads = torch.autograd.grad(loss, list(self.params.values()))
        return loss.detach(), dict(zip(self.params, grads)), {}


IMPLS = {"ours": Ours, "ours_generic": OursGeneric, "l2l": Learn2Learn, "higher": Higher, "proto_bmm": ProtoBmm, "proto_flat": ProtoFlat,
         "proto_compile": ProtoCompile}
PEERS = ("l2l", "higher")


# --------------------------------------------------------------------------------------------- harness


def check_agreement(names: list[str], case: Case, batch_size: int = 8, tol: float = 1e-4) -> dict[str, float]:
    """Max relative difference of each implementation's meta-gradient from ours, same batch, same init."""
    small = Case(batch_size, case.steps, case.first_order)
    batch = SinusoidSource(SinusoidOptions()).sample("train", batch_size, SHOTS, QUERY, torch.Generator().manual_seed(123))
    ref = IMPLS["ours"](small).meta_grads(batch)
    out = {}
    for name in names:
        if name == "ours":
            continue
        got = IMPLS[name](small).meta_grads(batch)
        err = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-12)) for g, r in zip(got, ref))
        out[name] = err
        if not err < tol:
            raise SystemExit(f"{name} disagrees with ours at {small.label}: max relative gradient difference {err:.2e}")
    return out


def run_slice(impl: Impl, seconds: float, min_iters: int) -> tuple[int, float]:
    impl.enter()
    n, t0 = 0, time.perf_counter()
    while True:
        impl.iteration()
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= min_iters and elapsed >= seconds:
            return n, elapsed


def measure_case(case: Case, names: list[str], rounds: int, slice_s: float, warmup_s: float, log) -> dict:
    impls = {n: IMPLS[n](case) for n in names}
    for n, impl in impls.items():  # warm-up: allocator, autograd caches, compilation
        run_slice(impl, warmup_s, 2)
    rates = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            iters, elapsed = run_slice(impls[n], slice_s, 1)
            rates[n].append(case.batch * iters / elapsed)
    result = {"case": case.__dict__, "label": case.label, "tasks_per_s": {}, "ratios": {}}
    for n in names:
        xs = sorted(rates[n])
        result["tasks_per_s"][n] = {
            "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "rounds": rates[n],
        }
    # Ratios: computed within each round (the two runs were seconds apart), then summarised.
    for num in [n for n in names if n not in PEERS]:
        for den in [n for n in names if n != num and (n in PEERS or n in ("ours", "ours_generic"))]:
            per_round = sorted(a / b for a, b in zip(rates[num], rates[den]))
            result["ratios"][f"{num}/{den}"] = {
                "median": statistics.median(per_round), "min": per_round[0], "max": per_round[-1],
            }
    log(f"  {case.label}: " + ", ".join(f"{n} {result['tasks_per_s'][n]['median']:.0f}" for n in names) + " tasks/s")
    return result


def fmt_rate(d: dict) -> str:
    return f"{d['median']:,.0f} ({d['min']:,.0f}–{d['max']:,.0f})"


def fmt_ratio(d: dict | None) -> str:
    if d is None:
        return "–"
    return f"{d['median']:.1f}x ({d['min']:.1f}–{d['max']:.1f})"


def table(results: list[dict], names: list[str]) -> str:
    protos = [n for n in names if n.startswith("proto")]
    generic = "ours_generic" in names
    head = ["config"] + [f"{n} tasks/s" for n in names] + ["ours/l2l", "ours/higher"]
    if generic:
        head += ["ours/ours_generic", "ours_generic/l2l"]
    for p in protos:
        head += [f"{p}/l2l", f"{p}/ours"]
    head.append("target vs l2l")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for res in results:
        b = res["case"]["batch"]
        row = [res["label"]] + [fmt_rate(res["tasks_per_s"][n]) for n in names]
        row += [fmt_ratio(res["ratios"].get("ours/l2l")), fmt_ratio(res["ratios"].get("ours/higher"))]
        if generic:
            row += [fmt_ratio(res["ratios"].get("ours/ours_generic")), fmt_ratio(res["ratios"].get("ours_generic/l2l"))]
        for p in protos:
            row += [fmt_ratio(res["ratios"].get(f"{p}/l2l")), fmt_ratio(res["ratios"].get(f"{p}/ours"))]
        target = TARGETS.get(b)
        ol = res["ratios"].get("ours/l2l")
        if target is None or ol is None:
            row.append("–")
        else:
            verdict = "met" if ol["median"] >= target else "MISSED"
            row.append(f">= {target:.0f}x: {verdict}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    versions = {"torch": torch.__version__}
    for pkg in ("learn2learn", "higher"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            versions[pkg] = None
    return {
        "python": platform.python_version(), "versions": versions, "torch_threads": threads,
        "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(), "git_commit": commit,
        "machine": platform.machine(), "processor": platform.processor(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[25, 100])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    p.add_argument("--order", choices=["first", "second"], nargs="+", default=["first", "second"])
    p.add_argument("--impls", nargs="+", default=["ours", "l2l", "higher"], choices=[n for n in IMPLS if not n.startswith("proto")])
    p.add_argument("--prototypes", nargs="*", default=None, choices=["bmm", "flat", "compile"],
                   help="also time prototype variants of ours (bare flag = bmm flat; compile adds ~20-45 s per config)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per config")
    p.add_argument("--slice", type=float, default=0.5, help="seconds per implementation per round (>= 1 iteration)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per implementation per config (>= 2 iterations)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for everyone (default 1): the peers' torch intra-op threads; ours as train.threads "
                        "(the tasks split over them on the TorchScript fast path)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 0.1 s")
    p.add_argument("--no-check", action="store_true", help="skip the gradient-agreement check")
    p.add_argument("--out", type=Path, help="write the full results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.slice, args.warmup = 2, 0.1, 0.1

    global THREADS
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    # As train() does: malloc keeps freed memory (no page faults on every iteration). Process-wide, so every
    # implementation runs under it (the peers' per-task loops allocate little and are not affected by it).
    heap_kept = keep_freed_memory()
    warnings.filterwarnings("ignore")
    with contextlib.redirect_stderr(io.StringIO()):  # gym's import-time banner (learn2learn imports gym)
        for peer, module in (("l2l", "learn2learn"), ("higher", "higher")):
            if peer in args.impls:
                try:
                    __import__(module)
                except ImportError as exc:
                    raise SystemExit(f"{module} is not importable ({exc}); run benchmarks/setup_peers.sh and use "
                                     "benchmarks/.peers/venv/bin/python") from exc
    protos = [] if args.prototypes is None else (args.prototypes or ["bmm", "flat"])
    names = list(args.impls) + [f"proto_{p}" for p in protos]
    cases = [Case(b, s, o == "first") for b in args.batch for s in args.steps for o in args.order]

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    env = environment(args.threads)
    env["malloc_keeps_freed_memory"] = heap_kept
    log(f"torch {torch.__version__}, {args.threads} thread(s), load {env['loadavg_start']}; "
        f"{len(cases)} configs x {names}, {args.rounds} rounds x {args.slice}s")
    t_start = time.perf_counter()
    agreement = {}
    if not args.no_check:
        for steps in args.steps:
            for order in args.order:
                c = Case(8, steps, order == "first")
                agreement[c.label] = check_agreement(names, c)
        log("gradient agreement with ours (max rel. diff): "
            + "; ".join(f"{k}: " + ", ".join(f"{n} {v:.1e}" for n, v in d.items()) for k, d in agreement.items()))
    results = [measure_case(c, names, args.rounds, args.slice, args.warmup, log) for c in cases]
    env["loadavg_end"] = os.getloadavg()
    env["wall_s"] = round(time.perf_counter() - t_start, 1)

    text = table(results, names)
    print(text)
    print(f"\ntasks/s: median (min–max) over {args.rounds} interleaved rounds of {args.slice}s; ratios: median (min–max) "
          f"of per-round ratios. torch {torch.__version__}, {args.threads} thread(s), wall {env['wall_s']}s, "
          f"load avg {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": env,
                   "config": {"hidden": HIDDEN, "shots": SHOTS, "query": QUERY, "inner_lr": INNER_LR,
                              "meta_lr": META_LR, "rounds": args.rounds, "slice_s": args.slice,
                              "warmup_s": args.warmup, "targets_vs_l2l": TARGETS},
                   "gradient_agreement": agreement, "results": results, "table_markdown": text}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
