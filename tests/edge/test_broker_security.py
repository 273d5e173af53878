"""The example broker config (deploy/mosquitto/) really enforces what it claims, on a real mosquitto:
TLS only, no anonymous, no wrong passwords, a device cannot touch another device's topics, cannot
publish its own commands, and cannot connect under another client's id (session takeover)."""

import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.support` without relying on how pytest was invoked
    sys.path.insert(0, str(REPO))

mqtt = pytest.importorskip("paho.mqtt.client")
from tests.support.certs import make_tls_files  # noqa: E402
from tests.support.mosquitto import find_mosquitto, start_mosquitto, write_password_file  # noqa: E402
from conftest import write_config  # at import time: at run time 'conftest' may be another folder's

try:
    find_mosquitto()
except RuntimeError as e:  # pragma: no cover - depends on the machine
    pytest.skip(str(e), allow_module_level=True)

EXAMPLES = REPO / "deploy" / "mosquitto"
USERS = {"press1": "pw-press1", "press1-out": "pw-press1", "press2": "pw-press2", "press2-out": "pw-press2",
         "operator": "pw-operator", "monitor": "pw-monitor"}
A_TOPIC = "factory/line1/press1"
B_TOPIC = "factory/line1/press2"

# Lines the test helper owns (it provides its own listener, persistence dir and logging).
_HELPER_KEYS = {"listener", "persistence", "persistence_location", "persistence_file", "autosave_interval",
                "log_dest", "log_type", "user", "pid_file"}


def derive_conf(example: str, paths: dict[str, Path]) -> str:
    """Keep every security setting of the example, point its files at tmp, drop what the helper sets."""
    out, seen = [], set()
    for line in example.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key = stripped.split()[0]
        seen.add(key)
        if key in _HELPER_KEYS:
            continue
        out.append(f"{key} {paths[key]}" if key in paths else stripped)
    missing = {"allow_anonymous", "password_file", "acl_file", "cafile", "certfile", "keyfile", "listener"} - seen
    assert not missing, f"example mosquitto.conf lost {missing}"
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"), client_names=["press1"])


def _acl(d: Path) -> Path:
    """The shipped ACL plus the blocks of press1 and press2, made the documented way."""
    blocks = [subprocess.run(["bash", str(EXAMPLES / "acl_device.sh"), "line1", dev], capture_output=True,
                             text=True, check=True, timeout=30).stdout for dev in ("press1", "press2")]
    path = d / "acl"
    path.write_text((EXAMPLES / "acl").read_text() + "".join(blocks))
    return path


def _broker_conf(d: Path, tls, overrides: str = "") -> str:
    paths = {
        "cafile": tls.ca_cert,
        "certfile": tls.server_cert,
        "keyfile": tls.server_key,
        "password_file": write_password_file(d / "passwd", USERS),
        "acl_file": _acl(d),
    }
    return derive_conf((EXAMPLES / "mosquitto.conf").read_text(), paths) + overrides


@pytest.fixture(scope="module")
def broker(tmp_path_factory, tls):
    d = tmp_path_factory.mktemp("broker")
    with start_mosquitto(d, _broker_conf(d, tls)) as b:
        yield b


class Client:
    """A paho 2 client that records connect result, SUBACK codes and received messages."""

    def __init__(self, port, user=None, password=None, ca=None, certfile=None, keyfile=None, use_tls=True,
                 client_id=None, persistent=False):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv5)
        self.persistent = persistent
        if use_tls:
            self.c.tls_set(ca_certs=str(ca), certfile=certfile and str(certfile),
                           keyfile=keyfile and str(keyfile), cert_reqs=ssl.CERT_REQUIRED)
        if user is not None:
            self.c.username_pw_set(user, password)
        self.connected = threading.Event()
        self.done = threading.Event()  # CONNACK received (good or bad) or connection dropped
        self.connect_rc = None
        self.suback: dict[int, list] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.c.on_connect = self._on_connect
        self.dropped = threading.Event()  # the broker closed an established connection
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.suback.__setitem__(mid, rcs)
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.port = port

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connect_rc = reason_code
        if not reason_code.is_failure:
            self.connected.set()
        self.done.set()

    def _on_disconnect(self, *a):
        if self.connected.is_set():
            self.dropped.set()
        self.done.set()

    def connect(self, timeout=5.0) -> bool:
        kw = {}
        if self.persistent:  # keep the session (subscriptions, queued QoS 1) while disconnected
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kw = {"clean_start": False, "properties": props}
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=30, **kw)
        except (OSError, ssl.SSLError):
            return False
        self.c.loop_start()
        self.done.wait(timeout)
        return self.connected.is_set()

    def subscribe(self, topic, timeout=5.0) -> list:
        _, mid = self.c.subscribe(topic, qos=1)
        deadline = time.monotonic() + timeout
        while mid not in self.suback and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.suback[mid]

    def publish(self, topic, payload=b"x"):
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()

    def reset(self):
        """Forget this connection's events, ready to connect again."""
        self.close()
        self.connected.clear(), self.done.clear(), self.dropped.clear()


@pytest.fixture
def clients(broker, tls):
    made = []

    def make(user=None, password=None, **kw):
        kw.setdefault("ca", tls.ca_cert)
        c = Client(broker.port, user, password, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _connected(make, user, **kw):
    c = make(user, USERS[user], **kw)
    assert c.connect(), f"{user} could not connect: {c.connect_rc}"
    return c


def _wait_for(pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_device_pubsub_own_topics_over_tls(clients):
    """The agent's two connections get what they need: inputs in, outputs out."""
    a = _connected(clients, "press1")
    a_out = _connected(clients, "press1-out")
    op = _connected(clients, "operator")
    assert not a.subscribe(f"{A_TOPIC}/samples")[0].is_failure
    assert not op.subscribe(f"{A_TOPIC}/#")[0].is_failure
    op.publish(f"{A_TOPIC}/samples", b"s1")
    assert _wait_for(lambda: (f"{A_TOPIC}/samples", b"s1") in a.messages)
    for topic in ("predictions", "alarms", "errors", "status"):
        a_out.publish(f"{A_TOPIC}/{topic}", b"42")
        assert _wait_for(lambda: (f"{A_TOPIC}/{topic}", b"42") in op.messages), topic
    a.publish(f"{A_TOPIC}/status", b"online")
    assert _wait_for(lambda: (f"{A_TOPIC}/status", b"online") in op.messages)


def test_anonymous_refused(clients):
    c = clients()
    assert not c.connect()
    assert c.connect_rc is not None and c.connect_rc.is_failure


def test_wrong_password_refused(clients):
    c = clients("press1", "not-the-password")
    assert not c.connect()
    assert c.connect_rc is not None and c.connect_rc.is_failure


def test_unknown_user_refused(clients):
    c = clients("press9", "pw-press1")
    assert not c.connect()


def test_device_cannot_subscribe_to_other_device(clients):
    a = _connected(clients, "press1")
    b = _connected(clients, "press2")
    op = _connected(clients, "operator")
    assert not b.subscribe(f"{B_TOPIC}/#")[0].is_failure

    # mosquitto 2.0 may grant these SUBACKs; the read ACL is enforced per message at delivery,
    # which is what matters: nothing of B's may reach A, whichever filter A uses.
    for topic in (f"{B_TOPIC}/#", "factory/#", "factory/+/+/samples", f"{B_TOPIC}/samples", f"{A_TOPIC}/#"):
        a.subscribe(topic)

    op.publish(f"{B_TOPIC}/samples", b"secret")
    assert _wait_for(lambda: (f"{B_TOPIC}/samples", b"secret") in b.messages)  # it did flow...
    op.publish(f"{A_TOPIC}/samples", b"mine")
    assert _wait_for(lambda: (f"{A_TOPIC}/samples", b"mine") in a.messages)  # A's own does arrive
    time.sleep(0.2)
    assert [m for m in a.messages if m[0].startswith(B_TOPIC)] == []  # ...but B's never to A


def test_device_cannot_publish_to_other_device(clients):
    a = _connected(clients, "press1")
    a_out = _connected(clients, "press1-out")
    b = _connected(clients, "press2")
    op = _connected(clients, "operator")
    assert not op.subscribe(f"{B_TOPIC}/#")[0].is_failure
    for c in (a, a_out):
        for topic in ("predictions", "samples", "labels", "commands", "status", "cmd/reset"):
            c.publish(f"{B_TOPIC}/{topic}", b"forged")
    b.publish(f"{B_TOPIC}/status", b"genuine")  # marker: once this arrives, A's would have too
    assert _wait_for(lambda: (f"{B_TOPIC}/status", b"genuine") in op.messages)
    time.sleep(0.2)
    assert [m for m in op.messages if m[1] == b"forged"] == []


def test_device_cannot_publish_its_own_commands_or_inputs(clients):
    """Only the operations account writes `commands` (load_bundle, rollback): a compromised device
    must not be able to command itself, nor feed itself samples or labels."""
    a = _connected(clients, "press1")
    a_out = _connected(clients, "press1-out")
    op = _connected(clients, "operator")
    assert not op.subscribe(f"{A_TOPIC}/#")[0].is_failure
    for c in (a, a_out):
        for topic in ("commands", "samples", "labels", "context"):
            c.publish(f"{A_TOPIC}/{topic}", b"forged")
    op.publish(f"{A_TOPIC}/commands", b"genuine")  # marker, and the operator may
    assert _wait_for(lambda: (f"{A_TOPIC}/commands", b"genuine") in op.messages)
    time.sleep(0.2)
    assert [m for m in op.messages if m[1] == b"forged"] == []


def test_other_client_id_cannot_take_over_a_live_session(clients):
    a = _connected(clients, "press1", client_id="edge-agent-factory-line1-press1", persistent=True)
    assert not a.subscribe(f"{A_TOPIC}/samples")[0].is_failure
    # press2 (valid credentials) dials with press1's client ids: it must not kick press1 off.
    for cid in ("edge-agent-factory-line1-press1", "press1"):
        intruder = clients("press2", USERS["press2"], client_id=cid, persistent=True)
        intruder.connect()
        intruder.subscribe(f"{A_TOPIC}/samples")
    time.sleep(0.5)
    assert not a.dropped.is_set(), "press1 was disconnected by a client using its id"
    op = _connected(clients, "operator")
    op.publish(f"{A_TOPIC}/samples", b"s1")
    assert _wait_for(lambda: (f"{A_TOPIC}/samples", b"s1") in a.messages)


def test_other_client_id_cannot_take_over_a_queued_session(clients):
    """The issue's loss: while press1 is away, press2 connects with press1's client id and resumes
    its persistent session; the queued samples go to press2 (which may not read them: dropped).
    With ids pinned to usernames, press2 gets its own session and press1 gets every sample."""
    cid = "edge-agent-factory-line1-press1"
    a = _connected(clients, "press1", client_id=cid, persistent=True)
    assert not a.subscribe(f"{A_TOPIC}/samples")[0].is_failure
    a.reset()
    op = _connected(clients, "operator")
    for i in range(5):
        op.publish(f"{A_TOPIC}/samples", f"q{i}".encode())
    intruder = clients("press2", USERS["press2"], client_id=cid, persistent=True)
    assert intruder.connect()
    time.sleep(0.5)
    intruder.close()
    assert a.connect()
    want = [(f"{A_TOPIC}/samples", f"q{i}".encode()) for i in range(5)]
    assert _wait_for(lambda: all(m in a.messages for m in want)), a.messages
    assert intruder.messages == []


def test_operator_and_monitor(clients):
    op = _connected(clients, "operator")
    mon = _connected(clients, "monitor")
    assert not op.subscribe("factory/#")[0].is_failure
    assert not mon.subscribe("factory/#")[0].is_failure
    op.publish(f"{A_TOPIC}/cmd", b"from-op")
    mon.publish(f"{A_TOPIC}/cmd", b"from-monitor")  # read-only account: dropped
    assert _wait_for(lambda: (f"{A_TOPIC}/cmd", b"from-op") in mon.messages)
    time.sleep(0.2)
    assert all(p != b"from-monitor" for _, p in op.messages + mon.messages)


def test_plain_tcp_to_tls_port_fails(clients):
    c = clients("press1", USERS["press1"], use_tls=False)
    assert not c.connect(timeout=3)
    assert not c.connected.is_set()


def test_untrusted_ca_refused(clients, tmp_path):
    other = make_tls_files(tmp_path / "other")
    c = clients("press1", USERS["press1"], ca=other.ca_cert)
    assert not c.connect(timeout=3)


def test_mutual_tls_when_required(tmp_path, tls):
    # The example leaves require_certificate off; this is the documented way to turn it on.
    conf = _broker_conf(tmp_path, tls).replace("require_certificate false", "require_certificate true")
    with start_mosquitto(tmp_path, conf) as b:
        no_cert = Client(b.port, "press1", USERS["press1"], ca=tls.ca_cert)
        with_cert = Client(b.port, "press1", USERS["press1"], ca=tls.ca_cert,
                           certfile=tls.clients["press1"][0], keyfile=tls.clients["press1"][1])
        try:
            assert not no_cert.connect(timeout=3)
            assert with_cert.connect()
        finally:
            no_cert.close()
            with_cert.close()


def test_helper_restart_keeps_port_and_sessions(tmp_path):
    """tests/support/mosquitto.py contract the agent tests rely on: restart() keeps the port and the
    persistent sessions, so QoS 1 messages published while a client was away are still delivered."""
    with start_mosquitto(tmp_path) as b:  # plain, anonymous
        port = b.port

        def client(cid):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid,
                            clean_session=(cid == "pub"), protocol=mqtt.MQTTv311)
            got = []
            c.on_message = lambda cl, u, m: got.append(m.payload)
            c.connect("127.0.0.1", b.port)
            c.loop_start()
            return c, got

        sub, _ = client("durable-sub")
        sub.subscribe("factory/line1/press1/#", qos=1)
        time.sleep(0.2)
        sub.disconnect()
        sub.loop_stop()

        b.restart()
        assert b.port == port and b.running

        pub, _ = client("pub")
        pub.publish("factory/line1/press1/prediction", b"queued", qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()

        sub, got = client("durable-sub")
        try:
            assert _wait_for(lambda: b"queued" in got)
        finally:
            sub.disconnect()
            sub.loop_stop()
    assert not b.running


def test_agent_runs_under_the_shipped_acl(broker, tls, tmp_path, bundle, agent_factory):
    """Least privilege must still let the real agent work: both connections, will, status,
    predictions, errors; and an operator command reaches it."""
    from edge_agent.simulator import LineClient

    pw = tmp_path / "mqtt_password"
    pw.write_text(USERS["press1"] + "\n")
    cfg = write_config(tmp_path, broker, bundle, topic_prefix=A_TOPIC, **{
        "broker.client_id": None, "broker.username": "press1", "broker.outbound_username": "press1-out",
        "broker.password_file": str(pw), "broker.tls": {"ca": str(tls.ca_cert)}})
    line = LineClient("127.0.0.1", broker.port, A_TOPIC, tls_ca=str(tls.ca_cert), username="operator",
                      password=USERS["operator"])
    try:
        agent = agent_factory(cfg).start(line, timeout=30)
        line.sample("p1", bundle.x[0])
        assert line.wait_predictions(["p1"], 15), agent.log()
        line.publish("samples", b"not json")
        assert line.wait_for(lambda: any(e.get("reason") == "bad_json" for e in line.errors), 10), agent.log()
        line.publish("commands", {"command": "no_such_command", "id": "c1"})
        assert line.wait_for(lambda: any(e.get("reason") == "bad_command" for e in line.errors), 10), agent.log()
        assert agent.terminate() == 0
        assert line.wait_for(lambda: any(s.get("status") == "offline" for s in line.status), 10)
    finally:
        line.close()
