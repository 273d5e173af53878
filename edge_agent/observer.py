"""Hooks for metrics, systemd and anything else that wants to watch the agent without touching it.

Subclass `Observer` and override what you need; `Observers` fans out to several and swallows their
exceptions, because a broken exporter must never stop predictions. Hooks are called from the worker
thread, except on_connect/on_disconnect (MQTT network thread): keep them short and non-blocking.

Plug-ins are found by module: `edge_agent.metrics` and `edge_agent.sdnotify` may define
`create_observer(config) -> Observer | None`; the CLI calls it when the module exists.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Observer:
    def on_start(self, model_version: str) -> None:
        """State restored, bundle loaded, connected: the agent is serving."""

    def on_tick(self) -> None:
        """Called from the worker loop at least once a second while it is healthy (watchdogs)."""

    def on_sample(self, context: str) -> None:
        """A sample was accepted (not a duplicate)."""

    def on_duplicate(self) -> None:
        """A redelivered sample id was recognised and not predicted again."""

    def on_prediction(self, latency_s: float, adapted: bool, n_support: int) -> None:
        """A prediction was committed and handed to MQTT; latency from receipt to publish."""

    def on_label(self, context: str) -> None:
        """A label was joined to its sample."""

    def on_error(self, reason: str) -> None:
        """A payload was rejected; `reason` is the protocol reason code."""

    def on_adapt(self, seconds: float, n_support: int, context: str) -> None:
        """An adaptation finished."""

    def on_context(self, context: str) -> None:
        """The line switched context."""

    def on_connect(self, reconnect: bool) -> None:
        """Connected to the broker; `reconnect` is False for the first connection of the process."""

    def on_disconnect(self) -> None:
        """The broker connection was lost (paho reconnects on its own)."""

    def on_queue(self, depth: int, outbox: int) -> None:
        """Queue depth and unacknowledged predictions, after each batch."""

    def on_stopping(self) -> None:
        """Shutdown began (SIGTERM/SIGINT)."""

    def on_status(self, text: str) -> None:
        """One-line state for humans ("online, model X, 3 contexts", "reconnecting"); worker thread,
        called when it changes."""

    def on_reloading(self) -> None:
        """A reload (SIGHUP) began."""

    def on_reloaded(self, model_version: str) -> None:
        """The reload finished (applied or refused: the agent serves again either way)."""

    def on_model(self, model_version: str) -> None:
        """Another model now serves (hot reload, rollback)."""


class Observers(Observer):
    def __init__(self, observers: list[Observer] | None = None):
        self.observers = [o for o in (observers or []) if o is not None]

    def add(self, o: Observer | None) -> None:
        if o is not None:
            self.observers.append(o)


def _fan_out(name: str):
    def call(self, *args, **kwargs):
        for o in self.observers:
            try:
                getattr(o, name)(*args, **kwargs)
            except Exception:  # noqa: BLE001 - see module docstring
                log.exception("observer %s.%s failed", type(o).__name__, name)

    call.__name__ = name
    return call


for _name in [n for n in vars(Observer) if n.startswith("on_")]:
    setattr(Observers, _name, _fan_out(_name))


class SystemdObserver(Observer):
    """READY=1 once serving (bundle loaded, broker connected), WATCHDOG=1 from the worker loop only
    (so a wedged worker gets restarted), STATUS= on changes, RELOADING=1 ... READY=1 around a SIGHUP
    reload, STOPPING=1 on shutdown. No-ops without $NOTIFY_SOCKET. Every call comes from the main loop."""

    def __init__(self, sdnotify_module):
        self.notifier = sdnotify_module.Notifier()
        self.watchdog = sdnotify_module.Watchdog(self.notifier)
        self._ready = False

    def on_start(self, model_version: str) -> None:
        self._ready = True
        self.notifier.ready(f"online, model {model_version}")

    def on_tick(self) -> None:
        if self._ready:  # systemd arms the watchdog at READY=1; TimeoutStartSec covers the start
            self.watchdog.tick()

    def on_status(self, text: str) -> None:
        self.notifier.status(text)

    def on_reloading(self) -> None:
        self.notifier.reloading()

    def on_reloaded(self, model_version: str) -> None:
        self.notifier.ready(f"online, model {model_version}")

    def on_stopping(self) -> None:
        self.notifier.stopping()


class MetricsObserver(Observer):
    """Feeds edge_agent.metrics.Metrics (Prometheus) from the agent's events."""

    def __init__(self, metrics):
        self.m = metrics

    def on_start(self, model_version: str) -> None:
        self.m.set_model_version(model_version)

    def on_sample(self, context: str) -> None:
        self.m.on_sample()

    def on_prediction(self, latency_s: float, adapted: bool, n_support: int) -> None:
        self.m.on_prediction(latency_s)

    def on_error(self, reason: str) -> None:
        self.m.on_error(reason)

    def on_adapt(self, seconds: float, n_support: int, context: str) -> None:
        self.m.on_adapt(seconds)
        self.m.set_support_size(context, n_support)

    def on_connect(self, reconnect: bool) -> None:
        self.m.set_connected(True)
        if reconnect:
            self.m.on_reconnect()

    def on_disconnect(self) -> None:
        self.m.set_connected(False)

    def on_queue(self, depth: int, outbox: int) -> None:
        self.m.set_queue(depth, outbox)

    def on_model(self, model_version: str) -> None:
        self.m.set_model_version(model_version)

    def on_stopping(self) -> None:
        self.m.stop_server()
