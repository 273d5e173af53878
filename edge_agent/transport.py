"""paho-mqtt 2 behind a small seam: connect/reconnect, persistent session, manual acks, the will.

Two connections. `inbound` holds the persistent session (subscriptions, the samples queued while we
are down), the retained online/offline status and its will, and our acks. `outbound` carries the
predictions and errors. Why not one: mosquitto 2.0.11 does not keep to our Receive Maximum, so under a
burst the socket holds thousands of samples ahead of the PUBACKs for our predictions, and when the
worker falls behind, the inbound network thread waits for queue room (TCP backpressure, below). On one
connection that stalls the predictions' PUBACKs too: output stops while input floods, and unconfirmed
predictions pile up in memory. Apart, the output keeps flowing and the worker can wait for it.

Why each setting:
- clean_start=False + SessionExpiryInterval (MQTT 5), or clean_session=False (3.1.1): the broker keeps
  our subscriptions and queues QoS 1 samples while the agent is down, and redelivers them on return.
- manual_ack=True: an incoming message is acknowledged only after the worker has durably recorded its
  effect, so a crash in between means redelivery instead of loss.
- Receive Maximum = queue size: the broker never has more unacknowledged QoS 1 messages in flight to us
  than the worker's queue holds, so on_message never has to block or drop a QoS 1 message.
- paho keeps its own session (unacknowledged publishes) in memory across reconnects and retransmits
  them itself (QoS 1, whatever the session flag); the agent's on-disk outbox covers process restarts.
  So `outbound` needs no broker session: it connects with a clean one.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import sys
import threading
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .config import Config
from .credentials import check_tls_files, read_password_file
from .errors import ConfigError
from .observer import Observer

log = logging.getLogger(__name__)

INPUT_TOPICS = ("samples", "labels", "context", "commands")  # subscribed with QoS 1 under the topic prefix


class _PahoNoise(logging.Filter):
    """paho logs "Client is not connected" at ERROR from its loop on every pass without a socket,
    i.e. twice per retry during any outage. The outage itself is reported once (connection_failure);
    these become debug lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and str(record.msg).startswith("Client is not connected"):
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_paho_log = logging.getLogger("edge_agent.paho")
_paho_log.addFilter(_PahoNoise())


def connection_failure(exc: BaseException | None) -> str:
    """Why a connection attempt failed, in words an integrator can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        if "hostname" in why.lower() or "ip address mismatch" in why.lower():
            return f"TLS: the broker's certificate does not match the host name dialled ({why}); check broker.host"
        return f"TLS: the broker's certificate is not trusted ({why}); check broker.tls.ca"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}); is the port a TLS listener, and the TLS settings right?"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens on that host and port"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker's host name ({exc.strerror})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out: no answer from the broker (firewall, routing, IPAddressAllow=?)"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) if exc else "unknown cause"


def default_client_id(cfg: Config) -> str:
    # Stable across restarts: the broker finds our persistent session by this id.
    return "edge-agent-" + cfg.topic_prefix.replace("/", "-")


class MqttTransport:
    def __init__(
        self,
        cfg: Config,
        deliver: Callable[..., None],
        online_payload: Callable[[], bytes],
        offline_payload: Callable[[], bytes],
        observer: Observer | None = None,
    ):
        self.cfg = cfg
        self._deliver = deliver
        self._online = online_payload
        self._offline = offline_payload
        self._obs = observer or Observer()
        self.gen = 0  # inbound connection generation; an ack is only valid on the connection that received it
        self.connected = threading.Event()  # both connections up
        self._up = {"inbound": False, "outbound": False}
        self._up_lock = threading.Lock()
        self._last_failure: str | None = None  # logged once until the next successful connection
        self.published: collections.deque[tuple[int, bool]] = collections.deque()  # (mid, ok) of outbound publishes
        self.on_published: Callable[[], None] | None = None  # called (network thread) after each outbound PUBACK
        self.status_topic = cfg.topic("status")
        base = cfg.broker.client_id or default_client_id(cfg)
        self.client = self._make_client(base, inbound=True)
        self.out = self._make_client(base + "-out", inbound=False)

    def _make_client(self, client_id: str, inbound: bool) -> mqtt.Client:
        b = self.cfg.broker
        v5 = b.protocol == "5"
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not inbound,
            manual_ack=inbound,
        )
        c.enable_logger(logging.getLogger("edge_agent.paho"))
        c.reconnect_delay_set(min_delay=max(1, int(b.reconnect_min_delay)), max_delay=max(1, int(b.reconnect_max_delay)))
        # 0 (unlimited) is paho's fast path: with a limit it scans all unconfirmed messages per PUBACK.
        c.max_inflight_messages_set(b.max_inflight)  # narrowed to the broker's Receive Maximum on connect
        c.max_queued_messages_set(0)  # unbounded: predictions are never dropped by the client
        if b.username is not None or b.password_file is not None:
            # A broker that pins client ids to usernames (deploy/mosquitto) needs one user per connection.
            user = b.username if inbound else (b.outbound_username or b.username)
            c.username_pw_set(user or "", self._password())
        if b.tls is not None:
            t = b.tls
            check_tls_files(t.ca, t.cert, t.key)
            try:
                c.tls_set(ca_certs=t.ca, certfile=t.cert, keyfile=t.key, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as e:
                # ssl's reason ("PEM lib", "KEY_VALUES_MISMATCH") names neither file nor contents.
                files = ", ".join(f for f in (t.ca, t.cert, t.key) if f)
                raise ConfigError(f"broker.tls: cannot load the TLS files ({files}): {e}") from None
            c.tls_insecure_set(t.insecure)
        c.on_connect_fail = self._on_connect_fail
        if inbound:
            c.will_set(self.status_topic, self._offline(), qos=1, retain=True)
            c.on_connect = self._on_connect
            c.on_disconnect = self._on_disconnect
            c.on_message = self._on_message
        else:
            c.on_connect = self._on_connect_out
            c.on_disconnect = self._on_disconnect_out
            c.on_publish = self._on_publish
        return c

    def _password(self) -> str | None:
        b = self.cfg.broker
        if b.password_file is None:
            return b.password
        return read_password_file(b.password_file)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        b = self.cfg.broker
        if b.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = b.session_expiry
            props.ReceiveMaximum = self.cfg.limits.queue_size
            self.client.connect_async(b.host, b.port, b.keepalive, clean_start=False, properties=props)
            self.out.connect_async(b.host, b.port, b.keepalive, clean_start=True)
        else:
            self.client.connect_async(b.host, b.port, b.keepalive)
            self.out.connect_async(b.host, b.port, b.keepalive)
        self.out.loop_start()
        self.client.loop_start()

    def stop(self, timeout: float = 3.0) -> None:
        """Publish `offline` (retained), wait briefly for it, disconnect cleanly (no will)."""
        if self._up["inbound"]:
            try:
                info = self.client.publish(self.status_topic, self._offline(), qos=1, retain=True)
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as e:
                log.warning("could not publish offline status: %s", e)
        for c in (self.client, self.out):
            # paho logs its loop's last pass without a socket as an error; nothing is wrong by then.
            c.disable_logger()
            c.disconnect()
            c.loop_stop()

    # -- used by the worker thread ---------------------------------------------------------------
    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, resent: bool = False) -> int:
        """Publish on the outbound connection; its PUBACKs are reported in `published`."""
        props = None
        if resent and self.cfg.broker.protocol == "5":
            # A copy of a prediction published before (outbox after a restart, or a re-published
            # sample): marked for consumers, next to the stable `id` (docs/protocol.md).
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ("resent", "1")
        info = self.out.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            # 65535 unconfirmed publishes (packet ids exhausted): the message stays in the outbox
            # and is re-sent at the next start.
            log.error("publish to %s refused by the MQTT client: too many unconfirmed messages", topic)
        return info.mid

    def ack(self, mid: int, qos: int, gen: int) -> None:
        # After a reconnect the broker redelivers unacknowledged messages (they are deduplicated);
        # an ack for the old connection's packet id could hit a different message on the new one.
        if qos and gen == self.gen:
            self.client.ack(mid, qos)

    # -- paho callbacks (network threads): never block ---------------------------------------------
    def _set_up(self, which: str, up: bool) -> None:
        with self._up_lock:
            self._up[which] = up
            if all(self._up.values()):
                self.connected.set()
            else:
                self.connected.clear()

    def _narrow_inflight(self, client, properties) -> None:
        # paho ignores the broker's Receive Maximum; exceeding it (mosquitto's default is 20) is a
        # protocol error. The public setter refuses changes on an open connection, but at this point
        # (inside CONNACK handling, before paho re-sends anything) changing the limit is safe: paho
        # counts in-flight messages independently of it.
        server_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        own = self.cfg.broker.max_inflight
        if server_max:
            client._max_inflight_messages = min(own, server_max) if own else server_max
        elif client._max_inflight_messages:
            # Never back to 0 once limited: paho would then never send what it holds as "queued".
            client._max_inflight_messages = own or 65535

    def _failed(self, cause: str) -> None:
        # Both connections retry every few seconds during an outage: say why once, not per retry.
        if cause != self._last_failure:
            self._last_failure = cause
            log.warning("cannot connect to the broker %s:%d: %s (retrying with backoff)",
                        self.cfg.broker.host, self.cfg.broker.port, cause)
        else:
            log.debug("connection attempt failed again: %s", cause)

    def _on_connect_fail(self, client, userdata):
        # paho calls this inside its `except OSError:` around the connect, so the exception is at hand.
        self._failed(connection_failure(sys.exc_info()[1]))

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._failed(f"the broker refused the connection: {reason_code}")
            return
        self._last_failure = None
        self.gen += 1
        self._narrow_inflight(client, properties)
        present = getattr(flags, "session_present", False)
        log.info("connected to %s:%d (session %s)", self.cfg.broker.host, self.cfg.broker.port,
                 "resumed" if present else "new")
        # Always (re)subscribe: a broker that lost our session (restart without persistence,
        # expiry) would otherwise leave us connected and deaf.
        if self.cfg.broker.protocol == "5":
            opts = SubscribeOptions(qos=1, noLocal=True)
            client.subscribe([(self.cfg.topic(t), opts) for t in INPUT_TOPICS])
        else:
            client.subscribe([(self.cfg.topic(t), 1) for t in INPUT_TOPICS])
        client.publish(self.status_topic, self._online(), qos=1, retain=True)
        self._set_up("inbound", True)
        self._obs.on_connect(self.gen > 1)

    def _on_connect_out(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._failed(f"the broker refused the connection: {reason_code}")
            return
        self._narrow_inflight(client, properties)
        self._set_up("outbound", True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        was_up = self._up["inbound"]
        self._set_up("inbound", False)
        if reason_code != 0 and not was_up:
            log.debug("connection closed before it was up (%s)", reason_code)  # the cause was logged
        elif reason_code != 0:
            log.warning("disconnected from broker (%s); reconnecting with backoff", reason_code)
            self._obs.on_disconnect()

    def _on_disconnect_out(self, client, userdata, flags, reason_code, properties):
        was_up = self._up["outbound"]
        self._set_up("outbound", False)
        if reason_code != 0 and was_up:
            log.warning("outbound connection lost (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg):
        self._deliver(msg.topic, msg.payload, msg.mid, msg.qos, self.gen, bool(msg.dup))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.published.append((mid, not reason_code.is_failure))
        if self.on_published is not None:
            self.on_published()
