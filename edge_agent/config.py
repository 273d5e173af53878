"""agent.yaml: a strict schema of small dataclasses.

Every key is known: a typo ("keep_alive") must stop the agent at start-up with the key's full path,
not be silently ignored and leave the line running on a default. Relative paths are resolved against
the directory of the config file, so a config and its key files can be moved together.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .errors import ConfigError
from .prediction_config import Predictions, check as _check_predictions


@dataclass
class TLS:
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    insecure: bool = False  # skip hostname checking; for lab brokers with IP-only certificates


@dataclass
class Broker:
    host: str = "localhost"
    port: int = 1883
    client_id: Optional[str] = None  # default: "edge-agent-" + topic prefix, stable across restarts
    keepalive: int = 30
    protocol: Literal["5", "3.1.1"] = "5"
    session_expiry: int = 7 * 24 * 3600  # seconds the broker keeps our queue while we are down (MQTT 5)
    username: Optional[str] = None
    # The outbound (predictions) connection's username, same password; default: `username`. Needed
    # where the broker makes the username the client id (deploy/mosquitto: <device>-out).
    outbound_username: Optional[str] = None
    password: Optional[str] = None
    password_file: Optional[str] = None
    tls: Optional[TLS] = None
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 60.0
    connect_timeout: float = 30.0  # no connection at start-up within this -> exit 5
    max_inflight: int = 0  # our unconfirmed publishes in flight; 0: as many as the broker's Receive Maximum


@dataclass
class Bundle:
    dir: str = ""
    public_key: Optional[str] = None
    allow_unsigned: bool = False
    # Hot reload: each new sub-directory of watch_dir holding a bundle is verified, test-loaded and
    # activated (polled from the main loop every watch_interval seconds). None: no watching.
    watch_dir: Optional[str] = None
    watch_interval: float = 5.0
    keep: int = 5  # installed bundles kept in <state_dir>/bundles (the depth of `rollback`)


@dataclass
class Adaptation:
    support_size: Optional[int] = None  # K; default: manifest.recommended_k
    adapt_every: int = 1  # re-adapt after this many new labels in a context
    min_labels: int = 1  # predict with the meta-initialisation until a context has this many labels


@dataclass
class Limits:
    max_payload_bytes: int = 65536
    queue_size: int = 1000  # also sent as MQTT 5 Receive Maximum, so the broker never overfills it
    recent_ids: int = 20_000  # sample ids remembered to ignore redeliveries (~100 bytes each)
    pending_samples: int = 10_000  # unlabelled samples kept for labels that arrive later
    batch_size: int = 256  # messages processed per durable commit
    # Predictions handed to the MQTT client and not yet confirmed (PUBACK); the rest wait, committed, in the
    # outbox. Above the broker's in-flight limit (mosquitto: 20 by default, deploy/mosquitto: 100), more only
    # costs memory (~1.5 KiB each inside paho): 1000 gave the same throughput and ~1.5 MiB more RSS.
    publish_window: int = 256
    resend_predictions: int = 2000  # confirmed predictions kept in memory, re-sent if their sample is re-published
    # Contexts (support set + adapted state each) kept; the least recently used beyond it is forgotten
    # (edge_agent/contexts.py): any publisher can invent context names.
    max_contexts: int = 1000
    # Labels that arrive before their sample are held (edge_agent/early_labels.py); 0: rejected at once.
    early_labels: int = 1000
    early_label_ttl_s: float = 60.0
    # A known sample id with other content (a PLC counter reset): None refuses it (duplicate_id); a number
    # of seconds accepts it as a new part once the id was last accepted at least that long ago (sample_ids.py).
    dedupe_window_s: Optional[float] = None


@dataclass
class Metrics:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9108
    # Contexts with their own series in per-context metrics; later ones share context="other".
    max_context_labels: int = 100


@dataclass
class Config:
    topic_prefix: str = ""
    state_dir: str = ""
    bundle: Bundle = field(default_factory=Bundle)
    broker: Broker = field(default_factory=Broker)
    adaptation: Adaptation = field(default_factory=Adaptation)
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    predictions: Predictions = field(default_factory=Predictions)  # prediction_config.py (issue 13)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    path: Optional[str] = None  # where it was loaded from; not a YAML key

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}/{name}"


_NOT_KEYS = {"path"}
# Keys whose values never appear in an error message: errors reach the journal and, on a refused
# SIGHUP reload, the `errors` topic that operator and monitor accounts read.
SECRET_KEYS = {"broker.password"}


CREDENTIALS_VAR = "CREDENTIALS_DIRECTORY"
# Keys that may name a systemd credential: "$CREDENTIALS_DIRECTORY/<name>" (LoadCredential=<name>:...).
CREDENTIAL_KEYS = ("broker.password_file", "broker.tls.cert", "broker.tls.key", "broker.tls.ca")


def load_config(path: str | os.PathLike, credentials_dir: str | None = None) -> Config:
    """`credentials_dir`: where "$CREDENTIALS_DIRECTORY/..." paths point; default: that variable,
    which systemd sets for a unit with LoadCredential=."""
    try:
        import yaml
    except ImportError as e:  # the edge extra always has it; be explicit if someone trimmed it
        raise ConfigError("pyyaml is required to read the config") from e
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        # Not str(e): PyYAML quotes the offending source lines, which may be the password line.
        raise ConfigError(f"{p}: not valid YAML{_yaml_where(e)}") from None
    cfg = config_from_dict(data if data is not None else {}, base_dir=p.resolve().parent,
                           credentials_dir=credentials_dir)
    cfg.path = str(p)
    return cfg


def _yaml_where(e: Exception) -> str:
    """Line, column and PyYAML's one-phrase diagnosis; never the source text around it."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    what = " ".join(what.split())[:200]  # one line, bounded
    return f"{where}: {what}" if what else where


def config_from_dict(data: Any, base_dir: Path | None = None, credentials_dir: str | None = None) -> Config:
    cfg = _build(Config, data, "")
    _check(cfg)
    if base_dir is not None:
        _resolve_paths(cfg, base_dir, credentials_dir)
    return cfg


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_tname(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - _NOT_KEYS
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key '{where}' (allowed here: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _value(hints[name], data[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _value(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None:
            return None
        return _value(args[0], v, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML reads `protocol: 5` as an int; accept the spelling people will write
        if str(v) in allowed and not isinstance(v, (bool, dict, list)):
            return str(v)
        raise ConfigError(f"{path}: must be one of {', '.join(map(repr, allowed))}, got {_shown(path, v)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, path)
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    elif tp is str:
        if isinstance(v, str):
            return v
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported schema type {tp!r} at {path}")
    raise ConfigError(f"{path}: expected {tp.__name__}, got {_tname(v)} ({_shown(path, v)})")


def _shown(path: str, v: Any) -> str:
    if path in SECRET_KEYS:
        return "value not shown: secret; quote it in YAML to make it a string"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _tname(v: Any) -> str:
    return {dict: "mapping", list: "list", type(None): "null"}.get(type(v), type(v).__name__)


def _check(cfg: Config) -> None:
    def need(ok: bool, path: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{path}: {msg}")

    need(bool(cfg.topic_prefix), "topic_prefix", "required (e.g. factory/line1/press2)")
    need(not any(c in cfg.topic_prefix for c in "#+") and not cfg.topic_prefix.endswith("/"),
         "topic_prefix", "must not contain wildcards or end with '/'")
    need(bool(cfg.state_dir), "state_dir", "required")
    need(bool(cfg.bundle.dir), "bundle.dir", "required")
    need(cfg.bundle.allow_unsigned or bool(cfg.bundle.public_key), "bundle.public_key",
         "required unless bundle.allow_unsigned is true")
    need(cfg.bundle.watch_interval > 0, "bundle.watch_interval", "must be > 0")
    need(cfg.bundle.keep >= 2, "bundle.keep", "must be >= 2 (the active bundle and one to roll back to)")
    b = cfg.broker
    need(1 <= b.port <= 65535, "broker.port", f"must be 1..65535, got {b.port}")
    need(b.keepalive >= 5, "broker.keepalive", "must be >= 5 seconds")
    need(b.session_expiry >= 0, "broker.session_expiry", "must be >= 0")
    need(not (b.password and b.password_file), "broker.password_file", "give password or password_file, not both")
    need(b.outbound_username is None or b.username is not None, "broker.outbound_username", "needs broker.username")
    need(0 < b.reconnect_min_delay <= b.reconnect_max_delay, "broker.reconnect_min_delay",
         "must be > 0 and <= broker.reconnect_max_delay")
    need(b.connect_timeout > 0, "broker.connect_timeout", "must be > 0")
    need(b.max_inflight >= 0, "broker.max_inflight", "must be >= 0")
    if b.tls is not None:
        need(bool(b.tls.cert) == bool(b.tls.key), "broker.tls", "cert and key go together")
    a = cfg.adaptation
    need(a.support_size is None or a.support_size >= 1, "adaptation.support_size", "must be >= 1")
    need(a.adapt_every >= 1, "adaptation.adapt_every", "must be >= 1")
    need(a.min_labels >= 1, "adaptation.min_labels", "must be >= 1")
    lim = cfg.limits
    need(lim.max_payload_bytes >= 64, "limits.max_payload_bytes", "must be >= 64")
    need(1 <= lim.queue_size <= 65535, "limits.queue_size", "must be 1..65535 (MQTT Receive Maximum)")
    need(lim.recent_ids >= 1, "limits.recent_ids", "must be >= 1")
    need(lim.pending_samples >= 1, "limits.pending_samples", "must be >= 1")
    need(lim.publish_window >= 1, "limits.publish_window", "must be >= 1")
    need(lim.batch_size >= 1, "limits.batch_size", "must be >= 1")
    need(lim.resend_predictions >= 0, "limits.resend_predictions", "must be >= 0")
    need(lim.max_contexts >= 1, "limits.max_contexts", "must be >= 1")
    need(lim.early_labels >= 0, "limits.early_labels", "must be >= 0")
    need(lim.early_label_ttl_s > 0, "limits.early_label_ttl_s", "must be > 0")
    need(lim.dedupe_window_s is None or lim.dedupe_window_s > 0, "limits.dedupe_window_s", "must be > 0 or null")
    need(1 <= cfg.metrics.port <= 65535, "metrics.port", "must be 1..65535")
    need(0 <= cfg.metrics.max_context_labels <= 10_000, "metrics.max_context_labels", "must be 0..10000")
    _check_predictions(cfg.predictions, need)


def _resolve_paths(cfg: Config, base: Path, credentials_dir: str | None = None) -> None:
    def res(p: str | None, key: str = "") -> str | None:
        if p is None:
            return None
        for var in (f"${CREDENTIALS_VAR}/", f"${{{CREDENTIALS_VAR}}}/"):
            if p.startswith(var):
                if key not in CREDENTIAL_KEYS:
                    raise ConfigError(f"{key}: ${CREDENTIALS_VAR} is only for {', '.join(CREDENTIAL_KEYS)}")
                cred = credentials_dir or os.environ.get(CREDENTIALS_VAR)
                if not cred:
                    raise ConfigError(
                        f"{key}: {p} names a systemd credential, but ${CREDENTIALS_VAR} is not set (it is, "
                        f"inside a unit with LoadCredential=); outside the service use "
                        f"`edge-agent check-config --credentials-dir DIR`")
                return str(Path(cred) / p[len(var):])
        return str((base / os.path.expanduser(p)).resolve())

    cfg.state_dir = res(cfg.state_dir, "state_dir")
    cfg.bundle.dir = res(cfg.bundle.dir, "bundle.dir")
    cfg.bundle.public_key = res(cfg.bundle.public_key, "bundle.public_key")
    cfg.bundle.watch_dir = res(cfg.bundle.watch_dir, "bundle.watch_dir")
    cfg.broker.password_file = res(cfg.broker.password_file, "broker.password_file")
    if cfg.broker.tls is not None:
        t = cfg.broker.tls
        t.ca, t.cert, t.key = res(t.ca, "broker.tls.ca"), res(t.cert, "broker.tls.cert"), res(t.key, "broker.tls.key")
