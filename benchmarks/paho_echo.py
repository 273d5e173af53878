"""Baseline for agent_throughput.py --paho-echo: what paho-mqtt alone costs per sample.

Same MQTT pattern as the agent (MQTT 5 persistent session, manual ack, QoS 1 in and out, a worker
thread) but no parsing, model, journal or fsync: each sample is answered with a fixed prediction.
"""

import collections
import json
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port, prefix = int(sys.argv[1]), sys.argv[2]
q = collections.deque()
wake = threading.Event()


def on_connect(client, userdata, flags, rc, props):
    client.subscribe(f"{prefix}/samples", 1)
    client.publish(f"{prefix}/status", json.dumps({"status": "online"}), qos=1, retain=True)


def on_message(client, userdata, msg):
    q.append((msg.payload, msg.mid))
    wake.set()


c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-echo", protocol=mqtt.MQTTv5, manual_ack=True)
c.on_connect, c.on_message = on_connect, on_message
props = Properties(PacketTypes.CONNECT)
props.SessionExpiryInterval, props.ReceiveMaximum = 3600, 1000
c.connect(host="127.0.0.1", port=port, clean_start=False, properties=props)
c.loop_start()
while True:
    wake.wait(0.5)
    wake.clear()
    while q:
        payload, mid = q.popleft()
        sid = json.loads(payload)["id"]
        c.publish(f"{prefix}/predictions", json.dumps({"id": sid, "prediction": 0.0}), qos=1)
        c.ack(mid, 1)
