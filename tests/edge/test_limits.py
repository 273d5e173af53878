"""Bounded memory under pressure (real agent, real mosquitto): a QoS 1 burst far beyond the queue is
held back (TCP backpressure: the network thread waits for room), not buffered by the agent, and still
nothing is lost; oversized commands are rejected unparsed. (QoS 0 overflow: test_agent_unit.py.)"""

import re

import numpy as np

from conftest import write_config


import pytest


@pytest.mark.parametrize("inflight", ["0", "default"])
def test_queue_stays_bounded_under_a_qos1_burst(tmp_path, bundle, agent_factory, inflight):
    from edge_agent.simulator import LineClient
    from tests.support.mosquitto import start_mosquitto

    conf = "max_queued_messages 0\n" + ("max_inflight_messages 0\n" if inflight == "0" else "")
    broker = start_mosquitto(tmp_path, extra_conf=conf)
    line = LineClient(broker.host, broker.port, "factory/line1/dev1")
    q = 10
    window, batch = 20, 4
    cfg = write_config(tmp_path, broker, bundle, **{"limits.queue_size": q, "limits.batch_size": batch,
                                                     "limits.publish_window": window})
    agent = agent_factory(cfg).start(line)
    good = np.zeros(bundle.n_features) if bundle.x is None else bundle.x[0]
    ids = [f"q-{i}" for i in range(3000)]
    for sid in ids:
        line.sample(sid, good)
    line.publish("commands", b'{"command": "rollback", "pad": "' + b"x" * 5000 + b'"}')
    assert line.wait_predictions(ids, 60), agent.log()[-2000:]
    assert line.wait_for(lambda: any(e["reason"] == "oversized" and e["topic"] == "commands" for e in line.errors), 10)
    assert agent.terminate() == 0
    marks = re.search(r"high-water marks: queue (\d+) .* unconfirmed predictions (\d+)", agent.log())
    hwm, unconfirmed = int(marks.group(1)), int(marks.group(2))
    # in flight (the window) + waiting for it (the worker stops taking input at one window) + a batch
    assert unconfirmed <= 2 * window + batch, unconfirmed
    # the broker holds the burst back: the agent's queue is a few times the Receive Maximum at
    # most (mosquitto 2.0.11 overshoots it a little), never the burst
    print(f"\nmax_inflight_messages {inflight}: high-water mark {hwm}")
    assert hwm <= 10 * q, hwm
    line.close()
    broker.kill()
    print(f"\nQoS 1 burst of {len(ids)}, queue_size {q}: high-water mark {hwm}")
