"""The training config: YAML -> typed dataclasses, with unknown keys rejected by their full path.

Command-line overrides use dotted keys (`train.iterations=100`), parsed as YAML scalars, and go through
the same validation, so a typo on the command line fails exactly like a typo in the file.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp")


@dataclass
class ModelConfig:
    kind: str = "mlp"  # mlp | cnn1d (windows of cycles x sensors, meta_train/cnn.py)
    hidden: list[int] = field(default_factory=lambda: [40, 40])  # cnn1d: the dense layers after the convolutions
    activation: str = "relu"
    channels: list[int] = field(default_factory=lambda: [10, 10, 10, 10])  # cnn1d only: Conv1d widths
    kernel: int = 10  # cnn1d only: Conv1d kernel length along time


@dataclass
class AlgorithmConfig:
    name: str = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.01
    # None = the algorithm's own default (e.g. metasgd -> per_param, mamlpp -> per_layer_per_step)
    lr_mode: str | None = None
    learn_inner_lr: bool | None = None
    first_order: bool | None = None
    # MAML++: multi-step loss for the first `msl_iterations`, and first order until this iteration.
    multi_step_loss: bool | None = None
    msl_iterations: int = 10000
    first_order_until: int = 0
    # Reptile: the outer step moves towards the adapted weights; trained on support+query together.
    reptile_inner_lr: float = 0.02


@dataclass
class TrainConfig:
    iterations: int = 70000
    meta_batch: int = 25
    shots: int = 10
    query: int = 10
    meta_lr: float = 1e-3
    schedule: str = "constant"  # constant | cosine
    min_meta_lr: float = 1e-5
    grad_clip: float = 10.0
    log_every: int = 100
    checkpoint_every: int = 5000
    progress: bool = True
    # Off a terminal, progress is a plain log line at log_every iterations, at most one per this many seconds.
    progress_every_s: float = 30.0
    # A non-finite meta-loss or meta-gradient: stop (default), or skip_batch (no outer step for that batch) at
    # most max_nonfinite_skips times in the whole run before stopping. Either way the parameters stay finite.
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    # CPU threads (0: torch's intra-op count, one per core by default). With the TorchScript fast path the tasks of
    # a meta-batch are split over them; otherwise they are torch's intra-op threads (see train.meta_threads).
    threads: int = 0


@dataclass
class EvalConfig:
    tasks: int = 1000
    shots: list[int] = field(default_factory=lambda: [5, 10, 20])
    steps: list[int] = field(default_factory=lambda: [1, 5, 10])
    query: int = 100
    chunk: int = 250
    seed: int = 1234


@dataclass
class BaselineConfig:
    # None = the meta-training run's own budget in per-sample gradients (meta_train.baselines.meta_budget), so the
    # pooled network gets at least the meta-learner's compute; a smaller number is flagged in every table.
    pretrain_iterations: int | None = None
    pretrain_batch: int = 250
    pretrain_lr: float = 1e-3
    # Early stopping on the validation tasks: checked every pretrain_val_every iterations (None = budget / 50),
    # stop after pretrain_patience checks without improvement (0 = never), keep the best checkpoint.
    pretrain_val_every: int | None = None
    pretrain_patience: int = 10
    val_tasks: int = 200  # validation episodes per early-stopping check and per fine-tune rate choice
    finetune_lr: float | None = None  # None = the algorithm's inner_lr; the centre of the default grid
    # Fine-tune rates tried on the validation tasks (never on test) per method, K and step count.
    # None = finetune_lr x [0.1, 0.3, 1, 3].
    finetune_lrs: list[float] | None = None


@dataclass
class Config:
    seed: int = 0
    device: str = "cpu"
    task: dict = field(default_factory=lambda: {"name": "sinusoid"})
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)


def _check_type(value, annotation, path: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is typing.Any or annotation is dict:
        if annotation is dict and not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, path)
    return value


def from_dict(cls, data, path: str = ""):
    """Build dataclass `cls` from a mapping, naming any unknown key by its dotted path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown config key {where!r} (known here: {', '.join(sorted(known))})")
    kwargs = {k: _check_type(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def validate(cfg: Config) -> Config:
    a = cfg.algorithm
    if a.name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name must be one of {ALGORITHMS}, got {a.name!r}")
    if a.inner_steps < 1:
        raise ConfigError("algorithm.inner_steps must be >= 1")
    if a.lr_mode is not None and a.lr_mode not in ("fixed", "per_param", "per_layer_per_step"):
        raise ConfigError(f"algorithm.lr_mode must be fixed, per_param or per_layer_per_step, got {a.lr_mode!r}")
    if cfg.model.kind not in ("mlp", "cnn1d"):
        raise ConfigError(f"model.kind must be mlp or cnn1d, got {cfg.model.kind!r}")
    if cfg.train.schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.schedule must be constant or cosine, got {cfg.train.schedule!r}")
    for name in ("iterations", "meta_batch", "shots", "query"):
        if getattr(cfg.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    if cfg.train.on_nonfinite not in ("stop", "skip_batch"):
        raise ConfigError(f"train.on_nonfinite must be stop or skip_batch, got {cfg.train.on_nonfinite!r}")
    if cfg.train.max_nonfinite_skips < 0 or cfg.train.progress_every_s < 0:
        raise ConfigError("train.max_nonfinite_skips and train.progress_every_s must be >= 0")
    if cfg.train.threads < 0:
        raise ConfigError("train.threads must be >= 0 (0: one per core)")
    if not isinstance(cfg.task, dict) or "name" not in cfg.task:
        raise ConfigError("task.name is required (e.g. sinusoid, quality, vibration, cwru, table)")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [])
    return validate(from_dict(Config, data))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
