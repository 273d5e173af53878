"""MQTT clients for the fault-injection suite and the soak benchmark: a publisher and a consumer that
survive broker crashes themselves (paho with a persistent session, QoS 1, automatic reconnect), so
that what the suite measures is the agent, not the harness.

- `RobustPublisher`: paho keeps every QoS 1 PUBLISH until its PUBACK and re-sends the unconfirmed ones
  (DUP flag) after a reconnect; messages published while disconnected are queued and sent on
  reconnect. On top of that, `republish_missing` re-publishes samples whose prediction never came
  (end to end: a broker SIGKILL can lose what it had acknowledged but not yet persisted or
  forwarded; mosquitto saves its state every `autosave_interval`). The agent recognises the id and
  re-sends the prediction it made instead of predicting again.
- `Consumer`: persistent session subscribed with QoS 1 to predictions and errors; records every copy
  with its MQTT DUP flag and the agent's `resent` user property.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def _client(client_id: str, host: str, port: int, on_connect=None, on_message=None, **callbacks) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    for name, fn in callbacks.items():
        setattr(c, name, fn)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(1, 2)
    if on_connect:
        c.on_connect = on_connect
    if on_message:
        c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect_async(host, port, 10, clean_start=False, properties=props)
    c.loop_start()
    return c


class RobustPublisher:
    def __init__(self, host: str, port: int, prefix: str, client_id: str | None = None):
        self.prefix = prefix
        self.connected = threading.Event()
        self.unconfirmed: set[int] = set()
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self.republished = 0

        def on_connect(client, userdata, flags, rc, props):
            if not rc.is_failure:
                self.connected.set()

        def on_disconnect(client, userdata, flags, rc, props):
            self.connected.clear()

        def on_publish(client, userdata, mid, rc, props):
            # paho calls this holding its own message lock: never wait here for a lock that is held
            # around client.publish() (lock-order inversion, a deadlock)
            with self._lock:
                if mid in self.unconfirmed:
                    self.unconfirmed.discard(mid)
                else:
                    self._early.add(mid)  # PUBACK before publish() returned

        self.c = _client(client_id or f"pub-{uuid.uuid4().hex[:8]}", host, port, on_connect,
                         on_disconnect=on_disconnect, on_publish=on_publish)
        if not self.connected.wait(15):
            raise RuntimeError("publisher could not connect")

    def publish(self, topic: str, obj) -> int:
        payload = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        info = self.c.publish(f"{self.prefix}/{topic}", payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued, sent on reconnect
            raise RuntimeError(f"publish refused: {mqtt.error_string(info.rc)}")
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self.unconfirmed.add(info.mid)
        return info.mid

    def sample(self, sid: str, x, label=None) -> int:
        d = {"id": sid, "features": [float(v) for v in x]}
        if label is not None:
            d["label"] = label
        return self.publish("samples", d)

    def wait_confirmed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.unconfirmed:
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Consumer:
    def __init__(self, host: str, port: int, prefix: str, client_id: str | None = None):
        self.prefix = prefix
        self.copies: dict[str, list[tuple[bytes, bool, bool]]] = {}  # id -> [(payload, dup, resent)]
        self.errors: list[dict] = []
        self.status: list[dict] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()

        def on_connect(client, userdata, flags, rc, props):
            if not rc.is_failure:
                client.subscribe([(f"{prefix}/predictions", 1), (f"{prefix}/errors", 1), (f"{prefix}/status", 1)])

        def on_message(client, userdata, msg):
            kind = msg.topic.rsplit("/", 1)[1]
            try:
                d = json.loads(msg.payload)
            except ValueError:
                return
            props = getattr(msg, "properties", None)
            resent = any(k == "resent" for k, _ in (getattr(props, "UserProperty", None) or []))
            with self._lock:
                if kind == "predictions":
                    self.copies.setdefault(str(d.get("id")), []).append((bytes(msg.payload), bool(msg.dup), resent))
                elif kind == "errors":
                    self.errors.append(d)
                else:
                    self.status.append(d)

        self.c = _client(client_id or f"con-{uuid.uuid4().hex[:8]}", host, port, on_connect, on_message,
                         on_subscribe=lambda *a: self.subscribed.set())
        if not self.subscribed.wait(15):
            raise RuntimeError("consumer could not subscribe")

    def missing(self, ids) -> list[str]:
        with self._lock:
            return [i for i in ids if i not in self.copies]

    def wait_all(self, ids, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.missing(ids):
                return True
            time.sleep(0.1)
        return not self.missing(ids)

    def duplicates(self) -> dict:
        """How many extra copies, whether every copy of an id is byte-identical (so dropping by `id`
        loses nothing), and how many extra copies carried a mark (MQTT DUP or `resent`)."""
        with self._lock:
            extra = identical = marked = 0
            for copies in self.copies.values():
                if len(copies) > 1:
                    extra += len(copies) - 1
                    identical += all(c[0] == copies[0][0] for c in copies)
                    marked += sum(1 for c in copies[1:] if c[1] or c[2])
            n_dup_ids = sum(1 for c in self.copies.values() if len(c) > 1)
        return {"extra_copies": extra, "ids_with_copies": n_dup_ids, "all_identical": identical == n_dup_ids,
                "marked_copies": marked}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def repeats() -> dict:
    """FAULT_REPEATS: unset -> CI size; "full" -> the issue's numbers; an integer scales the restarts."""
    raw = os.environ.get("FAULT_REPEATS", "").strip().lower()
    if raw == "full":
        return {"broker_restarts": 10, "agent_kills": 10, "fuzz": 100_000}
    if raw.isdigit():
        n = int(raw)
        return {"broker_restarts": n, "agent_kills": n, "fuzz": max(1000, n * 1000)}
    return {"broker_restarts": 3, "agent_kills": 3, "fuzz": 5000}
