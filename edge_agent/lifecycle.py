"""Model lifecycle: bundle commands, rollback, SIGHUP reload and bundle.watch_dir polling.

All of it runs on the main thread (the worker loop) between two durable commits (see agent.py), so a
model swap never splits a batch. A mixin rather than a collaborator object: a swap rewrites the
agent's own model, config, support size and per-context states, and reports through its error,
status and transport paths, so a separate object would reach into nearly every attribute of the
agent anyway.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from .config import Config, load_config
from .errors import BundleError, ConfigError, PayloadError
from .model import Model
from .protocol import decode

if TYPE_CHECKING:
    from .agent import _Item

# The agent's logger, not this module's: the log lines (logger name included) stay what they were
# before this code moved out of agent.py.
log = logging.getLogger("edge_agent.agent")


class ModelLifecycle:
    """Mixed into `Agent`, which provides cfg, model, k, state, store, bundles, transport, obs,
    _dirty, _next_watch, _watch_seen, _report, _online_payload and _update_status."""

    def _command(self, it: _Item) -> None:
        try:
            if it.payload is None:
                raise PayloadError("oversized", f"payload of {it.size} bytes exceeds limits.max_payload_bytes "
                                                f"({self.cfg.limits.max_payload_bytes})")
            obj = decode(it.payload)
            cid = obj.get("id")
            if cid is not None and (not isinstance(cid, (str, int)) or isinstance(cid, bool) or len(str(cid)) > 200):
                raise PayloadError("bad_command", "'id' must be a string or an integer")
            cid = None if cid is None else str(cid)
            if cid is not None and self.bundles is not None and cid == self.bundles.meta.get("last_command"):
                log.info("command %s already carried out (redelivered); ignored", cid)
                return
            cmd = obj.get("command")
            if cmd == "load_bundle":
                path = obj.get("path")
                if not isinstance(path, str) or not path or "\x00" in path:
                    raise PayloadError("bad_command", "load_bundle needs 'path': the bundle directory on this device",
                                       cid)
                self._load_bundle(path, f"command {cid or ''}".strip(), command_id=cid)
            elif cmd == "rollback":
                self._rollback(cid)
            else:
                raise PayloadError("bad_command", f"unknown command {cmd!r} (known: load_bundle, rollback)", cid)
        except PayloadError as e:
            self._report("commands", e)
        finally:
            self.transport.ack(it.mid, it.qos, it.gen)

    def _load_bundle(self, src: str, origin: str, command_id: str | None = None, from_config: bool = False) -> bool:
        """Verify, install, test-load and activate the bundle in `src`. True if another model now
        serves; PayloadError("bundle_refused") if anything failed (the running model keeps serving)."""
        if self.bundles is None:
            raise PayloadError("bundle_refused", "hot reload is not available in this agent", command_id)
        old = self.model.version
        key = None
        try:
            d, manifest = self.bundles.install(src)
            key = d.name
            if from_config and key == self.bundles.meta.get("config_bundle"):
                return False  # the configured bundle did not change; keep what was activated since
            if key == self.bundles.active:
                log.info("bundle %s (%s) is already serving", manifest["model_version"], origin)
                if from_config or command_id is not None:
                    self.bundles.activated(key, from_config=from_config, command_id=command_id)
                return False
            model = Model(str(d), manifest)
            states = self._prepare_model(model)
        except BundleError as e:
            if key is not None:
                self.bundles.discard(key)  # a later valid bundle must not find this copy
            log.error("bundle from %s refused (%s): %s; model %s keeps serving", src, origin, e, old)
            raise PayloadError("bundle_refused", f"bundle {src} refused: {e}; model {old} keeps serving",
                               command_id) from None
        self._swap_model(model, states)
        self.bundles.activated(key, from_config=from_config, command_id=command_id)
        self.store.compact(self.state)
        log.info("model %s -> %s (%s); %d context(s) re-adapted", old, model.version, origin, len(states))
        return True

    def _rollback(self, command_id: str | None) -> None:
        if self.bundles is None or self.bundles.previous() is None:
            raise PayloadError("rollback_unavailable", "no previous bundle to roll back to", command_id)
        target = self.bundles.previous()
        old = self.model.version
        try:
            d, manifest = self.bundles.open_installed(target)
            model = Model(str(d), manifest)
            states = self._prepare_model(model)
        except BundleError as e:
            log.error("rollback to %s refused: %s; model %s keeps serving", target, e, old)
            raise PayloadError("bundle_refused", f"rollback to {target} refused: {e}; model {old} keeps serving",
                               command_id) from None
        self._swap_model(model, states)
        self.bundles.rolled_back(target, command_id)
        self.store.compact(self.state)
        log.info("rolled back: model %s -> %s (%s); %d context(s) re-adapted", old, model.version, target, len(states))

    def _prepare_model(self, model: Model) -> dict:
        """Everything that can fail, before anything changes: the line protocol must stay the same, the
        model must run, and every adapted context must re-adapt on it. Returns the new states."""
        cur = self.model
        for attr in ("task_kind", "feature_names", "input_shape", "class_names"):
            if getattr(model, attr) != getattr(cur, attr):
                raise BundleError(f"{attr} differs from the running model ({getattr(model, attr)!r} vs "
                                  f"{getattr(cur, attr)!r}): the line's payloads would change; restart with a new "
                                  "state_dir to switch")
        model.dry_run()
        states = {}
        for name, c in self.state.contexts.items():
            if c.state is None or not c.support:
                continue
            xs, ys = c.support_arrays()
            try:
                states[name] = (model.adapt(xs, ys), len(c.support))
            except Exception as e:  # noqa: BLE001
                raise BundleError(f"re-adapting context {name!r} on the new model failed: {e}") from e
        return states

    def _swap_model(self, model: Model, states: dict) -> None:
        self.model = model
        k = min(self.cfg.adaptation.support_size or model.recommended_k, model.max_support)
        if k != self.k:
            self._resize_support(k)
        for name, c in self.state.contexts.items():
            if name in states:
                c.state, c.adapted_on = states[name]
                c.since_adapt = 0
                self._dirty.discard(name)
            else:
                c.state, c.adapted_on = None, 0
        self.state.model_version = model.version
        self.transport.publish(self.cfg.topic("status"), self._online_payload(), qos=1, retain=True)
        self.obs.on_model(model.version)
        self._update_status()

    def _resize_support(self, k: int) -> None:
        self.k = self.state.k = k
        for c in self.state.contexts.values():
            c.k = k
            c.support = collections.deque(c.support, maxlen=k)

    def _reload_config(self) -> None:
        log.info("SIGHUP: reloading %s", self.cfg.path)
        self.obs.on_reloading()
        try:
            if not self.cfg.path:
                raise ConfigError("the agent was not started from a config file")
            new = load_config(self.cfg.path)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            self._report("config", PayloadError("config_invalid", f"reload refused: {e}"))
        else:
            self._reload_with(new)
        self.obs.on_reloaded(self.model.version)
        self._update_status()

    def _reload_with(self, new: Config) -> None:
        """The new configuration applies only once its bundle is accepted: applied first, a refused
        bundle.dir would stay in the running config and the next start would trip on it."""
        b = self.bundles
        trust = None if b is None else (b.public_key, b.allow_unsigned, b.keep)
        if b is not None:  # the new bundle is checked against the new key
            b.set_trust(new.bundle.public_key, new.bundle.allow_unsigned, new.bundle.keep)
        try:
            self._load_bundle(new.bundle.dir, "config reload", from_config=True)
        except PayloadError as e:
            if b is not None:
                b.set_trust(*trust)
            log.error("reload refused, keeping the running configuration: %s", e)
            e.args = (f"reload refused, keeping the running configuration: {e}",)
            self._report("config", e)
            return
        self._apply_config(new)

    def _report_startup_refusal(self) -> None:
        """Said once online: the configured bundle was refused at start and an installed one serves."""
        msg = None if self.bundles is None else self.bundles.refused_at_start
        if msg:
            self._report("config", PayloadError("bundle_refused", msg))

    def _apply_config(self, new: Config) -> None:
        old = self.cfg
        fixed = [n for n in ("topic_prefix", "state_dir", "broker", "metrics") if getattr(new, n) != getattr(old, n)]
        for n in ("topic_prefix", "state_dir", "broker", "metrics"):
            setattr(new, n, getattr(old, n))
        if new.limits.queue_size != old.limits.queue_size:
            fixed.append("limits.queue_size")
            new.limits.queue_size = old.limits.queue_size
        if fixed:
            log.warning("reload: %s changed; applied at the next restart", ", ".join(fixed))
        new.path = old.path
        self.cfg = new
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
        lim = new.limits
        self.state.set_limits(lim.recent_ids, lim.pending_samples, lim.max_contexts, lim.early_labels,
                              lim.early_label_ttl_s)
        k = min(new.adaptation.support_size or self.model.recommended_k, self.model.max_support)
        if k != self.k:
            self._resize_support(k)
        if self.bundles is not None:
            self.bundles.set_trust(new.bundle.public_key, new.bundle.allow_unsigned, new.bundle.keep)
        self._next_watch = 0.0
        log.info("configuration reloaded")

    def _poll_watch_dir(self) -> None:
        """New bundle directories in bundle.watch_dir: each is handled once, after it stopped changing
        for one poll (so a half-copied bundle is not even looked at). Dot-names are ignored: copy to
        `.name` and rename to make a drop atomic."""
        b = self.cfg.bundle
        self._next_watch = time.monotonic() + b.watch_interval
        if self.bundles is None:
            return
        try:
            entries = [e for e in os.scandir(b.watch_dir) if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        except OSError as e:
            if self._watch_seen.get("") != str(e):
                log.warning("bundle.watch_dir %s: %s", b.watch_dir, e.strerror or e)
                self._watch_seen[""] = str(e)
            return
        self._watch_seen.pop("", None)
        done = self.bundles.meta["watched"]
        def mtime(e):
            try:
                return e.stat(follow_symlinks=False).st_mtime_ns
            except OSError:  # removed meanwhile
                return 0

        for e in sorted(entries, key=lambda e: (mtime(e), e.name)):
            sig = _dir_signature(e.path)
            if sig is None or done.get(e.name) == sig:
                continue
            if self._watch_seen.get(e.name) != sig:
                self._watch_seen[e.name] = sig  # act on the next poll if it is still the same
                continue
            del self._watch_seen[e.name]
            try:
                self._load_bundle(e.path, f"watch_dir {e.name}")
            except PayloadError as err:
                self._report("watch", err)
            self.bundles.note(watched=(e.name, sig))


def startup_model(cfg: Config):
    """(model, BundleStore) to start with. The configured bundle normally; the last activated one
    (hot reload, rollback) if the configured one is unchanged since it was last activated from the
    config; and the last activated one, loudly, if the configured one is refused: a bad bundle.dir
    (e.g. from a refused SIGHUP reload) must not keep a line down at its next restart. BundleError
    (exit 3) only when neither can serve."""
    from .bundles import BundleStore

    bundles = BundleStore(cfg.state_dir, cfg.bundle.public_key, cfg.bundle.allow_unsigned, cfg.bundle.keep)
    configured, refused = None, None
    try:
        configured = _open_checked(bundles, *bundles.install(cfg.bundle.dir))
    except BundleError as e:
        refused = e
    active = bundles.active
    if configured is not None:
        key, model = configured
        if not active or active == key or bundles.meta.get("config_bundle") != key:
            if active != key or bundles.meta.get("config_bundle") != key:
                bundles.activated(key, from_config=True)
            return model, bundles
    elif not active:
        raise refused
    try:
        model = _open_checked(bundles, *bundles.open_installed(active))[1]
    except BundleError as e:
        if configured is None:
            raise BundleError(f"{refused}; and the last activated bundle {active} is unusable too: {e}") from None
        log.error("last activated bundle %s unusable (%s); starting with the configured %s", active, e,
                  configured[1].version)
        bundles.activated(configured[0], from_config=True)
        return configured[1], bundles
    if configured is None:
        bundles.refused_at_start = (f"configured bundle {cfg.bundle.dir} refused: {refused}; serving the last "
                                    f"activated bundle, model {model.version} ({active}), instead")
        log.error("%s", bundles.refused_at_start)
    else:
        log.info("model %s: the last activated bundle (configured: %s)", model.version, configured[1].version)
    return model, bundles


def _open_checked(bundles, d, manifest) -> tuple[str, Model]:
    """(key, model) of an installed bundle that loads and passes its test run; a refused one is removed."""
    try:
        model = Model(str(d), manifest)
        model.dry_run()
    except Exception as e:  # noqa: BLE001 - onnxruntime and a malformed manifest raise their own types
        bundles.discard(d.name)
        raise e if isinstance(e, BundleError) else BundleError(f"bundle {d.name}: {type(e).__name__}: {e}") from e
    return d.name, model


def _dir_signature(path: str) -> str | None:
    """Names, sizes and mtimes of a directory's files; None without a manifest.json (not a bundle yet)."""
    if not os.path.exists(os.path.join(path, "manifest.json")):
        return None
    parts = []
    for root, _dirs, names in os.walk(path):
        for n in sorted(names):
            try:
                st = os.lstat(os.path.join(root, n))
            except OSError:
                continue
            parts.append(f"{os.path.relpath(os.path.join(root, n), path)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(sorted(parts))
