"""Many unseen lines through one running agent, each in its own context, scored against references
computed locally on the very same samples (issue 13 part 1).

For every sample i of a task, m = the labels the agent had when it predicted it (the simulator
publishes label j right after sample j + label_delay, in order, on one connection). The references:
  - population: the bundle's population model (manifest `predictors`), which never adapts;
  - adapted: the shipped initialisation adapted by the bundle's own adapt graph on the m most recent
    labels (at most the agent's support size) - what the agent would answer if it always adapted;
  - meta_init: the bare initialisation.
Per label-count window the table gives each one's mean error with a 95 % CI over tasks (each task's
mean in the window is one observation), and the agent's paired difference to the better reference.
Torch-free: numpy + onnxruntime + paho.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

WINDOWS = [(0, 0), (1, 4), (5, 9), (10, 19), (20, 49), (50, 10 ** 9)]


def window_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else (f"{lo}+" if hi >= 10 ** 9 else f"{lo}-{hi}")


def load_tasks(task_dir: str | Path, n: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    files = sorted(Path(task_dir).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no *.npz task files in {task_dir}")
    out = []
    for f in files[: n or len(files)]:
        with np.load(f, allow_pickle=False) as d:
            out.append((f.stem, d["x"], d["y"]))
    return out


def play_all(line, tasks, run_id: str, label_delay: int, timeout: float) -> list[list[str]]:
    """Each task in its own context (named after the task file), samples as fast as the broker takes them."""
    all_ids = []
    for name, x, y in tasks:
        ctx = f"{run_id}-{name}"
        ids = [f"{ctx}-{i}" for i in range(len(x))]
        for i in range(len(x)):
            line.sample(ids[i], x[i], context=ctx)
            j = i - label_delay
            if j >= 0:
                line.label(ids[j], y[j])
        for j in range(max(0, len(x) - label_delay), len(x)):
            line.label(ids[j], y[j])
        all_ids.append(ids)
        # one task at a time in flight keeps the broker's queue and our memory bounded
        line.wait_predictions(ids, timeout)
    return all_ids


def _errors(model, out: np.ndarray, y) -> np.ndarray:
    out = np.asarray(out)
    if out.ndim == 2:
        return (out.argmax(axis=1) != np.asarray(y)).astype(float)
    return (out.reshape(-1) - np.asarray(y, float)) ** 2


def score_task(model, x, y, ids, predictions: dict, label_delay: int, k: int) -> dict:
    """Per-sample errors of the agent and of the three references, and the agent's sources."""
    n = len(ids)
    m = np.maximum(0, np.arange(n) - label_delay)
    agent = np.full(n, np.nan)
    covered, width = np.full(n, np.nan), np.full(n, np.nan)  # the agent's interval, where it gave one
    p_out, y_hat = np.full(n, np.nan), np.full(n, np.nan)
    sources = np.array([""] * n, dtype=object)
    for i, sid in enumerate(ids):
        got = predictions.get(sid)
        if got:
            p = got[0]
            sources[i] = p.get("source", "")
            if p.get("p_out_of_spec") is not None:
                p_out[i] = float(p["p_out_of_spec"])
            if isinstance(p.get("prediction"), (int, float)):
                y_hat[i] = float(p["prediction"])
            iv = p.get("interval")
            if iv and None not in iv:
                covered[i] = float(iv[0] <= float(y[i]) <= iv[1])
                width[i] = float(iv[1] - iv[0])
            if "class_index" in p:
                agent[i] = float(p["class_index"] != int(y[i]))
            elif p.get("prediction") is not None:
                agent[i] = (float(p["prediction"]) - float(y[i])) ** 2
    meta = _errors(model, model.predict(model.init_state, x), y)
    pop = None
    if model.predictors.has_population:
        pop = _errors(model, model.predict(model.predictors.population_state, x), y)
    adapted = meta.copy()
    for i in range(n):
        if m[i] > 0:
            lo = max(0, m[i] - k)
            state = model.adapt(x[lo:m[i]], y[lo:m[i]])
            adapted[i] = _errors(model, model.predict(state, x[i:i + 1]), y[i:i + 1])[0]
    return {"m": m, "agent": agent, "source": sources, "meta_init": meta, "population": pop, "adapted": adapted,
            "covered": covered, "width": width, "p_out": p_out, "y_hat": y_hat, "y": np.asarray(y, float),
            "ids": list(ids)}


def _mean_ci(v) -> tuple[float | None, float | None]:
    v = np.asarray([a for a in v if a is not None and math.isfinite(a)], float)
    if v.size == 0:
        return None, None
    ci = 1.96 * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else float("nan")
    return float(v.mean()), ci


def summarise(scored: list[dict]) -> list[dict]:
    rows = []
    for lo, hi in WINDOWS:
        per_task = {key: [] for key in ("agent", "population", "adapted", "meta_init", "covered", "width")}
        src_counts: dict[str, int] = {}
        n_samples = 0
        for s in scored:
            sel = (s["m"] >= lo) & (s["m"] <= hi)
            if not sel.any():
                continue
            n_samples += int(sel.sum())
            for key in per_task:
                v = s.get(key)
                ok = v is not None and np.isfinite(v[sel]).any()
                per_task[key].append(float(np.nanmean(v[sel])) if ok else None)
            for src in s["source"][sel]:
                src_counts[src] = src_counts.get(src, 0) + 1
        if not n_samples:
            continue
        row = {"labels": window_label(lo, hi), "tasks": len(per_task["agent"]), "samples": n_samples,
               "sources": src_counts}
        for key, vals in per_task.items():
            row[key], row[f"{key}_ci95"] = _mean_ci(vals)
        # the better reference in this window, and the agent's paired (same tasks, same samples) difference
        cands = [k for k in ("population", "adapted") if row[k] is not None]
        best = min(cands, key=lambda k: row[k])
        diff = [a - b for a, b in zip(per_task["agent"], per_task[best]) if a is not None and b is not None]
        row["best_reference"] = best
        row["agent_minus_best"], row["agent_minus_best_ci95"] = _mean_ci(diff)
        d, c = row["agent_minus_best"], row["agent_minus_best_ci95"]
        row["no_worse"] = d is not None and (d <= 0 or (c is not None and math.isfinite(c) and d - c <= 0))
        if lo == 0 and row["population"] is not None:
            dp = [a - b for a, b in zip(per_task["agent"], per_task["population"])]
            row["agent_minus_population"], row["agent_minus_population_ci95"] = _mean_ci(dp)
        rows.append(row)
    return rows


def markdown(rows: list[dict], title: str, metric: str = "MSE") -> str:
    def f(v, c=None):
        if v is None:
            return "-"
        return f"{v:.4g}" if c is None or not math.isfinite(c) else f"{v:.4g} ± {c:.2g}"

    lines = [f"{title}", "",
             f"| labels | tasks | samples | agent {metric} | population | adapted meta-init | bare meta-init | "
             "agent − better (paired) | no worse | agent's sources |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        src = ", ".join(f"{k or '?'} {v}" for k, v in sorted(r["sources"].items()))
        lines.append(f"| {r['labels']} | {r['tasks']} | {r['samples']} | {f(r['agent'], r['agent_ci95'])} | "
                     f"{f(r['population'], r['population_ci95'])} | {f(r['adapted'], r['adapted_ci95'])} | "
                     f"{f(r['meta_init'], r['meta_init_ci95'])} | "
                     f"{f(r['agent_minus_best'], r['agent_minus_best_ci95'])} ({r['best_reference']}) | "
                     f"{'yes' if r['no_worse'] else '**no**'} | {src} |")
    return "\n".join(lines) + "\n"


def interval_markdown(rows: list[dict], coverage: float, title: str) -> str:
    lines = [title, "", f"| labels | tasks | samples | coverage (nominal {coverage:.0%}) | mean width |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r.get("covered") is None:
            continue
        lines.append(f"| {r['labels']} | {r['tasks']} | {r['samples']} | {100 * r['covered']:.1f} ± "
                     f"{100 * r['covered_ci95']:.1f} % | {r['width']:.4g} |")
    return "\n".join(lines) + "\n"


ALARM_WINDOWS = [(0, 0), (5, 9), (20, 49)]


def _pr(flag: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((flag & truth).sum())
    return {"alarms": int(flag.sum()), "tp": tp,
            "precision": tp / int(flag.sum()) if flag.any() else None,
            "recall": tp / int(truth.sum()) if truth.any() else None}


def alarm_rows(scored: list[dict], alarmed_ids: set, lower, upper, thresholds=(0.5,)) -> list[dict]:
    """Scrap detection per window: the agent's alarms (what arrived on the alarms topic), p_out_of_spec
    at other thresholds, and the naive rule 'the point prediction is out of spec', against the truth."""
    rows = []
    for lo, hi in ALARM_WINDOWS:
        sel = [(s["m"] >= lo) & (s["m"] <= hi) for s in scored]
        y = np.concatenate([s["y"][m] for s, m in zip(scored, sel)])
        yh = np.concatenate([s["y_hat"][m] for s, m in zip(scored, sel)])
        p = np.concatenate([s["p_out"][m] for s, m in zip(scored, sel)])
        ids = [i for s, m in zip(scored, sel) for i, keep in zip(s["ids"], m) if keep]
        if not len(y):
            continue

        def out(v):
            o = np.zeros(len(v), bool)
            if lower is not None:
                o |= v < lower
            if upper is not None:
                o |= v > upper
            return o

        truth = out(y)
        row = {"labels": window_label(lo, hi), "parts": len(y), "scrap": int(truth.sum()),
               "alarm_topic": _pr(np.array([i in alarmed_ids for i in ids]), truth),
               "naive": _pr(out(yh), truth)}
        for t in thresholds:
            row[f"p>={t}"] = _pr(np.nan_to_num(p, nan=-1.0) >= t, truth)
        rows.append(row)
    return rows


def alarm_markdown(rows: list[dict], title: str, threshold: float, thresholds) -> str:
    def f(d):
        pr = "-" if d["precision"] is None else f"{100 * d['precision']:.0f} %"
        rc = "-" if d["recall"] is None else f"{100 * d['recall']:.0f} %"
        return f"{pr} / {rc} ({d['alarms']})"

    cols = [("alarm_topic", f"alarms topic (p >= {threshold})")] + \
        [(f"p>={t}", f"p_out_of_spec >= {t}") for t in thresholds] + [("naive", "naive: prediction out of spec")]
    lines = [title, "", "| labels | parts | scrap | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['labels']} | {r['parts']} | {r['scrap']} | " + " | ".join(f(r[c[0]]) for c in cols) + " |")
    return "\n".join(lines) + "\n\nCells: precision / recall (number of parts flagged).\n"
