"""The end-to-end demo: workstation -> signed bundle -> broker -> edge agent -> line simulator.

1. meta-train a small model on the process-quality family (configs/quality.yaml, about a CPU minute)
2. keep the untrained random initialisation too, as the "scratch" reference
3. export both as bundles; sign the real one with a fresh Ed25519 key
4. start mosquitto on a free loopback port, then the agent (as the device would run it)
5. the line simulator replays an unseen line: samples, and inspection labels 5 samples later;
   it prints the prediction error as labels accumulate (the agent, which model answered: `source`,
   how often its 90 % intervals held: `cover`; against the bare meta-init, the bundle's population
   model and scratch on the same samples)
Everything it starts, it stops. Output lands in demo_out/ (or --out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*cmd: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        sys.exit("mosquitto not found: run scripts/ensure_mosquitto.sh or 'sudo apt-get install -y mosquitto'")
    return found


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"process exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"nothing listening on port {port} after {seconds}s")


def stop(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=15)
        print(f"{name} stopped (exit {code})")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"{name} killed after not stopping in 15 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "demo_out"))
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0, help="samples per second from the simulated line")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    meta_train, meta_export, edge_agent = str(BIN / "meta-train"), str(BIN / "meta-export"), str(BIN / "edge-agent")
    overrides = [f"train.iterations={args.iterations}"] if args.iterations else []

    step("1. meta-train on the process-quality family (configs/quality.yaml)")
    run(meta_train, "train", "--config", "configs/quality.yaml", "--out", str(out / "run"), *overrides)
    run(meta_train, "eval", "--run", str(out / "run"), "eval.tasks=300", "eval.shots=[5,10]", "eval.steps=[5]")

    step("2. the scratch reference: the same network at its random initialisation (iteration 0)")
    run(meta_train, "train", "--config", "configs/quality.yaml", "--out", str(out / "scratch_run"), "--max-iterations", "0")

    step("3. export: signed bundle (adaptation inside the ONNX graph), parity proven at export")
    run(meta_export, "keygen", "--out", str(out / "keys"))
    run(meta_export, "--run", str(out / "run"), "--out", str(out / "bundle"), "--sign-key", str(out / "keys" / "signing_key.pem"))
    # the scratch reference is only adapted locally by the simulator: no population model to train for it
    run(meta_export, "--run", str(out / "scratch_run"), "--out", str(out / "scratch_bundle"), "--no-population")
    run(edge_agent, "verify", str(out / "bundle"), "--public-key", str(out / "keys" / "signing_key.pub.pem"))

    step("4. an unseen line: 500 inspected parts from a task never used in meta-training")
    run(str(BIN / "python"), "-m", "meta_train.tasks.quality", "--dump-task", str(out / "task.npz"),
        "--n", str(args.samples), "--seed", "7", "--config", "configs/quality.yaml")

    broker = agent = None
    try:
        step("5. broker and agent")
        port = free_port()
        (out / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            + (f"user {os.environ.get('USER', 'root')}\n" if os.geteuid() == 0 else "")
        )
        broker = subprocess.Popen([mosquitto_binary(), "-c", str(out / "mosquitto.conf")],
                                  stdout=open(out / "mosquitto.log", "w"), stderr=subprocess.STDOUT)
        wait_for_port(port, broker)
        print(f"mosquitto listening on 127.0.0.1:{port}")
        (out / "agent.yaml").write_text(
            f"topic_prefix: factory/demo-line/press1\nstate_dir: {out / 'state'}\nlog_level: info\n"
            f"bundle:\n  dir: {out / 'bundle'}\n  public_key: {out / 'keys' / 'signing_key.pub.pem'}\n"
            f"broker:\n  host: 127.0.0.1\n  port: {port}\n  client_id: demo-press1\n"
            "adaptation:\n  support_size: 10\n  adapt_every: 1\n  min_labels: 3\n"
        )
        agent = subprocess.Popen([edge_agent, "run", "--config", str(out / "agent.yaml")],
                                 stdout=open(out / "agent.log", "w"), stderr=subprocess.STDOUT)
        time.sleep(0.5)

        step("6. the line simulator: samples, labels 5 parts later, predictions scored against the truth")
        run(edge_agent, "simulate", "--config", str(out / "agent.yaml"), "--task-file", str(out / "task.npz"),
            "--rate", str(args.rate), "--label-delay", "5", "--bundle", str(out / "bundle"),
            "--scratch-bundle", str(out / "scratch_bundle"), "--out", str(out / "simulation"))
    finally:
        stop(agent, "edge-agent")
        stop(broker, "mosquitto")
    print(f"\nreport: {out / 'simulation'}; agent log: {out / 'agent.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
