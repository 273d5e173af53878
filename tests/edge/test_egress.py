"""What the agent process says to the network and to stderr (issue 12, item 1).

onnxruntime 1.32 resolves a Microsoft telemetry host as soon as it is imported, unless
ORT_DISABLE_TELEMETRY=1 is in the process environment before the import. On an OT network that DNS
query is a finding on its own, so the real agent runs here under `strace -f -e trace=network` and
every connect/sendto with an inet address must go to the broker. scripts/ensure_strace.sh installs
strace for CI; without it these tests skip with a loud reason instead of passing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_config

STRACE = shutil.which("strace")
HERE = Path(__file__).resolve().parent
# "connect(5, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.53")}, 16)"
_INET = re.compile(r"sa_family=AF_INET6?, sin6?_port=htons\((\d+)\).*?(?:inet_addr|inet_pton\(AF_INET6, )\(?\"([^\"]+)\"")


TELEMETRY_WAIT_S = 20.0


def _strace_works() -> str | None:
    if STRACE is None:
        return "strace not installed (scripts/ensure_strace.sh installs it; CI runs it)"
    r = subprocess.run([STRACE, "-f", "-e", "trace=network", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    return None if r.returncode == 0 else f"strace cannot trace here: {r.stderr.decode(errors='replace').strip()}"


def _skip_loudly(reason: str) -> None:
    print(f"\nSKIPPED (egress check NOT run): {reason}", file=sys.stderr)
    pytest.skip(f"egress check NOT run: {reason}")


def inet_peers(trace: str) -> list[tuple[str, int, str]]:
    """(address, port, line) of every connect/sendto/sendmsg with an AF_INET/AF_INET6 address."""
    out = []
    for line in trace.splitlines():
        if not re.search(r"\b(connect|sendto|sendmsg|sendmmsg)\(", line):
            continue
        for m in _INET.finditer(line):
            out.append((m.group(2), int(m.group(1)), line.strip()))
    return out


def own_loopback_ports(trace: str) -> set[int]:
    """Ports the traced processes bound themselves on 127.0.0.1 (as getsockname reports them)."""
    return {int(m.group(1)) for m in re.finditer(
        r"getsockname\(\d+, \{sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\(\"127\.0\.0\.1\"\)", trace)}


def _stop_traced(proc: subprocess.Popen) -> None:
    """SIGTERM the agent itself (strace would only detach), then wait for strace to see it exit."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        children = []
    for pid in children:
        os.kill(int(pid), signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_inet_peers_parser_sees_a_dns_query():
    # The parser must recognise what the issue saw (telemetry DNS), or the real test proves nothing.
    line = ('7307  connect(8, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0\n'
            '7308  connect(9, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
            'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH\n')
    assert [(a, p) for a, p, _ in inet_peers(line)] == [("10.255.255.53", 53), ("2001:db8::1", 443)]


def test_agent_talks_only_to_the_broker(tmp_path, broker, bundle, line):
    reason = _strace_works()
    if reason:
        _skip_loudly(reason)
    cfg = write_config(tmp_path, broker, bundle)
    trace = tmp_path / "strace.txt"
    log = open(tmp_path / "agent.log", "wb")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # the agent must set it itself
    started = time.monotonic()
    proc = subprocess.Popen([STRACE, "-f", "-e", "trace=network", "-o", str(trace),
                             sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    try:
        assert line.wait_for(lambda: any(s.get("status") == "online" for s in line.status), 60), \
            (tmp_path / "agent.log").read_text()
        for i in range(5):
            line.sample(f"s{i}", bundle.x[i])
        assert line.wait_for(lambda: len(line.predictions) >= 5, 20)
        # onnxruntime 1.32's first telemetry upload (DNS for mobile.events.data.microsoft.com) comes
        # about 9 s after its import; stay up well past that.
        time.sleep(max(0.0, started + TELEMETRY_WAIT_S - time.monotonic()))
    finally:
        _stop_traced(proc)
        log.close()
    text = trace.read_text(errors="replace")
    peers = inet_peers(text)
    assert peers, "strace saw no inet connect at all: the trace is not of the agent"
    own = own_loopback_ports(text)  # paho's wake-up socketpair: a loopback listener of its own
    others = [p for p in peers if (p[0], p[1]) != (broker.host, broker.port)
              and not (p[0] == "127.0.0.1" and p[1] in own)]
    assert others == [], "the agent contacted more than the broker:\n" + "\n".join(p[2] for p in others[:20])


FAKE_GPU = REPO / "tests" / "support" / "fake_gpu_sysfs.sh"


def _under_fake_gpu(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-m", "bash", str(FAKE_GPU)] + cmd, capture_output=True, cwd=str(REPO), **kw)


def test_onnxruntime_prints_nothing_on_stderr_at_agent_start(tmp_path, broker, bundle):
    # The setup must really make onnxruntime warn, or a silent agent proves nothing.
    if shutil.which("unshare") is None:
        _skip_loudly("unshare not installed")
    probe = _under_fake_gpu([sys.executable, "-c", "import onnxruntime"], timeout=60)
    if probe.returncode != 0:
        _skip_loudly(f"cannot fake a GPU in a mount namespace here: {probe.stderr.decode(errors='replace')[-300:]}")
    assert b"onnxruntime" in probe.stderr and b"\x1b[" in probe.stderr, probe.stderr

    # check-config stops before the bundle; `run` with a short life loads it (and onnxruntime).
    cfg = write_config(tmp_path, broker, bundle, **{"broker.connect_timeout": 3})
    code = ("import signal, sys, threading\n"
            "threading.Timer(4, lambda: signal.raise_signal(signal.SIGTERM)).start()\n"
            "from edge_agent.cli import main\n"
            f"sys.exit(main(['run', '--config', {str(cfg)!r}]))\n")
    r = _under_fake_gpu([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0, r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert b"online" in r.stdout or b"connected" in r.stdout, r.stdout  # it really started
    assert r.stderr == b"", r.stderr


def test_agent_package_forces_telemetry_off_for_every_entry_point():
    # `edge-agent verify`, the signature-check child and the exporter all import edge_agent first.
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="0")
    code = "import edge_agent, os, sys; import onnxruntime; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO), timeout=60)
    assert r.stdout.strip() == "1", r.stdout + r.stderr


def _unit_settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_unit_file_turns_telemetry_off_and_allows_only_the_broker():
    unit = _unit_settings(REPO / "deploy" / "systemd" / "edge-agent.service")
    assert "ORT_DISABLE_TELEMETRY=1" in unit["Environment"]
    assert unit["IPAddressDeny"] == ["any"]
    assert unit["IPAddressAllow"] == ["localhost"]
    dropin = _unit_settings(REPO / "deploy" / "systemd" / "edge-agent.service.d" / "broker.conf")
    assert list(dropin) == ["IPAddressAllow"]  # the drop-in adds the broker, nothing else



@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_and_broker_dropin_pass_systemd_analyze_verify(tmp_path):
    """systemd parses every line (a misspelt or invalid IPAddress* line is only a warning at boot and
    would leave the agent unfiltered). ExecStart points at /bin/true: the venv is not installed here."""
    unit = (REPO / "deploy" / "systemd" / "edge-agent.service").read_text()
    dropin = _unit_settings(REPO / "deploy" / "systemd" / "edge-agent.service.d" / "broker.conf")
    unit = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", unit, flags=re.M)
    # the drop-in's [Service] lines, merged the way systemd would
    merged = unit.replace("IPAddressAllow=localhost\n", "IPAddressAllow=localhost\n" + "".join(
        f"{k}={v}\n" for k, vs in dropin.items() for v in vs))
    assert merged != unit
    path = tmp_path / "edge-agent.service"
    path.write_text(merged)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and out == "", out
