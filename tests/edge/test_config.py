"""agent.yaml validation: unknown keys are named with their path, bad types are refused, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent.config import config_from_dict, load_config
from edge_agent.errors import ConfigError

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
