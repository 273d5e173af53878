"""Why the agent cannot reach its broker, said once at warning; paho's retry noise demoted; every
log event one line with its priority prefix (issue 12, items 11 and 12). Real agent processes,
real mosquitto with TLS."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, write_config
from tests.support.certs import make_tls_files
from tests.support.mosquitto import free_port, start_mosquitto


def _run_until_timeout(cfg) -> subprocess.CompletedProcess:
    """The agent with connect_timeout 5 s and a 1 s retry: about four attempts, then exit 5."""
    return subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=str(REPO), timeout=90)


def _tls_broker(tmp_path, tls):
    conf = f"cafile {tls.ca_cert}\ncertfile {tls.server_cert}\nkeyfile {tls.server_key}\n"
    return start_mosquitto(tmp_path, extra_conf=conf)


def _config(tmp_path, port, bundle, tls_ca=None):
    class B:  # write_config reads host/port only
        host, port_ = "127.0.0.1", port
    B.port = port
    over = {"broker.connect_timeout": 5, "broker.reconnect_min_delay": 1, "broker.reconnect_max_delay": 1}
    if tls_ca:
        over["broker.tls"] = {"ca": str(tls_ca)}
    return write_config(tmp_path, B, bundle, **over)


def _check_log(r, cause_pattern):
    out = r.stdout
    assert r.returncode == 5, out + r.stderr
    lines = [ln for ln in out.splitlines() if ln]
    assert all(re.match(r"^<[0-7]>", ln) for ln in lines), out
    causes = [ln for ln in lines if "cannot connect to the broker" in ln]
    assert len(causes) == 1, out  # once, although both connections retried several times
    assert causes[0].startswith("<4>") and re.search(cause_pattern, causes[0]), causes[0]
    assert not [ln for ln in lines if "Client is not connected" in ln], out
    assert not [ln for ln in lines if ln.startswith("<3>")], out  # nothing at error: the cause is the report


@pytest.fixture
def tls_files(tmp_path):
    return make_tls_files(tmp_path / "tls")


def test_untrusted_ca_is_named_once(tmp_path, bundle, tls_files):
    other = make_tls_files(tmp_path / "other")
    b = _tls_broker(tmp_path, tls_files)
    try:
        r = _run_until_timeout(_config(tmp_path, b.port, bundle, tls_ca=other.ca_cert))
    finally:
        b.kill()
    _check_log(r, r"not trusted.*broker\.tls\.ca")


def test_wrong_hostname_is_named_once(tmp_path, bundle):
    tls = make_tls_files(tmp_path / "tls", hosts=("broker.elsewhere",), server_cn="broker.elsewhere")
    b = _tls_broker(tmp_path, tls)
    try:
        r = _run_until_timeout(_config(tmp_path, b.port, bundle, tls_ca=tls.ca_cert))
    finally:
        b.kill()
    _check_log(r, r"does not match the host name.*broker\.host")


def test_refused_is_named_once(tmp_path, bundle):
    r = _run_until_timeout(_config(tmp_path, free_port(), bundle))
    _check_log(r, r"connection refused")


def test_broker_refusing_the_password_is_named_once(tmp_path, bundle):
    from tests.support.mosquitto import write_password_file

    pw = write_password_file(tmp_path / "passwd", {"dev1": "right"})
    b = start_mosquitto(tmp_path, extra_conf=f"allow_anonymous false\npassword_file {pw}\n")
    try:
        cfg = _config(tmp_path, b.port, bundle)
        import yaml

        d = yaml.safe_load(cfg.read_text())
        d["broker"].update(username="dev1", password="wrong")
        cfg.write_text(yaml.safe_dump(d))
        r = _run_until_timeout(cfg)
    finally:
        b.kill()
    _check_log(r, r"refused the (outbound )?connection: (Not authorized|Bad user name or password)")


def test_a_multiline_message_is_one_prefixed_line():
    code = ("import logging; from edge_agent.cli import setup_logging; setup_logging('info')\n"
            "log = logging.getLogger('t')\n"
            "log.warning('first\\nsecond')\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    log.exception('failed')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    assert lines[0].startswith("<4>") and lines[0].endswith("first\\nsecond")
    assert lines[1].startswith("<3>") and "ZeroDivisionError" in lines[1]


def test_config_error_on_stderr_is_one_prefixed_line(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("broker:\n  port: [1,\n")  # YAML error
    r = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--config", str(path)],
                       capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("<3>"), r.stderr
