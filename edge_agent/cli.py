"""`edge-agent`: thin entry point. Every EdgeError becomes its class's exit code (errors.py).

    edge-agent run --config agent.yaml
    edge-agent check-config --config agent.yaml
    edge-agent verify BUNDLE_DIR [--public-key K] [--allow-unsigned]
    edge-agent simulate --config agent.yaml --task-file task.npz ...
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from .errors import EdgeError

log = logging.getLogger("edge_agent")

# systemd's sd-daemon(3) priorities, so journald keeps the level of each stdout line.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def one_line(text: str) -> str:
    """journald makes each stdout line its own entry, and only the first would carry the <N> prefix
    (or, prefixed per line, one event would become many): newlines are escaped, one event = one line."""
    return text.replace("\r\n", "\n").replace("\r", "\\r").replace("\n", "\\n")


class SyslogPrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Tracebacks included: `journalctl -o cat | sed 's/\\n/\n/g'` unfolds one.
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + one_line(super().format(record))


def setup_logging(level: str = "info") -> None:
    # journald stamps each line itself; by hand or under a test a timestamp helps.
    fmt = "%(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(SyslogPrefixFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger("edge_agent.paho").setLevel(max(logging.INFO, root.level))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Line-side agent: MQTT samples in, few-shot "
                                "adaptation on the CPU, quality predictions out.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the agent daemon")
    r.add_argument("--config", required=True)
    c = sub.add_parser("check-config", help="validate a config file and every file it names, as the service "
                       "will read them; exit 0 ok, 2 invalid")
    c.add_argument("--config", required=True)
    c.add_argument("--service-user", default="dynamic",
                   help="who must be able to read the files: 'dynamic' (the unit's DynamicUser: owns nothing, "
                        "so the 'other' permission bits count; default), 'current', or an account name")
    c.add_argument("--credentials-dir", default=None,
                   help="where $CREDENTIALS_DIRECTORY/<name> paths point (default: $CREDENTIALS_DIRECTORY, set "
                        "by systemd inside the unit); outside it, the directory of the LoadCredential= sources")
    v = sub.add_parser("verify", help="verify a bundle's signature and hashes")
    v.add_argument("bundle_dir")
    v.add_argument("--public-key", default=None)
    v.add_argument("--allow-unsigned", action="store_true")
    s = sub.add_parser("simulate", help="line simulator: publish a task's samples and labels, score predictions")
    from .simulator import add_arguments

    add_arguments(s)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return _run(args.config)
        if args.cmd == "check-config":
            from .config import CREDENTIALS_VAR, load_config
            from .preflight import ServiceUser, check_files

            user = ServiceUser.parse(args.service_user)
            cred = args.credentials_dir or os.environ.get(CREDENTIALS_VAR)
            cfg = load_config(args.config, credentials_dir=cred)
            files = check_files(cfg, user, cred)
            print(f"{args.config}: OK ({len(files)} files readable by {user.describe()})")
            return 0
        if args.cmd == "verify":
            from .verify import main_verify

            return main_verify(args.bundle_dir, args.public_key, args.allow_unsigned)
        if args.cmd == "simulate":
            from .simulator import run_from_args

            return run_from_args(args)
    except EdgeError as e:
        # Logging may not be configured yet (bad config): say it on stderr with a priority too.
        print(f"<3>edge-agent: {type(e).__name__}: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 2


def _run(config_path: str) -> int:
    from .agent import Agent
    from .config import load_config
    from .lifecycle import startup_model
    from .observer import Observers
    from .state import Store

    cfg = load_config(config_path)
    setup_logging(cfg.log_level)
    # SIGHUP before start-up finished must not kill us (its default action); it is handled once running.
    reload_early = []
    signal.signal(signal.SIGHUP, lambda signum, frame: reload_early.append(signum))
    store = Store(cfg.state_dir)  # the lock first: a second agent must not touch our bundles
    try:
        model, bundles = startup_model(cfg)
    except BaseException:
        store.close()
        raise
    observers = Observers([_metrics(cfg), _plugin("edge_agent.sdnotify", cfg)])
    agent = Agent(cfg, model, observers, store=store, bundles=bundles)

    def stop(signum, frame):
        log.info("received %s", signal.Signals(signum).name)
        agent.request_stop()

    def reload(signum, frame):
        agent.request_reload()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    if reload_early:
        agent.request_reload()
    return agent.run()


def _metrics(cfg):
    if not cfg.metrics.enabled:
        return None  # prometheus_client is not even imported
    from .metrics import Metrics
    from .observer import MetricsObserver

    m = Metrics(max_context_labels=cfg.metrics.max_context_labels)
    try:
        m.start_server(cfg.metrics.host, cfg.metrics.port)
    except OSError as e:
        from .errors import ConfigError

        raise ConfigError(f"metrics: cannot listen on {cfg.metrics.host}:{cfg.metrics.port}: {e.strerror}") from e
    log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, cfg.metrics.port)
    return MetricsObserver(m)


def _plugin(module: str, cfg):
    """`create_observer(cfg)` of an optional module; the agent runs without it."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if e.name != module:
            log.warning("%s not loaded: %s", module, e)
        return None
    factory = getattr(mod, "create_observer", None)
    if factory is None and module == "edge_agent.sdnotify":
        from .observer import SystemdObserver

        return SystemdObserver(mod)
    return factory(cfg) if factory else None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
