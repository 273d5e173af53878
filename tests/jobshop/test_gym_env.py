"""The Gymnasium wrapper: checker, vectorisation with mixed shop sizes, masking, agreement with the core."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from shopfloor import run_rule
from shopfloor.generators import ShopFamily, ShopSpec
from shopfloor.gym_env import JobShopEnv
from shopfloor.rules import RULES


@pytest.mark.parametrize("scheme", ["active", "insertion"])
def test_passes_gymnasium_env_checker_without_warnings(scheme):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(JobShopEnv(ShopSpec(6, 4), max_jobs=8, scheme=scheme), skip_render_check=True)
        check_env(gym.make("shopfloor/JobShop-v0", shop=ShopSpec(4, 3)).unwrapped, skip_render_check=True)


def test_vector_env_mixes_shop_sizes_and_keeps_the_return_identity():
    specs = [ShopSpec(3, 2), ShopSpec(5, 4, routing="flow"), ShopSpec(8, 3, routing="bottleneck")]
    envs = gym.vector.SyncVectorEnv([lambda s=s: JobShopEnv(s, max_jobs=8) for s in specs])
    obs, info = envs.reset(seed=0)
    assert obs["features"].shape == (3, 8, 9) and obs["action_mask"].shape == (3, 8)
    rng = np.random.default_rng(0)
    lb0, ret = info["lower_bound"].astype(float), np.zeros(3)
    resetting, finished = np.zeros(3, bool), np.zeros(3, int)
    while finished.min() < 2:
        acts = [0 if resetting[i] else rng.choice(np.flatnonzero(obs["action_mask"][i])) for i in range(3)]
        obs, rew, term, trunc, info = envs.step(np.array(acts))
        assert not trunc.any()
        for i in range(3):
            if resetting[i]:  # next-step autoreset: this step was the reset
                lb0[i], ret[i] = info["lower_bound"][i], 0.0
                continue
            ret[i] += rew[i]
            if term[i]:
                assert ret[i] == lb0[i] - info["makespan"][i]
                finished[i] += 1
        resetting = term | trunc
    envs.close()


def test_masked_action_is_a_reported_noop_then_truncates():
    env = JobShopEnv(ShopSpec(4, 3), max_jobs=6, max_invalid=3)
    obs, _ = env.reset(seed=1)
    bad = int(np.flatnonzero(obs["action_mask"] == 0)[0])  # padded rows 4, 5 are always masked
    for i in range(3):
        obs2, r, term, trunc, info = env.step(bad)
        assert r == 0.0 and info["invalid_action"] and info["invalid_actions"] == i + 1 and not term
        np.testing.assert_array_equal(obs2["features"], obs["features"])
    assert trunc
    strict = JobShopEnv(ShopSpec(4, 3), max_jobs=6, strict=True)
    strict.reset(seed=1)
    with pytest.raises(ValueError, match="masked out"):
        strict.step(5)


def test_env_and_core_build_the_same_schedule_on_a_fixed_instance():
    inst = ShopSpec(7, 5).sample(np.random.default_rng(4))
    env = JobShopEnv(max_jobs=10, shop=ShopSpec(2, 2))
    for rule in RULES:
        obs, info = env.reset(options={"instance": inst})
        done = False
        while not done:  # MWKR etc. through the env's own observation: remaining work is column 3
            f, mask = obs["features"], obs["action_mask"].astype(bool)
            key = {"SPT": f[:, 0], "MWKR": -f[:, 3], "MOPNR": -f[:, 4], "FDD/MWKR": f[:, 6]}[rule]
            obs, _, done, _, info = env.step(int(np.argmin(np.where(mask, key, np.inf))))
        assert info["makespan"] == run_rule(inst, rule)[0]


def test_reset_refuses_bad_options_and_oversized_instances():
    env = JobShopEnv(ShopSpec(12, 3))
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"seed": 3})
    with pytest.raises(ValueError, match="max_jobs"):
        env.reset(options={"instance": ShopSpec(13, 2).sample(np.random.default_rng(0))})
    with pytest.raises(ValueError, match="max_jobs is required"):
        JobShopEnv(lambda rng: ShopSpec(3, 3).sample(rng))
    family = ShopFamily(jobs=(2, 6), machines=(2, 4))
    drawn = JobShopEnv(lambda rng: family.sample_shop(rng).sample(rng), max_jobs=6)  # a new shop every episode
    sizes = {drawn.reset(seed=s)[1]["lower_bound"] for s in range(5)}
    assert len(sizes) > 1
    with pytest.raises(RuntimeError, match="before reset"):
        JobShopEnv(ShopSpec(3, 3)).step(0)
