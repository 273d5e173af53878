"""Hot reload against a real agent process and a real mosquitto: bundles announced on the command topic
or dropped into bundle.watch_dir are verified (signature + hashes) and test-loaded before they replace
the running model; failures leave the old model serving and are reported on the errors topic; rollback
goes back; after a restart the agent runs the last activated bundle; every prediction names its model;
SIGHUP re-reads the config (an invalid one is refused and reported)."""

import json
import re
import signal
import time

import numpy as np
import yaml

from conftest import wait_until, write_config
from signed_bundles import BundleSet, drop, key, version

X = np.array([200.0, 5.0, 1200.0, 0.3], np.float32)


def _online_versions(line):
    return [s.get("model_version") for s in line.status if s.get("status") == "online"]


def _errors(line, reason):
    return [e for e in line.errors if e["reason"] == reason]


class Probe:
    def __init__(self, line):
        self.line, self.n = line, 0

    def __call__(self, timeout=15):
        self.n += 1
        sid = f"probe-{self.n}"
        self.line.sample(sid, X)
        assert self.line.wait_predictions([sid], timeout), f"no prediction for {sid}"
        return self.line.predictions[sid][0]


def _adapt(line, n=5, prefix="lab"):
    rng = np.random.default_rng(0)
    for i in range(n):
        line.sample(f"{prefix}-{i}", X + rng.normal(0, 1, 4).astype(np.float32), label=float(5 + i))


def test_command_load_rollback_and_restart(tmp_path, broker, line, agent_factory):
    bs = BundleSet(tmp_path / "b")
    a, b = bs.signed("a", 0.1), bs.signed("b", 0.2)
    unsigned, bad_file, bad_manifest = bs.unsigned("u", 0.3), bs.tampered_file("t1", 0.4), bs.tampered_manifest("t2", 0.5)
    incompatible = bs.incompatible("f3")
    va, vb = version(a), version(b)

    class Info:
        path = a

    cfg = write_config(tmp_path, broker, Info, **{"bundle.allow_unsigned": False, "bundle.public_key": str(bs.pub)})
    agent = agent_factory(cfg).start(line)
    probe = Probe(line)
    _adapt(line)
    p = probe()
    assert p["model_version"] == va and p["adapted"] and p["n_support"] == 5

    # refused: unsigned (no allow_unsigned), a tampered file, a tampered manifest, another protocol, nonsense
    for i, path in enumerate([unsigned, bad_file, bad_manifest, incompatible, tmp_path / "nowhere"]):
        line.publish("commands", {"command": "load_bundle", "path": str(path), "id": f"bad-{i}"})
    line.publish("commands", {"command": "explode"})
    line.publish("commands", b"{not json")
    assert line.wait_for(lambda: len(_errors(line, "bundle_refused")) >= 5, 20), line.errors
    refused = {e["id"]: e["message"] for e in _errors(line, "bundle_refused")}
    assert "manifest.sig" in refused["bad-0"]
    assert "init_state.npy" in refused["bad-1"] and "sha256" in refused["bad-1"]
    assert "signature invalid" in refused["bad-2"]
    assert "feature_names" in refused["bad-3"] or "input_shape" in refused["bad-3"]
    assert all(e["topic"] == "commands" for e in _errors(line, "bundle_refused"))
    assert line.wait_for(lambda: _errors(line, "bad_command") and _errors(line, "bad_json"), 10), line.errors
    p = probe()
    assert p["model_version"] == va and p["adapted"], "a refused bundle must leave the old model serving"

    # accepted: installed in the state dir, adapted states re-derived for it
    line.publish("commands", {"command": "load_bundle", "path": str(b), "id": "load-b"})
    assert line.wait_for(lambda: vb in _online_versions(line), 15), agent.log()
    p = probe()
    assert p["model_version"] == vb and p["adapted"] and p["n_support"] == 5
    assert (tmp_path / "state" / "bundles" / key(b) / "manifest.sig").exists()
    # a redelivered command is not carried out twice
    line.publish("commands", {"command": "load_bundle", "path": str(b), "id": "load-b"})

    # restart: back on the last activated bundle (not the configured one), still adapted
    assert agent.terminate() == 0, agent.log()
    agent = agent_factory(cfg).start(line)
    assert _online_versions(line)[-1] == vb
    p = probe()
    assert p["model_version"] == vb and p["adapted"] and p["n_support"] == 5

    line.publish("commands", {"command": "rollback", "id": "rb-1"})
    assert line.wait_for(lambda: _online_versions(line)[-1] == va, 15), agent.log()
    p = probe()
    assert p["model_version"] == va and p["adapted"]
    line.publish("commands", {"command": "rollback", "id": "rb-2"})
    assert line.wait_for(lambda: _errors(line, "rollback_unavailable"), 10), line.errors
    assert probe()["model_version"] == va

    # rollback survives a SIGKILL too
    agent.kill()
    agent = agent_factory(cfg).start(line)
    assert probe()["model_version"] == va
    assert agent.terminate() == 0
    # every prediction named the model that made it
    assert all(ps[0]["model_version"] in (va, vb) for ps in line.predictions.values())


def test_watch_dir_sighup_and_log_priorities(tmp_path, broker, line, agent_factory):
    bs = BundleSet(tmp_path / "b")
    a, b, c = bs.signed("a", 0.1), bs.signed("b", 0.2), bs.signed("c", 0.05)
    unsigned = bs.unsigned("u", 0.3)
    va, vb, vc = version(a), version(b), version(c)
    watch = tmp_path / "incoming"
    watch.mkdir()

    class Info:
        path = a

    cfg = write_config(tmp_path, broker, Info, **{"bundle.allow_unsigned": False, "bundle.public_key": str(bs.pub),
                                                  "bundle.watch_dir": str(watch), "bundle.watch_interval": 0.2})
    agent = agent_factory(cfg).start(line)
    probe = Probe(line)
    _adapt(line)
    assert probe()["model_version"] == va

    drop(unsigned, watch, "release-1")
    assert line.wait_for(lambda: _errors(line, "bundle_refused"), 15), agent.log()
    assert _errors(line, "bundle_refused")[0]["topic"] == "watch"
    assert probe()["model_version"] == va
    drop(b, watch, "release-2")
    assert line.wait_for(lambda: vb in _online_versions(line), 15), agent.log()
    p = probe()
    assert p["model_version"] == vb and p["adapted"]

    # SIGHUP with an invalid config: refused, reported, the agent keeps running on the old one
    good = cfg.read_text()
    cfg.write_text(good + "\nbogus_key: 1\n")
    agent.proc.send_signal(signal.SIGHUP)
    assert line.wait_for(lambda: _errors(line, "config_invalid"), 10), agent.log()
    assert "bogus_key" in _errors(line, "config_invalid")[0]["message"]
    assert agent.proc.poll() is None and probe()["model_version"] == vb

    # SIGHUP with a valid config naming another bundle: that one is activated
    d = yaml.safe_load(good)
    d["bundle"]["dir"] = str(c)
    cfg.write_text(yaml.safe_dump(d))
    agent.proc.send_signal(signal.SIGHUP)
    assert line.wait_for(lambda: vc in _online_versions(line), 15), agent.log()
    assert probe()["model_version"] == vc
    # SIGHUP again without changes: nothing changes (the watch dir's bundles were handled once)
    agent.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert probe()["model_version"] == vc
    assert agent.terminate() == 0

    log = agent.log()
    lines = [ln for ln in log.splitlines() if ln]
    assert lines and all(re.match(r"^<[0-7]>", ln) for ln in lines), [ln for ln in lines if not re.match(r"^<[0-7]>", ln)]
    assert re.search(r"^<3>.*reload refused", log, re.M)  # error priority for the refused config
    assert re.search(r"^<3>.*refused", log, re.M)
    assert re.search(r"^<6>.*configuration reloaded", log, re.M)


def test_allow_unsigned_applies_to_hot_reload(tmp_path, broker, bundle, line, agent_factory):
    """With bundle.allow_unsigned (development), an unsigned bundle hot-loads; the hashes still count."""
    bs = BundleSet(tmp_path / "b")
    u, bad = bs.unsigned("u", 0.3), bs.tampered_file("t", 0.4)
    cfg = write_config(tmp_path, broker, bundle)  # unsigned linear bundle, allow_unsigned: true
    agent = agent_factory(cfg).start(line)
    line.publish("commands", {"command": "load_bundle", "path": str(bad)})
    line.publish("commands", {"command": "load_bundle", "path": str(u)})
    assert line.wait_for(lambda: version(u) in _online_versions(line), 15), agent.log()
    assert [e["reason"] for e in line.errors] == ["bundle_refused"]
    assert Probe(line)()["model_version"] == version(u)
    assert agent.terminate() == 0
    assert wait_until(lambda: json.loads((tmp_path / "state" / "bundles" / "active.json").read_text())["active"]
                      == key(u), 2)


def test_refused_bundle_does_not_block_a_valid_one_with_the_same_model_files(tmp_path, broker, line, agent_factory):
    """Issue 12 item 5: installed bundles are keyed by their signed manifest, and a refused install is
    not kept: a valid bundle with the same model files (same model_version) as a refused one activates,
    in the same run and after a restart."""
    bs = BundleSet(tmp_path / "b")
    a, b, c = bs.signed("a", 0.1), bs.signed("b", 0.2), bs.signed("c", 0.05)
    names = json.loads((b / "manifest.json").read_text())["feature_names"]
    renamed = [n + "_x" for n in names]  # signed, but the line's payloads would change: refused after install
    b_bad, c_bad = bs.same_model(b, "b_bad", feature_names=renamed), bs.same_model(c, "c_bad", feature_names=renamed)
    assert version(b_bad) == version(b) and key(b_bad) != key(b)

    class Info:
        path = a

    cfg = write_config(tmp_path, broker, Info, **{"bundle.allow_unsigned": False, "bundle.public_key": str(bs.pub)})
    agent = agent_factory(cfg).start(line)
    probe = Probe(line)
    installed = tmp_path / "state" / "bundles"

    line.publish("commands", {"command": "load_bundle", "path": str(b_bad), "id": "bad-b"})
    assert line.wait_for(lambda: _errors(line, "bundle_refused"), 15), agent.log()
    assert "feature_names" in _errors(line, "bundle_refused")[0]["message"]
    assert not (installed / key(b_bad)).exists(), "a refused install must not be kept"
    line.publish("commands", {"command": "load_bundle", "path": str(b), "id": "good-b"})
    assert line.wait_for(lambda: version(b) in _online_versions(line), 15), (agent.log(), line.errors)
    assert probe()["model_version"] == version(b)

    line.publish("commands", {"command": "load_bundle", "path": str(c_bad), "id": "bad-c"})
    assert line.wait_for(lambda: len(_errors(line, "bundle_refused")) == 2, 15), agent.log()
    assert agent.terminate() == 0
    agent = agent_factory(cfg).start(line)
    line.publish("commands", {"command": "load_bundle", "path": str(c), "id": "good-c"})
    assert line.wait_for(lambda: _online_versions(line)[-1] == version(c), 15), (agent.log(), line.errors)
    assert probe()["model_version"] == version(c)
    assert agent.terminate() == 0
    assert sorted(p.name for p in installed.iterdir() if p.is_dir()) == sorted([key(a), key(b), key(c)])


def test_refused_sighup_bundle_is_not_applied_and_restart_falls_back(tmp_path, broker, line, agent_factory):
    """Issue 12 item 6: a SIGHUP naming a refused bundle keeps the running configuration; a start with a
    refused configured bundle serves the last activated one (reported on `errors`) instead of exiting 3."""
    bs = BundleSet(tmp_path / "b")
    a, b, bad = bs.signed("a", 0.1), bs.signed("b", 0.2), bs.tampered_file("t", 0.4)

    class Info:
        path = a

    cfg = write_config(tmp_path, broker, Info, **{"bundle.allow_unsigned": False, "bundle.public_key": str(bs.pub)})
    good = yaml.safe_load(cfg.read_text())
    agent = agent_factory(cfg).start(line)
    probe = Probe(line)
    _adapt(line)
    assert probe()["n_support"] == 5

    # the refused reload also shrinks K: had the config been applied, the support set would shrink to 2
    d = yaml.safe_load(cfg.read_text())
    d["bundle"]["dir"] = str(bad)
    d["adaptation"]["support_size"] = 2
    cfg.write_text(yaml.safe_dump(d))
    agent.proc.send_signal(signal.SIGHUP)
    assert line.wait_for(lambda: _errors(line, "bundle_refused"), 15), agent.log()
    e = _errors(line, "bundle_refused")[0]
    assert e["topic"] == "config" and "keeping the running configuration" in e["message"]
    _adapt(line, 1, prefix="more")
    p = probe()
    assert p["model_version"] == version(a) and p["n_support"] == 6, p

    # restart with the refused bundle still configured: the last activated bundle serves, loudly
    assert agent.terminate() == 0
    mark = len(line.errors)
    agent = agent_factory(cfg).start(line)
    assert line.wait_for(lambda: any(e["reason"] == "bundle_refused" for e in line.errors[mark:]), 10), agent.log()
    e = [e for e in line.errors[mark:] if e["reason"] == "bundle_refused"][0]
    assert e["topic"] == "config" and "serving the last activated bundle" in e["message"] and str(bad) in e["message"]
    p = probe()
    assert p["model_version"] == version(a) and p["adapted"]
    assert re.search(r"^<3>.*configured bundle .* refused", agent.log(), re.M)

    # the operator fixes the config: SIGHUP activates it
    good["bundle"]["dir"] = str(b)
    cfg.write_text(yaml.safe_dump(good))
    agent.proc.send_signal(signal.SIGHUP)
    assert line.wait_for(lambda: _online_versions(line)[-1] == version(b), 15), agent.log()
    assert probe()["model_version"] == version(b)
    assert agent.terminate() == 0
