"""agent.yaml validation: unknown keys are named with their path, bad types are refused, exit code 2."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.config import config_from_dict, load_config
from edge_agent.errors import ConfigError
from conftest import write_config  # at import time: at run time 'conftest' may be another folder's

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {"topic_prefix": "factory/l1/d1", "state_dir": "state", "bundle": {"dir": "bundle", "allow_unsigned": True}}


def _with(**changes):
    import copy

    d = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        node = d
        *parts, last = key.split("__")
        for part in parts:
            node = node.setdefault(part, {})
        node[last] = value
    return d


def test_minimal_config_gets_defaults(tmp_path):
    cfg = config_from_dict(MINIMAL, base_dir=tmp_path)
    assert cfg.broker.port == 1883 and cfg.broker.protocol == "5"
    assert cfg.state_dir == str(tmp_path / "state")  # relative to the config file's directory
    assert cfg.topic("samples") == "factory/l1/d1/samples"


def test_example_config_is_valid():
    cfg = load_config(REPO / "configs" / "agent.example.yaml")
    assert cfg.bundle.allow_unsigned is False and cfg.bundle.public_key


@pytest.mark.parametrize("data, fragment", [
    (_with(brokr={}), "unknown key 'brokr'"),
    (_with(broker__tls__cafile="x"), "unknown key 'broker.tls.cafile'"),
    (_with(adaptation__every=3), "unknown key 'adaptation.every'"),
    (_with(broker__port="1883"), "broker.port: expected int, got str"),
    (_with(broker__port=True), "broker.port: expected int, got bool"),
    (_with(broker__port=70000), "broker.port: must be 1..65535"),
    (_with(broker__keepalive=1.5), "broker.keepalive: expected int"),
    (_with(broker__protocol="4"), "broker.protocol: must be one of"),
    (_with(bundle__allow_unsigned="yes"), "bundle.allow_unsigned: expected bool"),
    (_with(bundle__allow_unsigned=False), "bundle.public_key: required"),
    (_with(broker__password="a", broker__password_file="f"), "broker.password_file"),
    (_with(broker__tls={"cert": "c.pem"}), "broker.tls: cert and key go together"),
    (_with(adaptation__min_labels=0), "adaptation.min_labels"),
    (_with(limits__queue_size=100000), "limits.queue_size"),
    (_with(log_level="verbose"), "log_level: must be one of"),
    (_with(topic_prefix="factory/#"), "topic_prefix"),
    (_with(broker=[1, 2]), "broker: expected a mapping, got list"),
    ({"state_dir": "s", "bundle": {"dir": "b", "allow_unsigned": True}}, "topic_prefix: required"),
])
def test_invalid_configs_are_named(data, fragment):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert fragment in str(e.value)


def test_protocol_accepts_yaml_number():
    assert config_from_dict(_with(broker__protocol=5)).broker.protocol == "5"
    assert config_from_dict(_with(broker__protocol="3.1.1")).broker.protocol == "3.1.1"


@pytest.mark.parametrize("cmd", ["check-config", "run"])
def test_cli_exit_code_2_names_the_key(tmp_path, cmd):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(_with(broker__tls__cafile="ca.pem")))
    r = subprocess.run([sys.executable, "-m", "edge_agent", cmd, "--config", str(path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2, r
    assert "broker.tls.cafile" in r.stderr and r.stderr.startswith("<3>")


def test_cli_missing_and_malformed_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("broker: [unclosed\n")
    for path in (tmp_path / "missing.yaml", bad):
        r = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--config", str(path)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 2, r


# -- secrets never appear in an error (issue 12, item 3) ---------------------------------------------
SECRET = "hunter2-Zq81x"
SECRET_INT = 73519864


@pytest.mark.parametrize("value", [SECRET_INT, 7351.9864, [SECRET], {SECRET: 1}, True])
def test_wrong_typed_password_is_not_echoed(value):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_with(broker__password=value))
    msg = str(e.value)
    assert msg.startswith("broker.password: expected str")
    for shown in (str(SECRET_INT), "7351", SECRET, "True"):
        assert shown not in msg, msg


@pytest.mark.parametrize("yaml_text", [
    f'broker:\n  password: "{SECRET}\n  port: 1883\n',              # unclosed quote
    f"broker:\n  password: {SECRET}: x\n",                          # mapping value where none may be
    f"broker:\n  password: {SECRET}\n   host: h\n",                 # bad indentation after the password
    f"broker:\n\tpassword: {SECRET}\n",                              # a tab
    f"broker: {{password: {SECRET}\n",                               # unclosed flow mapping
])
def test_yaml_errors_show_position_not_source_lines(tmp_path, yaml_text):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert SECRET not in msg and "\n" not in msg, msg
    assert re.search(r"not valid YAML at line \d+, column \d+", msg), msg


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edge_agent", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env=env)


@pytest.mark.parametrize("contents", [
    SECRET.encode() + b"\xff\xfe",               # not UTF-8: the decode error would quote these bytes
    (SECRET + "\n" + SECRET + "\n").encode(),    # two lines
])
def test_password_file_contents_are_not_echoed(tmp_path, contents):
    from edge_agent.credentials import read_password_file

    pw = tmp_path / "mqtt_password"
    pw.write_bytes(contents)
    with pytest.raises(ConfigError) as e:
        read_password_file(str(pw))
    assert SECRET not in str(e.value) and "\\x" not in str(e.value) and str(pw) in str(e.value)
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)  # no chain quoting it


def _tls_config(tmp_path, **tls):
    from tests.support.certs import make_tls_files

    files = make_tls_files(tmp_path / "tls", client_names=["dev1"])
    cert, key = files.clients["dev1"]
    t = {"ca": str(files.ca_cert), "cert": str(cert), "key": str(key)}
    t.update(tls)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(_with(broker__tls=t, broker__port=1)))
    return path


def test_tls_key_contents_are_not_echoed(tmp_path):
    from edge_agent.transport import MqttTransport

    bad_key = tmp_path / "client.key"
    bad_key.write_text(f"-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----\n")
    cfg = load_config(_tls_config(tmp_path, key=str(bad_key)))
    with pytest.raises(ConfigError) as e:
        MqttTransport(cfg, lambda *a: None, lambda: b"", lambda: b"")
    assert SECRET not in str(e.value) and str(bad_key) in str(e.value), str(e.value)


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_missing_tls_file_is_named(tmp_path, which):
    from edge_agent.transport import MqttTransport

    missing = tmp_path / f"missing-{which}.pem"
    cfg = load_config(_tls_config(tmp_path, **{which: str(missing)}))
    with pytest.raises(ConfigError) as e:
        MqttTransport(cfg, lambda *a: None, lambda: b"", lambda: b"")
    assert f"broker.tls.{which}" in str(e.value) and str(missing) in str(e.value), str(e.value)


@pytest.mark.parametrize("yaml_text", [
    f"broker:\n  password: {SECRET_INT}\n",
    f'broker:\n  password: "{SECRET}\n',
])
def test_cli_config_error_has_no_secret(tmp_path, yaml_text):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml_text)
    r = _cli("check-config", "--config", path)
    assert r.returncode == 2, r
    assert SECRET not in r.stderr and str(SECRET_INT) not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("<3>"), r.stderr  # one event, one line


def test_refused_reload_publishes_no_secret(tmp_path, broker, bundle, line, agent_factory):

    cfg = write_config(tmp_path, broker, bundle)
    agent = agent_factory(cfg).start(line)
    good = yaml.safe_load(cfg.read_text())
    bad = [dict(good, broker=dict(good["broker"], password=SECRET_INT)),   # wrong type
           None]                                                          # YAML error on the password line
    for i, data in enumerate(bad):
        if data is None:
            cfg.write_text(yaml.safe_dump(good) + f'extra:\n  password: "{SECRET}\n')
        else:
            cfg.write_text(yaml.safe_dump(data))
        agent.proc.send_signal(signal.SIGHUP)
        assert line.wait_for(lambda: len([e for e in line.errors if e.get("reason") == "config_invalid"]) > i, 15), \
            agent.log()
    published = json.dumps(line.errors)
    assert SECRET not in published and str(SECRET_INT) not in published, published
    assert SECRET not in agent.log() and str(SECRET_INT) not in agent.log()
    assert agent.proc.poll() is None
    assert agent.terminate() == 0


# -- check-config reads files the way the service will (issue 12, item 14) -------------------------------
@pytest.fixture
def open_dir():
    """A directory every user may traverse (pytest's tmp dirs are 0700, which no DynamicUser could)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="edge-sec-preflight-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _deployment(d: Path, bundle, password_mode=0o644, password_in_config="secrets/mqtt_password"):
    """/etc/edge-agent-like layout under d: agent.yaml, bundle/, secrets/mqtt_password."""
    import shutil

    shutil.copytree(bundle.path, d / "bundle")
    for p in [d / "bundle", *(d / "bundle").iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (d / "secrets").mkdir(mode=0o755)
    pw = d / "secrets" / "mqtt_password"
    pw.write_text(SECRET + "\n")
    pw.chmod(password_mode)
    cfg = d / "agent.yaml"
    cfg.write_text(yaml.safe_dump(_with(bundle={"dir": "bundle", "allow_unsigned": True},
                                        broker__username="dev1", broker__password_file=password_in_config)))
    cfg.chmod(0o644)
    return cfg, pw


def test_check_config_accepts_world_readable_files(open_dir, bundle):
    cfg, _ = _deployment(open_dir, bundle)
    r = _cli("check-config", "--config", cfg)
    assert r.returncode == 0 and "OK" in r.stdout and "DynamicUser" in r.stdout, r.stdout + r.stderr


def test_check_config_refuses_a_0600_secret_the_dynamic_user_cannot_read(open_dir, bundle):
    """The issue: credentials as 0600 files made the service exit 2 under DynamicUser while
    check-config said OK. It now names the file and says how to hand it over."""
    cfg, pw = _deployment(open_dir, bundle, password_mode=0o600)
    r = _cli("check-config", "--config", cfg)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "broker.password_file" in r.stderr and str(pw) in r.stderr and "0600" in r.stderr, r.stderr
    assert "LoadCredential=" in r.stderr and SECRET not in r.stderr
    # as the account that owns it, the same file is fine
    r = _cli("check-config", "--config", cfg, "--service-user", "current")
    assert r.returncode == 0, r.stderr


def test_check_config_refuses_an_unreadable_directory_on_the_way(open_dir, bundle):
    cfg, _ = _deployment(open_dir, bundle)
    (open_dir / "bundle").chmod(0o700)
    r = _cli("check-config", "--config", cfg)
    assert r.returncode == 2 and "bundle.dir" in r.stderr and str(open_dir / "bundle") in r.stderr, r.stderr


def test_check_config_names_a_missing_file(open_dir, bundle):
    cfg, pw = _deployment(open_dir, bundle)
    pw.unlink()
    r = _cli("check-config", "--config", cfg)
    assert r.returncode == 2 and "broker.password_file" in r.stderr and str(pw) in r.stderr, r.stderr


def test_credentials_directory_paths(open_dir, bundle, tmp_path):
    """broker.password_file: $CREDENTIALS_DIRECTORY/mqtt_password, as with LoadCredential=."""
    cfg, pw = _deployment(open_dir, bundle, password_mode=0o600,
                          password_in_config="$CREDENTIALS_DIRECTORY/mqtt_password")
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    r = _cli("check-config", "--config", cfg, env=env)
    assert r.returncode == 2 and "CREDENTIALS_DIRECTORY is not set" in r.stderr, r.stderr
    # outside the service: point at the LoadCredential= sources (systemd reads them as root)
    r = _cli("check-config", "--config", cfg, "--credentials-dir", open_dir / "secrets", env=env)
    assert r.returncode == 0, r.stderr
    # inside the service: systemd sets the variable
    r = _cli("check-config", "--config", cfg, env=dict(env, CREDENTIALS_DIRECTORY=str(open_dir / "secrets")))
    assert r.returncode == 0, r.stderr
    loaded = load_config(cfg, credentials_dir=str(open_dir / "secrets"))
    assert loaded.broker.password_file == str(pw)
    with pytest.raises(ConfigError, match=r"state_dir: \$CREDENTIALS_DIRECTORY is only for"):
        config_from_dict(_with(state_dir="$CREDENTIALS_DIRECTORY/x"), base_dir=tmp_path, credentials_dir="/c")


def test_agent_reads_its_password_from_the_credentials_directory(tmp_path, bundle, agent_factory):
    from edge_agent.simulator import LineClient
    from tests.support.mosquitto import start_mosquitto, write_password_file

    passwd = write_password_file(tmp_path / "passwd", {"dev1": SECRET, "operator": "op"})
    acl = tmp_path / "acl"
    acl.write_text("user dev1\ntopic readwrite factory/#\nuser operator\ntopic readwrite factory/#\n")
    b = start_mosquitto(tmp_path, extra_conf=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt_password").write_text(SECRET + "\n")
    cfg = write_config(tmp_path, b, bundle, **{"broker.username": "dev1",
                                                "broker.password_file": "$CREDENTIALS_DIRECTORY/mqtt_password"})
    line = LineClient(b.host, b.port, "factory/line1/dev1", username="operator", password="op")
    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)  # inherited by the agent process, as systemd sets it
    try:
        agent = agent_factory(cfg).start(line)
        line.sample("c1", bundle.x[0])
        assert line.wait_predictions(["c1"], 15), agent.log()
        assert agent.terminate() == 0
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]
        line.close()
        b.kill()
