"""The run's train / validation / test split, kept in its checkpoint, so eval cannot score on training tasks.

A table's split is a seeded shuffle of its task ids: another `task.seed`, another split fraction or one more
experiment appended to the file gives another split, and "test" tasks that were meta-train tasks (issue 11:
3 of 4, and the reported MSE fell to a quarter). The checkpoint stores the task ids per split (where the source
has named tasks), the task settings with defaults filled in, and a fingerprint of the data; `meta-train eval`
compares them with the source it builds and refuses on any difference unless asked for new tasks.
"""

from __future__ import annotations

import dataclasses
import json

from .errors import ConfigError, DataError

_PLACE_KEYS = ("path", "data_dir")  # where the data lie is not what they are


def identity(task_cfg: dict, source) -> dict:
    """Plain data for the checkpoint: split task ids (or None), settings, and the data's fingerprint (or None)."""
    desc = source.describe()
    wrapped = getattr(source, "source", source)  # tasks/featurized.py's wrapper: the same tasks as its source
    opts = getattr(wrapped, "opts", None)  # every built-in source keeps its options dataclass, defaults filled in
    settings = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else dict(task_cfg)
    settings = {**{k: v for k, v in settings.items() if k not in _PLACE_KEYS}, "name": task_cfg.get("name")}
    return {"split_tasks": desc.get("split_tasks"), "settings": json.loads(json.dumps(settings, default=str)),
            "data_fingerprint": desc.get("data_fingerprint")}


def _setting_changes(old: dict, new: dict, prefix: str = "task") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _setting_changes(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}: {a!r} -> {b!r}")
    return out


def _split_changes(old: dict | None, new: dict | None) -> list[str]:
    if not old or not new:
        return []
    out = []
    trained_on = set(old.get("train", []))
    for split in ("test", "val", "train"):
        before, now = old.get(split, []), new.get(split, [])
        if before != now:
            leaked = sorted(set(now) & trained_on) if split != "train" else []
            note = f" ({len(leaked)} of them meta-train tasks of the run: {leaked[:5]})" if leaked else ""
            out.append(f"{split} tasks now {now[:8]}{note}, were {before[:8]}")
    return out


def check(stored: dict | None, current: dict, new_tasks: bool) -> str | None:
    """None when `current` is the run's own split; raises ConfigError (task settings) / DataError (data) when it
    is not; with `new_tasks` returns the note to print instead. A checkpoint from before the split was stored
    returns a note that it cannot be checked."""
    if stored is None:
        return ("note: this checkpoint predates stored splits: eval cannot check that its tasks are the run's own "
                "(retrain to get the check)")
    if stored == current:
        return None
    settings = _setting_changes(stored["settings"], current["settings"])
    data_changed = stored["data_fingerprint"] != current["data_fingerprint"]
    splits = _split_changes(stored["split_tasks"], current["split_tasks"])
    why = "; ".join(settings) if settings else ""
    if data_changed:
        why += ("; " if why else "") + "the data differ from the ones the run was trained on (other rows or values)"
    detail = (". " + "; ".join(splits)) if splits else ""
    if new_tasks:
        return (f"note: --new-tasks: evaluating on tasks that may overlap the run's training tasks ({why}{detail})")
    error = ConfigError if settings else DataError
    raise error(f"the task split would differ from the run's ({why}){detail}. Scores on it could count tasks the "
                "model was trained on. Evaluate with the run's own data and task settings, or pass --new-tasks "
                "to evaluate on new tasks that may overlap training")
