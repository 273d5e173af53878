"""Shops as tasks: a shop is a parameterised generator of job-shop instances.

A `ShopSpec` fixes one shop (size, processing-time distribution, routing pattern, machine speeds); its
`sample` draws instances (the episodes of that task). A `ShopFamily` draws shops, so meta-training sees many
shops; `shops(split=...)` draws train and test shops from disjoint random streams, so test shops are unseen.

Routing patterns: "random" (each job visits every machine once, in a random order: Taillard's model),
"flow" (all jobs follow one shop-wide order perturbed by a few random adjacent swaps: flow-like lines),
"bottleneck" (random routes; one machine's work is multiplied by `bottleneck_factor`).
Durations: a work content drawn from the distribution, divided by the machine's speed, rounded, >= 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from shopfloor.instance import JobShopInstance

ROUTINGS = ("random", "flow", "bottleneck")
DURATIONS = ("uniform", "lognormal", "bimodal")


@dataclass(frozen=True)
class ShopSpec:
    n_jobs: int
    n_machines: int
    duration_dist: str = "uniform"
    low: int = 1
    high: int = 99
    routing: str = "random"
    speeds: tuple[float, ...] | None = None  # one per machine; None = all 1
    flow_swaps: int = 2
    bottleneck_machine: int = 0
    bottleneck_factor: float = 2.0
    name: str = ""

    def __post_init__(self):
        if self.n_jobs < 1 or self.n_machines < 1:
            raise ValueError(f"shop needs >= 1 job and machine, got {self.n_jobs}x{self.n_machines}")
        if self.duration_dist not in DURATIONS:
            raise ValueError(f"duration_dist {self.duration_dist!r} not in {DURATIONS}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing {self.routing!r} not in {ROUTINGS}")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got {self.low}, {self.high}")
        if self.speeds is not None and (len(self.speeds) != self.n_machines or min(self.speeds) <= 0):
            raise ValueError(f"speeds must be {self.n_machines} positive numbers")
        if not 0 <= self.bottleneck_machine < self.n_machines or self.bottleneck_factor <= 0:
            raise ValueError("bottleneck_machine must be a machine id and bottleneck_factor > 0")

    def _work(self, rng: np.random.Generator, shape) -> np.ndarray:
        lo, hi = self.low, self.high
        if self.duration_dist == "uniform":
            return rng.integers(lo, hi + 1, size=shape).astype(float)
        if self.duration_dist == "lognormal":  # median in the middle of the range, heavy right tail, clipped
            return np.clip(rng.lognormal(np.log((lo + hi) / 2), 0.6, size=shape), lo, hi)
        short = rng.uniform(lo, lo + (hi - lo) * 0.2, size=shape)  # bimodal: 70 % short, 30 % long jobs
        long_ = rng.uniform(lo + (hi - lo) * 0.7, hi, size=shape)
        return np.where(rng.random(shape) < 0.7, short, long_)

    def _routes(self, rng: np.random.Generator) -> np.ndarray:
        n, m = self.n_jobs, self.n_machines
        if self.routing != "flow":
            return np.argsort(rng.random((n, m)), axis=1)
        base = rng.permutation(m)
        routes = np.tile(base, (n, 1))
        for j in range(n):
            for _ in range(self.flow_swaps if m > 1 else 0):
                i = rng.integers(m - 1)
                routes[j, [i, i + 1]] = routes[j, [i + 1, i]]
        return routes

    def sample(self, rng: np.random.Generator, name: str = "") -> JobShopInstance:
        routes = self._routes(rng)
        work = self._work(rng, routes.shape)
        speed = np.ones(self.n_machines) if self.speeds is None else np.asarray(self.speeds, float)
        if self.routing == "bottleneck":
            speed = speed.copy()
            speed[self.bottleneck_machine] /= self.bottleneck_factor
        durations = np.maximum(1, np.rint(work / speed[routes])).astype(np.int64)
        return JobShopInstance(routes, durations, self.n_machines, name=name or self.name)


@dataclass(frozen=True)
class ShopFamily:
    """A distribution over shops. Defaults cover Taillard-like sizes and the three routing patterns."""

    jobs: tuple[int, int] = (6, 30)
    machines: tuple[int, int] = (4, 20)
    duration_dists: tuple[str, ...] = DURATIONS
    routings: tuple[str, ...] = ROUTINGS
    speed_spread: float = 0.3  # machine speeds uniform in [1 - spread, 1 + spread]

    def sample_shop(self, rng: np.random.Generator, name: str = "") -> ShopSpec:
        n = int(rng.integers(self.jobs[0], self.jobs[1] + 1))
        m = int(rng.integers(self.machines[0], self.machines[1] + 1))
        speeds = tuple(float(s) for s in rng.uniform(1 - self.speed_spread, 1 + self.speed_spread, m))
        return ShopSpec(
            n_jobs=n, n_machines=m, duration_dist=str(rng.choice(self.duration_dists)),
            routing=str(rng.choice(self.routings)), speeds=speeds, flow_swaps=int(rng.integers(1, 4)),
            bottleneck_machine=int(rng.integers(m)), bottleneck_factor=float(rng.uniform(1.5, 3.0)), name=name,
        )

    def iter_shops(self, split: str, seed: int = 0) -> Iterator[ShopSpec]:
        """An endless stream of shops of a split; "train" and "test" come from disjoint seed streams."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0 if split == "train" else 1,)))
        for i in itertools.count():
            yield self.sample_shop(rng, name=f"{split}-{i}")

    def shops(self, split: str, count: int, seed: int = 0) -> list[ShopSpec]:
        """The first `count` shops of `iter_shops(split, seed)`."""
        return list(itertools.islice(self.iter_shops(split, seed), count))
