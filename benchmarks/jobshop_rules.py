"""Priority dispatching rules on Taillard's instances, per schedule-generation scheme, next to L2D's numbers.

    .venv/bin/python benchmarks/jobshop_rules.py --data-dir ../shared/data/taillard \
        --out docs/results/jobshop_rules.json          # ~1-2 min on one core (all 80 instances, 4 schemes)

For every instance, rule (SPT, MWKR, FDD/MWKR, MOPNR) and scheme (shopfloor.dispatch.SCHEMES) the schedule is
built by shopfloor's dispatcher, checked by the independent validator (shopfloor.validate.check_schedule:
precedence + machine capacity; the run aborts on any infeasible schedule) and its gap to the best-known
makespan (bounds.csv upper_bound) is averaged per size group. Beside each, the L2D paper's published gap for
the same rule, recomputed from l2d_neurips2020_makespans.csv against the bound that paper used (UB_used), which
reproduces its Table 3. Prints one markdown table per scheme; --out writes every number as JSON.
Needs numpy only (no torch, no gymnasium).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shopfloor import SCHEMES, check_schedule, run_rule  # noqa: E402
from shopfloor.rules import RULES  # noqa: E402
from shopfloor.taillard import load_bounds, load_instances, load_l2d  # noqa: E402

L2D_COLUMN = {"SPT": "SPT", "MWKR": "MWKR", "FDD/MWKR": "FDD_MWKR", "MOPNR": "MOPNR"}


def size_of(bounds: dict, name: str) -> str:
    return f"{bounds[name]['jobs']}x{bounds[name]['machines']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="the Taillard folder (instances/, bounds.csv, l2d csv)")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--sizes", nargs="+", default=None, help="size groups like 15x15 30x20 (default: all 8)")
    ap.add_argument("--out", type=Path, default=None, help="write all makespans and gaps as JSON here")
    args = ap.parse_args(argv)

    bounds, l2d = load_bounds(args.data_dir), load_l2d(args.data_dir)
    names = [n for n in sorted(bounds) if args.sizes is None or size_of(bounds, n) in args.sizes]
    if not names:
        ap.error(f"no instance of sizes {args.sizes}")
    instances = load_instances(args.data_dir, names)
    groups = list(dict.fromkeys(size_of(bounds, n) for n in names))

    makespans = {s: {r: {} for r in RULES} for s in args.schemes}
    t0 = time.perf_counter()
    for name, inst in instances.items():
        for scheme in args.schemes:
            for rule in RULES:
                mk, start = run_rule(inst, rule, scheme)
                if check_schedule(inst, start) != mk:
                    raise SystemExit(f"{name} {rule} {scheme}: validator makespan != dispatcher makespan")
                if mk < bounds[name]["lower_bound"]:
                    raise SystemExit(f"{name} {rule} {scheme}: makespan {mk} below the proven lower bound")
                makespans[scheme][rule][name] = mk
    seconds = time.perf_counter() - t0

    def mean_gap(values: dict, bound_of) -> float:
        return 100.0 * sum((values[n] - bound_of(n)) / bound_of(n) for n in values) / len(values)

    gaps = defaultdict(dict)
    for g in groups:
        members = [n for n in names if size_of(bounds, n) == g]
        for rule in RULES:
            gaps[g][f"L2D {rule}"] = mean_gap({n: l2d[n][L2D_COLUMN[rule]] for n in members},
                                              lambda n: l2d[n]["UB_used"])
            for scheme in args.schemes:
                gaps[g][f"{scheme} {rule}"] = mean_gap({n: makespans[scheme][rule][n] for n in members},
                                                       lambda n: bounds[n]["upper_bound"])
        gaps[g]["L2D policy"] = mean_gap(
            {n: l2d[n]["L2D_same_size"] or l2d[n]["L2D_30x20"] for n in members}, lambda n: l2d[n]["UB_used"])

    print(f"# mean gap to best-known makespan (%), {len(names)} instances, {seconds:.1f} s, every schedule validated")
    for scheme in args.schemes:
        print(f"\n## scheme: {scheme}  (ours | L2D paper)\n")
        print("| size | " + " | ".join(f"{r} ours | {r} L2D" for r in RULES) + " | L2D policy |")
        print("|---" * (2 * len(RULES) + 2) + "|")
        for g in groups:
            cells = " | ".join(f"{gaps[g][f'{scheme} {r}']:.1f} | {gaps[g][f'L2D {r}']:.1f}" for r in RULES)
            print(f"| {g} | {cells} | {gaps[g]['L2D policy']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(["benchmarks/jobshop_rules.py"] + (argv or sys.argv[1:])),
                                        "seconds": seconds, "gaps_percent": gaps, "makespans": makespans},
                                       indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
