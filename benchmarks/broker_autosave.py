"""What the broker's autosave policy costs: the agent online, N samples published at full speed to a
real mosquitto on loopback; samples/s until the last prediction arrives, per policy. The shipped
deploy/mosquitto/mosquitto.conf uses `autosave_on_changes true` + `autosave_interval 1`.

    .venv/bin/python benchmarks/broker_autosave.py [--samples 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "edge"), str(REPO)]

from conftest import BROKER_CONF, AgentProc, BundleInfo, write_config  # noqa: E402
from linear_bundle import LinearFamily, make_linear_bundle  # noqa: E402

from edge_agent.simulator import LineClient  # noqa: E402
from tests.support.mosquitto import start_mosquitto  # noqa: E402

POLICIES = {
    "autosave_interval 60 (time-based; the old shipped config)": "autosave_interval 60\n",
    "autosave_on_changes, autosave_interval 1 (shipped)": "autosave_on_changes true\nautosave_interval 1\n",
    "autosave_on_changes, autosave_interval 100": "autosave_on_changes true\nautosave_interval 100\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="broker_autosave_"))
    fam = LinearFamily()
    x, y = fam.sample(fam.sample_task(1), args.samples, seed=1)
    bundle = BundleInfo(make_linear_bundle(base / "bundle", fam), None, x, y, real=False)
    print("| broker persistence | samples/s, publish to last prediction |\n|---|---|")
    for i, (name, conf) in enumerate(POLICIES.items()):
        d = base / f"p{i}"
        d.mkdir()
        broker = start_mosquitto(d, extra_conf=BROKER_CONF + conf)
        line = agent = None
        try:
            cfg = write_config(d, broker, bundle)
            line = LineClient(broker.host, broker.port, "factory/line1/dev1")
            agent = AgentProc(cfg, d / "agent.log").start(line)
            ids = [f"s{j}" for j in range(args.samples)]
            t0 = time.monotonic()
            for j, sid in enumerate(ids):
                line.sample(sid, x[j])
            if not line.wait_predictions(ids, 600):
                raise SystemExit(f"{name}: not every sample was predicted")
            print(f"| {name} | {args.samples / (time.monotonic() - t0):.0f} |", flush=True)
        finally:
            if agent is not None:
                agent.terminate()
            if line is not None:
                line.close()
            broker.kill()


if __name__ == "__main__":
    main()
