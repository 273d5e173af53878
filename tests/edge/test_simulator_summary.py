"""The simulator's summary compares the adapted agent and the bare meta-init on the SAME samples
(issue 11 item 6: it used to set the agent's early unadapted samples against its later adapted ones),
and its table says which predictor answered (`source`)."""

from __future__ import annotations

import numpy as np

from edge_agent.simulator import score, table


class InitOnly:
    """A bundle stand-in whose bare meta-init predicts 0 for every sample."""

    init_state = np.zeros(1, np.float32)

    def predict(self, state, x):
        return np.zeros(len(x), np.float32)


def test_summary_compares_meta_init_and_adapted_on_the_same_samples():
    n, delay = 12, 2
    x = np.zeros((n, 1), np.float32)
    # early samples are easy (y = 1), late ones hard (y = 10): comparing early with late would flatter
    y = np.array([1.0] * 6 + [10.0] * 6, np.float32)
    ids = [f"s{i}" for i in range(n)]
    preds = {}
    for i in range(n):
        adapted = i >= 6
        value = y[i] - 1.0 if adapted else 0.0  # adapted: error 1; unadapted: predicts 0 (error 1 here)
        preds[ids[i]] = [{"prediction": value, "adapted": adapted, "source": "adapted" if adapted else "population"}]
    rep = score(ids, x, y, preds, delay, bundle=InitOnly())
    same = rep["same_samples"]
    assert same["n"] == 6
    assert same["agent_adapted"] == 1.0
    assert same["meta_init"] == 100.0  # the meta-init on the adapted (hard) samples: (10 - 0)^2
    text = table(rep)
    assert "on the 6 samples the agent predicted adapted" in text and "100.0000" in text.splitlines()[-1]
    assert "source" in text.splitlines()[0]
    assert "population" in text and "adapted" in text
