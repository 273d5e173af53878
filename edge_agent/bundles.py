"""Installed bundles: what the agent runs, what it ran before, and how it comes back after a restart.

Every bundle the agent activates (from `bundle.dir`, a `load_bundle` command or `bundle.watch_dir`) is
first copied into `<state_dir>/bundles/<key>/`: copied to a temporary directory, verified there
(signature + hashes, docs/bundle.md: so a source that changes during the copy cannot slip through),
fsynced and renamed into place. The key is the SHA-256 (first 32 hex digits) of the signed
`manifest.json`, not the `model_version`: that covers only the model files, so two bundles with the
same model files and different manifests (one of them refused) would otherwise share one directory,
and the refused copy would be reused for the valid one. A bundle refused after installation (it
does not load, fails its test run, or does not fit the running line) is removed again at once.
`<state_dir>/bundles/active.json` (written atomically) says which one is active and the activation
history (the rollback stack), by key:

    {"active": "9c0e...", "history": ["41d7...", "9c0e..."], "config_bundle": "41d7...",
     "watched": {"release-42": "<signature of that directory>"}, "last_command": "cmd-17"}

At start the agent runs the last activated bundle, unless the bundle in `bundle.dir` is a different
one than it recorded from there last time (`config_bundle`): then the operator changed the configured
bundle, and that one is activated. If the configured bundle is refused at start, the agent falls back
to the last activated installed bundle (docs/edge_agent.md). Installed copies are verified again every
time they are loaded (with the configured key), so a bundle edited inside the state directory is
refused too. (Older agents named the directories by model_version; those are still opened.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from .errors import BundleError
from .state import _fsync_dir, atomic_write
from .verify import verify_bundle

log = logging.getLogger(__name__)

META = "active.json"
_SAFE_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class BundleStore:
    def __init__(self, state_dir: str, public_key: str | None, allow_unsigned: bool, keep: int = 5):
        self.root = Path(state_dir) / "bundles"
        self.public_key, self.allow_unsigned, self.keep = public_key, allow_unsigned, keep
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from .errors import StateError

            raise StateError(f"cannot create {self.root}: {e.strerror}") from e
        self.meta = self._read_meta()
        self.refused_at_start: str | None = None  # set by lifecycle.startup_model, reported once online
        for p in self.root.glob(".incoming-*"):  # left by a crash mid-copy
            shutil.rmtree(p, ignore_errors=True)

    # -- metadata ----------------------------------------------------------------------------------
    def _read_meta(self) -> dict:
        meta = {"active": None, "history": [], "config_bundle": None, "watched": {}, "last_command": None}
        p = self.root / META
        if p.exists():
            try:
                d = json.loads(p.read_bytes())
                if isinstance(d, dict):
                    meta.update({k: d[k] for k in meta if k in d})
                    if "config_bundle" not in d and d.get("config_version"):
                        # older agents: the key was the model_version, which is also the directory name
                        meta["config_bundle"] = d["config_version"]
            except ValueError as e:
                log.error("%s unreadable (%s); starting from the configured bundle", p, e)
        return meta

    def _write_meta(self) -> None:
        atomic_write(self.root / META, json.dumps(self.meta, indent=1).encode())

    @property
    def active(self) -> str | None:
        return self.meta["active"]

    def previous(self) -> str | None:
        h = self.meta["history"]
        return h[-2] if len(h) >= 2 else None

    # -- verification and installation ------------------------------------------------------------
    def set_trust(self, public_key: str | None, allow_unsigned: bool, keep: int) -> None:
        self.public_key, self.allow_unsigned, self.keep = public_key, allow_unsigned, keep

    def verify(self, path) -> dict:
        return verify_bundle(path, public_key_path=self.public_key, allow_unsigned=self.allow_unsigned,
                             isolate_signature=True)

    def install(self, src) -> tuple[Path, dict]:
        """Verify `src`, copy it into the store (verified again there), return (installed dir, manifest).
        The directory's name is the bundle's key (manifest_key)."""
        src = Path(src)
        manifest = self.verify(src)  # errors name the source the operator gave us
        key = manifest_key(src)
        dst = self.root / key
        if dst.exists():
            try:
                m = self.verify(dst)
                if manifest_key(dst) == key:
                    return dst, m
                raise BundleError("its manifest is not the one its directory is named after")
            except BundleError as e:
                aside = self.root / f".bad-{key}-{int(time.time())}"
                log.error("installed bundle %s fails verification (%s); replaced, evidence in %s", key, e, aside.name)
                os.replace(dst, aside)
        tmp = self.root / f".incoming-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(src, tmp, symlinks=True)  # a symlink stays a symlink, and verify refuses it
            for root, _dirs, names in os.walk(tmp):
                for n in names:
                    p = os.path.join(root, n)
                    if not os.path.islink(p):
                        fd = os.open(p, os.O_RDONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
                _fsync_dir(Path(root))
            copied = self.verify(tmp)
            if manifest_key(tmp) != key:
                raise BundleError(f"bundle {src} changed while it was being installed")
            os.replace(tmp, dst)
            _fsync_dir(self.root)
        except OSError as e:
            raise BundleError(f"cannot install bundle {src} into {self.root}: {e.strerror or e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("installed bundle %s (model %s) from %s", key, manifest["model_version"], src)
        return dst, copied

    def discard(self, key: str) -> None:
        """Remove an installed bundle that was refused after installation (never one in the history):
        kept, it would only take disk space and be mistaken for a usable one later."""
        if key in self.meta["history"] or key == self.meta["active"] or not _SAFE_VERSION.match(key):
            return
        shutil.rmtree(self.root / key, ignore_errors=True)
        log.info("removed refused bundle %s from %s", key, self.root)

    def open_installed(self, key: str) -> tuple[Path, dict]:
        d = self.root / key
        if not _SAFE_VERSION.match(key) or not d.is_dir():
            raise BundleError(f"bundle {key} is not installed in {self.root}")
        return d, self.verify(d)

    # -- activation history ------------------------------------------------------------------------
    def activated(self, key: str, *, from_config: bool = False, command_id=None) -> None:
        h = [v for v in self.meta["history"] if v != key] + [key]
        self.meta["history"] = h[-self.keep:]
        self.meta["active"] = key
        if from_config:
            self.meta["config_bundle"] = key
        if command_id is not None:
            self.meta["last_command"] = command_id
        self._write_meta()
        self._prune()

    def rolled_back(self, key: str, command_id=None) -> None:
        h = self.meta["history"]
        while h and h[-1] != key:
            h.pop()
        self.meta["active"] = key
        if command_id is not None:
            self.meta["last_command"] = command_id
        self._write_meta()
        self._prune()

    def note(self, *, command_id=None, watched: tuple[str, str] | None = None) -> None:
        if command_id is not None:
            self.meta["last_command"] = command_id
        if watched is not None:
            self.meta["watched"][watched[0]] = watched[1]
        self._write_meta()

    def _prune(self) -> None:
        keep = set(self.meta["history"]) | {self.meta["active"]}
        for p in self.root.iterdir():
            if p.is_dir() and not p.name.startswith(".") and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed installed bundle %s (beyond bundle.keep)", p.name)


def manifest_key(bundle_dir) -> str:
    """What an installed bundle is keyed by: the digest of its (signed) manifest.json."""
    try:
        return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()[:32]
    except OSError as e:
        raise BundleError(f"{bundle_dir}: cannot read manifest.json: {e.strerror or e}") from e
