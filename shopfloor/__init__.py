"""Job-shop dispatching shared by the trainer and the line-side device.

numpy only at import: this package never imports torch, meta_train or export (the device has none of them),
and gymnasium only in `shopfloor.gym_env` (the device can dispatch without it).
"""

from shopfloor.instance import JobShopInstance
from shopfloor.dispatch import SCHEMES, Dispatcher
from shopfloor.features import FEATURE_NAMES, candidate_features
from shopfloor.rules import RULES, run_rule
from shopfloor.validate import ScheduleError, check_schedule

__all__ = [
    "JobShopInstance", "SCHEMES", "Dispatcher", "FEATURE_NAMES", "candidate_features", "RULES", "run_rule",
    "ScheduleError", "check_schedule",
]
