"""Pretrain the scoring policy on generated shops, adapt on unseen shops, compare with the rules.

    .venv/bin/python benchmarks/jobshop_rl.py --seconds 180 --out docs/results/jobshop_rl.json

Pretraining: Adam on the self-critical REINFORCE gradient (meta_train.dispatch_rl), each batch a new set of
training shops (shopfloor.generators.ShopFamily, "train" stream). Evaluation on "test" shops (unseen): per shop,
`--eval-instances` fixed instances; the greedy policy's makespan after 0, 1, 5 adaptation episodes (each: one new
instance of that shop, one sampled episode with the greedy episode as baseline, one SGD step; nothing of the
eval instances is used), for the pretrained policy and for a randomly initialised one ("scratch", same budget),
next to the four rules, all under the same scheme. Gap = makespan / trivial lower bound - 1 (the bound is
a valid lower bound, not a solver's reference: no CP-SAT here yet).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meta_train.dispatch_rl import ScoringPolicy, adapt_step, greedy_makespans, policy_gradient, self_critical  # noqa: E402
from shopfloor import run_rule  # noqa: E402
from shopfloor.generators import ShopFamily  # noqa: E402
from shopfloor.rules import RULES  # noqa: E402
from shopfloor.taillard import load_bounds, load_instances  # noqa: E402


def gap(makespans, instances) -> float:
    return 100.0 * float(np.mean([mk / inst.trivial_lower_bound() - 1 for mk, inst in zip(makespans, instances)]))


def taillard_gaps(model, params, args) -> dict:
    bounds = load_bounds(args.taillard_dir)
    out = {}
    for size in args.taillard_sizes:
        names = [n for n in sorted(bounds) if f"{bounds[n]['jobs']}x{bounds[n]['machines']}" == size]
        insts = load_instances(args.taillard_dir, names)
        best = {n: bounds[n]["upper_bound"] for n in names}
        pol = greedy_makespans(model, params, list(insts.values()), args.scheme)
        rule = [run_rule(i, "FDD/MWKR", args.scheme)[0] for i in insts.values()]
        out[size] = {"policy": 100 * float(np.mean([m / best[n] - 1 for m, n in zip(pol, names)])),
                     "FDD/MWKR": 100 * float(np.mean([m / best[n] - 1 for m, n in zip(rule, names)]))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="pretraining wall-clock budget")
    ap.add_argument("--scheme", default="non_delay")
    ap.add_argument("--jobs", type=int, nargs=2, default=(6, 15))
    ap.add_argument("--machines", type=int, nargs=2, default=(4, 10))
    ap.add_argument("--batch", type=int, default=8, help="training shops per update")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--adapt-lr", type=float, default=1.0)
    ap.add_argument("--adapt-episodes", type=int, nargs="+", default=[0, 1, 5])
    ap.add_argument("--test-shops", type=int, default=10)
    ap.add_argument("--eval-instances", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--taillard-dir", default=None, help="also run the pretrained greedy policy on Taillard")
    ap.add_argument("--taillard-sizes", nargs="+", default=["15x15", "20x15", "20x20", "30x15", "30x20"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    family = ShopFamily(jobs=tuple(args.jobs), machines=tuple(args.machines))
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    model = ScoringPolicy()
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    leaves = {k: v.clone() for k, v in init.items()}
    opt = torch.optim.Adam(list(leaves.values()), lr=args.lr)
    curve, updates, t0 = [], 0, time.perf_counter()
    train_shops = family.iter_shops("train", seed=args.seed)
    while time.perf_counter() - t0 < args.seconds:
        instances = [next(train_shops).sample(rng) for _ in range(args.batch)]
        params = {k: v.detach() for k, v in leaves.items()}
        eps, advs, mks = self_critical(model, params, instances, args.scheme, gen)
        g = policy_gradient(model, params, eps, advs)
        for k, v in leaves.items():
            v.grad = g[k]
        opt.step()
        updates += 1
        if updates % 20 == 0:
            curve.append({"update": updates, "seconds": round(time.perf_counter() - t0, 1),
                          "sampled_gap_percent": gap(mks, instances)})
            print(f"update {updates}: sampled gap {curve[-1]['sampled_gap_percent']:.1f} %", flush=True)
    pretrained = {k: v.detach().clone() for k, v in leaves.items()}

    test_shops = family.shops("test", args.test_shops, seed=args.seed)
    rows = {name: {e: [] for e in args.adapt_episodes} for name in ("pretrained", "scratch")}
    rule_gaps = {r: [] for r in RULES}
    for i, shop in enumerate(test_shops):
        shop_rng = np.random.default_rng([args.seed, i])
        evals = [shop.sample(shop_rng) for _ in range(args.eval_instances)]
        for r in RULES:
            rule_gaps[r].append(gap([run_rule(i, r, args.scheme)[0] for i in evals], evals))
        for name, start in (("pretrained", pretrained), ("scratch", init)):
            p, done = dict(start), 0
            adapt_rng = np.random.default_rng([args.seed, 7, i])
            for budget in sorted(args.adapt_episodes):
                while done < budget:
                    eps, advs, _ = self_critical(model, p, [shop.sample(adapt_rng)], args.scheme, gen)
                    p = adapt_step(model, p, eps, advs, args.adapt_lr)
                    done += 1
                rows[name][budget].append(gap(greedy_makespans(model, p, evals, args.scheme), evals))

    print(f"\n{updates} pretraining updates in {args.seconds:.0f} s, {args.test_shops} unseen test shops x "
          f"{args.eval_instances} instances, scheme {args.scheme}; mean gap to the trivial lower bound (%)\n")
    print("| method | " + " | ".join(f"after {e} episodes" for e in args.adapt_episodes) + " |")
    print("|---" * (len(args.adapt_episodes) + 1) + "|")
    for name, by in rows.items():
        print(f"| {name} | " + " | ".join(f"{np.mean(by[e]):.1f}" for e in args.adapt_episodes) + " |")
    for r, g in rule_gaps.items():
        print(f"| rule {r} | " + " | ".join(f"{np.mean(g):.1f}" for _ in args.adapt_episodes) + " |")
    taillard = taillard_gaps(model, pretrained, args) if args.taillard_dir else {}
    if taillard:
        print(f"\nTaillard, pretrained policy without adaptation, scheme {args.scheme}: mean gap to best-known (%)\n")
        print("| size | policy | best rule here (FDD/MWKR) |\n|---|---|---|")
        for size, row in taillard.items():
            print(f"| {size} | {row['policy']:.1f} | {row['FDD/MWKR']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps({"command": "benchmarks/jobshop_rl.py " + " ".join(argv or sys.argv[1:]),
                                        "updates": updates, "curve": curve, "taillard_gap_percent": taillard,
                                        "gap_percent": {n: {str(e): float(np.mean(v)) for e, v in by.items()}
                                                        for n, by in rows.items()},
                                        "rule_gap_percent": {r: float(np.mean(g)) for r, g in rule_gaps.items()}},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
