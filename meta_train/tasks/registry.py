"""Name -> task source class, imported only when asked for (the CWRU and table sources need files)."""

from __future__ import annotations

import importlib

from ..errors import ConfigError

SOURCES = {
    "sinusoid": "sinusoid:SinusoidSource",
    "quality": "quality:QualitySource",
    "vibration": "vibration:VibrationSource",
    "cwru": "cwru:CWRUSource",
    "table": "table:TableSource",
    "cmapss": "cmapss:CMAPSSSource",
}


def build(cfg: dict):
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in SOURCES:
        raise ConfigError(f"task.name must be one of {sorted(SOURCES)}, got {name!r}")
    module, cls = SOURCES[name].split(":")
    source_cls = getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    return source_cls.from_config(cfg)
