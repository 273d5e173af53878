"""Gymnasium wrapper of the dispatching core (the only module of shopfloor that imports gymnasium).

Observation: {"features": float32 (max_jobs, F), "action_mask": int8 (max_jobs,)}; row j is job j's next
operation (features of `shopfloor.features`), rows past the instance's jobs and of finished jobs are zero and
masked. The fixed padding to `max_jobs` is what lets shops of different sizes run in one `gymnasium.vector` env.
Action: a job index; its next operation is dispatched under the scheme. Reward: the core's LB(s_t) - LB(s_t+1),
so an episode's return is instance.trivial_lower_bound() - makespan.

A masked-out action is a no-op: reward 0 (the return identity holds), info["invalid_action"] = True and the
count in info["invalid_actions"]; after `max_invalid` consecutive ones the episode is truncated. `strict=True`
raises instead. (Gymnasium's checker and random agents sample unmasked actions, so the default cannot raise.)

Each reset draws an instance from `shop` (a ShopSpec, or any callable rng -> JobShopInstance) with the env's
np_random, unless `options={"instance": inst}` fixes it (e.g. a Taillard instance).
"""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from shopfloor.dispatch import SCHEMES, Dispatcher
from shopfloor.features import FEATURE_NAMES, candidate_features
from shopfloor.generators import ShopSpec
from shopfloor.instance import JobShopInstance


class JobShopEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, shop: ShopSpec | Callable[[np.random.Generator], JobShopInstance] | None = None,
                 max_jobs: int | None = None, scheme: str = "active", strict: bool = False, max_invalid: int = 100):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
        self.shop = shop if shop is not None else ShopSpec(10, 10)
        if max_jobs is None:
            if not isinstance(self.shop, ShopSpec):
                raise ValueError("max_jobs is required when shop is not a ShopSpec")
            max_jobs = self.shop.n_jobs
        if max_jobs < 1 or max_invalid < 1:
            raise ValueError("max_jobs and max_invalid must be >= 1")
        self.max_jobs, self.scheme, self.strict, self.max_invalid = max_jobs, scheme, strict, max_invalid
        f = len(FEATURE_NAMES)
        top = np.finfo(np.float32).max  # features are >= 0 and finite, but have no natural upper bound
        self.observation_space = spaces.Dict({
            "features": spaces.Box(0.0, top, shape=(max_jobs, f), dtype=np.float32),
            "action_mask": spaces.Box(0, 1, shape=(max_jobs,), dtype=np.int8),
        })
        self.action_space = spaces.Discrete(max_jobs)
        self.dispatcher: Dispatcher | None = None

    def _draw(self) -> JobShopInstance:
        if isinstance(self.shop, ShopSpec):
            return self.shop.sample(self.np_random)
        return self.shop(self.np_random)

    def _obs(self) -> dict:
        d = self.dispatcher
        n = d.instance.n_jobs
        feats = np.zeros((self.max_jobs, len(FEATURE_NAMES)), np.float32)
        mask = np.zeros(self.max_jobs, np.int8)
        feats[:n] = candidate_features(d)
        mask[:n] = d.eligible
        return {"features": feats, "action_mask": mask}

    def _info(self) -> dict:
        d = self.dispatcher
        info = {"lower_bound": d.lower_bound(), "invalid_actions": self._invalid, "steps": d.steps}
        if d.done:
            info["makespan"] = d.makespan
        return info

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        unknown = set(options or {}) - {"instance"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; known: ['instance']")
        inst = (options or {}).get("instance") or self._draw()
        if inst.n_jobs > self.max_jobs:
            raise ValueError(f"instance {inst.name!r} has {inst.n_jobs} jobs > max_jobs {self.max_jobs}")
        self.dispatcher = Dispatcher(inst, self.scheme)
        self._invalid = 0
        self._invalid_run = 0
        return self._obs(), self._info()

    def step(self, action):
        if self.dispatcher is None:
            raise RuntimeError("step() before reset()")
        if self.dispatcher.done:
            raise RuntimeError("step() after the episode ended; call reset()")
        d, job = self.dispatcher, int(action)
        if not (0 <= job < d.instance.n_jobs and d.eligible[job]):
            if self.strict:
                raise ValueError(f"action {job} is masked out (eligible: {np.flatnonzero(d.eligible).tolist()})")
            self._invalid += 1
            self._invalid_run += 1
            info = self._info() | {"invalid_action": True}
            return self._obs(), 0.0, False, self._invalid_run >= self.max_invalid, info
        self._invalid_run = 0
        reward = float(d.step(job))
        return self._obs(), reward, d.done, False, self._info() | {"invalid_action": False}


gym.register(id="shopfloor/JobShop-v0", entry_point="shopfloor.gym_env:JobShopEnv")
