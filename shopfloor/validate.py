"""An independent schedule check: uses only the instance and the start times, none of the dispatcher's state."""

from __future__ import annotations

import numpy as np

from shopfloor.instance import JobShopInstance


class ScheduleError(ValueError):
    """The start times do not form a feasible schedule of the instance."""


def check_schedule(instance: JobShopInstance, start: np.ndarray) -> int:
    """Raise ScheduleError unless every operation is scheduled once, each job's route order is kept and no
    machine runs two operations at once. Returns the makespan."""
    start = np.asarray(start)
    if start.shape != instance.machines.shape:
        raise ScheduleError(f"start times {start.shape} != instance shape {instance.machines.shape}")
    if np.any(start < 0):
        j, k = np.argwhere(start < 0)[0]
        raise ScheduleError(f"operation ({j}, {k}) is not scheduled (start {start[j, k]})")
    end = start + instance.durations
    bad = np.argwhere(start[:, 1:] < end[:, :-1])
    if len(bad):
        j, k = bad[0]
        raise ScheduleError(f"job {j}: operation {k + 1} starts at {start[j, k + 1]} before operation {k} "
                            f"ends at {end[j, k]}")
    for m in range(instance.n_machines):
        on_m = instance.machines == m
        s, e = start[on_m], end[on_m]
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        clash = np.flatnonzero(s[1:] < e[:-1])
        if len(clash):
            i = clash[0]
            raise ScheduleError(f"machine {m}: an operation starts at {s[i + 1]} while another runs "
                                f"[{s[i]}, {e[i]})")
    return int(end.max())


def left_shiftable(instance: JobShopInstance, start: np.ndarray) -> list[tuple[int, int]]:
    """Operations that could start earlier without moving any other one (the schedule is active iff none):
    an earlier idle gap on the machine, after the job's previous operation, long enough to hold it."""
    end = start + instance.durations
    found = []
    for j in range(instance.n_jobs):
        for k in range(instance.n_ops):
            m, p = instance.machines[j, k], instance.durations[j, k]
            ready = end[j, k - 1] if k else 0
            others = sorted((start[a, b], end[a, b]) for a, b in np.argwhere(instance.machines == m)
                            if (a, b) != (j, k))
            t = ready
            for s, e in others:
                if s >= start[j, k]:
                    break
                if t + p <= s:
                    break
                t = max(t, e)
            if t < start[j, k]:  # the slot ending where it starts now is free once it moves
                found.append((j, k))
    return found
