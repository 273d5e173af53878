"""Run a real mosquitto broker for a test.

    with start_mosquitto(tmp_path) as broker:          # anonymous, plain TCP on 127.0.0.1:broker.port
        ...
        broker.restart()                                 # same port, same persistence file

`extra_conf` is appended after `listener PORT 127.0.0.1`, so listener options (cafile, certfile, ...)
apply to that listener. Unless `extra_conf` says otherwise, `allow_anonymous true` is added, because
mosquitto 2 refuses anonymous clients by default once a listener is configured.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if not path:
        raise RuntimeError("mosquitto binary not found on PATH or in /usr/sbin")
    return path


def find_mosquitto_passwd() -> str:
    path = shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd") if os.path.exists(p)), None
    )
    if not path:
        raise RuntimeError("mosquitto_passwd not found on PATH, /usr/bin or /usr/sbin")
    return path


def free_port() -> int:
    # Small race (the port could be taken between close and bind); acceptable for tests.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_password_file(path: str | os.PathLike, users: dict[str, str]) -> Path:
    """Create a mosquitto password file with `mosquitto_passwd -b` (hashes the way the broker expects)."""
    path = Path(path)
    tool = find_mosquitto_passwd()
    for i, (user, password) in enumerate(users.items()):
        args = [tool, "-b"] + (["-c"] if i == 0 else []) + [str(path), user, password]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    return path


class MosquittoProc:
    def __init__(self, workdir: Path, extra_conf: str = "", port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.host = HOST
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.conf_path.write_text(self._conf(extra_conf))
        self.proc: subprocess.Popen | None = None

    def _conf(self, extra_conf: str) -> str:
        lines = [
            # When the tests run as root, mosquitto would otherwise drop to user "mosquitto",
            # which cannot read the 0600 keys or write persistence in tmp.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "persistence_file mosquitto.db",
            "log_dest stderr",
            "log_type all",
            f"listener {self.port} {HOST}",
        ]
        if "autosave_" not in extra_conf:
            # Saved every second too, so sessions survive even kill() (SIGKILL), not only stop().
            # (An extra_conf with its own autosave_* lines, e.g. the shipped durability settings, wins.)
            lines.append("autosave_interval 1")
        if "allow_anonymous" not in extra_conf:
            lines.append("allow_anonymous true")
        return "\n".join(lines) + "\n" + extra_conf.strip() + "\n"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "MosquittoProc":
        if self.running:
            return self
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.conf_path)], stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {HOST}:{self.port} within {timeout}s:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Clean shutdown (SIGTERM): mosquitto writes its persistence file."""
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        """Crash (SIGKILL): only what autosave already wrote survives."""
        if self.running:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout: float = 10.0) -> "MosquittoProc":
        self.stop()
        return self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "MosquittoProc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        # Last resort so a failing test does not leak a broker process.
        try:
            self.kill()
        except Exception:
            pass


def start_mosquitto(tmp_path, extra_conf: str = "", port: int | None = None) -> MosquittoProc:
    """Start a broker on 127.0.0.1 (free port unless `port`), wait until it listens, return it."""
    workdir = Path(tempfile.mkdtemp(prefix="mosquitto-", dir=str(tmp_path)))
    return MosquittoProc(workdir, extra_conf, port).start()
