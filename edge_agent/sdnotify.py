"""systemd notify protocol (sd_notify(3)) in the stdlib: READY/STATUS/WATCHDOG/STOPPING/RELOADING.

Everything is a no-op when $NOTIFY_SOCKET is unset (run by hand, in tests, in a container), so the
agent calls these unconditionally.

The watchdog is deliberately *not* a background thread: `Watchdog.tick()` is called by the main loop
each iteration and pings only when due. If the main loop wedges, pings stop and systemd restarts us;
a helper thread would keep pinging a dead agent alive.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier", "Watchdog", "watchdog_interval"]


def _socket_address(raw: str) -> str | bytes:
    # "@name" means the Linux abstract namespace: the kernel wants a leading NUL byte instead.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


class Notifier:
    def __init__(self, socket_path: str | None = None):
        self.address = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *assignments: str) -> bool:
        """Send 'KEY=value' lines as one datagram; True if sent. Failures are swallowed: a missing
        supervisor must never take the agent down."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), _socket_address(self.address))
            return True
        except OSError:
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        # A newline would start a new assignment and could inject e.g. READY=1.
        return self.notify("STATUS=" + text.replace("\n", " "))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        # Since systemd 253 Type=notify-reload requires MONOTONIC_USEC alongside RELOADING=1;
        # older versions ignore it. CLOCK_MONOTONIC is what systemd compares against.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env=None) -> float | None:
    """Seconds between pings (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or None
    when the watchdog is off or $WATCHDOG_PID names another process (a child must not ping for us)."""
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Watchdog:
    """Pings at most every `interval` seconds, and only from `tick()`, i.e. from the main loop.

    `interval=None` reads $WATCHDOG_USEC; when the watchdog is off, tick() does nothing.
    The main loop should block for at most `interval` (see `max_sleep()`), or pings will be late.
    """

    def __init__(self, notifier: Notifier | None = None, interval: float | None = None, clock=time.monotonic):
        self.notifier = notifier or Notifier()
        self.interval = watchdog_interval() if interval is None else interval
        self._clock = clock
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.interval) and self.notifier.enabled

    def tick(self) -> bool:
        """Call once per main-loop iteration; returns True when a ping was sent."""
        if not self.enabled:
            return False
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return self.notifier.watchdog()

    def max_sleep(self, default: float = 1.0) -> float:
        """How long the main loop may block waiting for work without missing a ping."""
        return min(default, self.interval) if self.enabled else default
