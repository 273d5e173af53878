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
        try:
            d, manifest = self.bundles.install(src)
            version = str(manifest["model_version"])
            if from_config and version == self.bundles.meta.get("config_version"):
                return False  # the configured bundle did not change; keep what was activated since
            if version == old:
                log.info("bundle %s (%s) is already serving", version, origin)
                if from_config or command_id is not None:
                    self.bundles.activated(version, config_version=version if from_config else None,
                                           command_id=command_id)
                return False
            model = Model(str(d), manifest)
            states = self._prepare_model(model)
        except BundleError as e:
            log.error("bundle from %s refused (%s): %s; model %s keeps serving", src, origin, e, old)
            raise PayloadError("bundle_refused", f"bundle {src} refused: {e}; model {old} keeps serving",
                               command_id) from None
        self._swap_model(model, states)
        self.bundles.activated(version, config_version=version if from_config else None, command_id=command_id)
        self.store.compact(self.state)
        log.info("model %s -> %s (%s); %d context(s) re-adapted", old, version, origin, len(states))
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
        log.info("rolled back: model %s -> %s; %d context(s) re-adapted", old, target, len(states))

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
            xs = np.stack([x for _, x, _ in c.support])
            ys = np.asarray([y for _, _, y in c.support])
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
            self._apply_config(new)
            try:
                self._load_bundle(self.cfg.bundle.dir, "config reload", from_config=True)
            except PayloadError as e:
                self._report("config", e)
        self.obs.on_reloaded(self.model.version)
        self._update_status()

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
        self.state.set_limits(new.limits.recent_ids, new.limits.pending_samples)
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
