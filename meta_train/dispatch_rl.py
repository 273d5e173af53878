"""Policy gradient for job-shop dispatching on the functional core (issue 16, first step of the meta-RL part).

A small network scores every candidate operation from its shopfloor features (one row per job), so the same
parameters serve shops of any size; a masked softmax over the scores is the policy. The update is REINFORCE
with a self-critical baseline: for each sampled episode, the greedy episode of the same policy on the same
instance is the baseline, so the advantage is (greedy makespan - sampled makespan) / greedy makespan, one
number per episode (scale-free; returns telescope to -makespan, see shopfloor/dispatch.py). The loss is a
cross-entropy over the chosen actions weighted by the advantage: the weighted classification loss the
issue's on-device adaptation step needs. Gradients come from torch.func.grad over functional_call (a pure
function of the parameter dict, like meta_train.inner.adapt), so MAML over this step is the next move.
Steps where a single candidate is eligible carry no choice and are not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad

from shopfloor import FEATURE_NAMES, Dispatcher, JobShopInstance, candidate_features


class ScoringPolicy(nn.Module):
    """features (..., n_candidates, F) -> scores (..., n_candidates); no size-dependent layer."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(len(FEATURE_NAMES), hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).squeeze(-1)


@dataclass
class Episode:
    feats: torch.Tensor  # (T, n_jobs, F) at the T decisions that had a choice
    masks: torch.Tensor  # (T, n_jobs) bool
    actions: torch.Tensor  # (T,) long
    makespan: int
    start: np.ndarray  # (n_jobs, n_ops) start times of the schedule built


def rollout(model, params: dict, instance: JobShopInstance, scheme: str, greedy: bool,
            gen: torch.Generator | None = None) -> Episode:
    d = Dispatcher(instance, scheme)
    feats, masks, actions = [], [], []
    with torch.no_grad():
        while not d.done:
            mask = d.eligible
            if mask.sum() == 1:
                d.step(int(np.argmax(mask)))
                continue
            f, m = torch.from_numpy(candidate_features(d)), torch.from_numpy(mask)
            logits = functional_call(model, params, (f,)).masked_fill(~m, float("-inf"))
            a = int(torch.argmax(logits)) if greedy else int(torch.multinomial(torch.softmax(logits, -1), 1,
                                                                              generator=gen))
            feats.append(f), masks.append(m), actions.append(a)
            d.step(a)
    n, k = instance.n_jobs, len(FEATURE_NAMES)
    return Episode(torch.stack(feats) if feats else torch.zeros(0, n, k),
                   torch.stack(masks) if masks else torch.zeros(0, n, dtype=torch.bool),
                   torch.tensor(actions, dtype=torch.long), d.makespan, d.start.copy())


def pg_loss(model, params: dict, episodes: list[Episode], advantages: list[float]) -> torch.Tensor:
    """Advantage-weighted cross-entropy of the chosen actions, averaged over decisions."""
    total, count = 0.0, 0
    for ep, adv in zip(episodes, advantages):
        if len(ep.actions) == 0:
            continue
        logits = functional_call(model, params, (ep.feats,)).masked_fill(~ep.masks, float("-inf"))
        logp = torch.log_softmax(logits, -1).gather(1, ep.actions[:, None]).squeeze(1)
        total = total - adv * logp.sum()
        count += len(ep.actions)
    if count == 0:
        return torch.zeros((), requires_grad=True)
    return total / count


def self_critical(model, params, instances, scheme, gen) -> tuple[list[Episode], list[float], list[int]]:
    """One sampled episode per instance, the greedy one as its baseline; returns (episodes, advantages,
    sampled makespans)."""
    eps, advs = [], []
    for inst in instances:
        sample = rollout(model, params, inst, scheme, greedy=False, gen=gen)
        base = rollout(model, params, inst, scheme, greedy=True).makespan
        eps.append(sample)
        advs.append((base - sample.makespan) / base)
    return eps, advs, [e.makespan for e in eps]


def policy_gradient(model, params: dict, episodes: list[Episode], advantages: list[float]) -> dict:
    g = grad(lambda p: pg_loss(model, p, episodes, advantages))(params)
    bad = [k for k, v in g.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"non-finite policy gradient in {bad}")
    return g


def adapt_step(model, params: dict, episodes: list[Episode], advantages: list[float], lr: float) -> dict:
    """One plain SGD policy-gradient step, a pure function of the parameters (the inner loop of meta-RL)."""
    g = policy_gradient(model, params, episodes, advantages)
    return {k: params[k] - lr * g[k] for k in params}


def greedy_makespans(model, params: dict, instances, scheme: str) -> list[int]:
    return [rollout(model, params, inst, scheme, greedy=True).makespan for inst in instances]
