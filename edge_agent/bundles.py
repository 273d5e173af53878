"""Installed bundles: what the agent runs, what it ran before, and how it comes back after a restart.

Every bundle the agent activates (from `bundle.dir`, a `load_bundle` command or `bundle.watch_dir`) is
first copied into `<state_dir>/bundles/<model_version>/`: copied to a temporary directory, verified
there (signature + hashes, docs/bundle.md: so a source that changes during the copy cannot slip
through), fsynced and renamed into place. `<state_dir>/bundles/active.json` (written atomically) says
which one is active and the activation history (the rollback stack):

    {"active": "3f2a...", "history": ["0a1b...", "3f2a..."], "config_version": "0a1b...",
     "watched": {"release-42": "<signature of that directory>"}, "last_command": "cmd-17"}

At start the agent runs the last activated bundle, unless the bundle in `bundle.dir` is a different
version than the one it recorded from there last time: then the operator changed the configured
bundle, and that one is activated. Installed copies are verified again every time they are loaded
(with the configured key), so a bundle edited inside the state directory is refused too.
"""

from __future__ import annotations

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
        for p in self.root.glob(".incoming-*"):  # left by a crash mid-copy
            shutil.rmtree(p, ignore_errors=True)

    # -- metadata ----------------------------------------------------------------------------------
    def _read_meta(self) -> dict:
        meta = {"active": None, "history": [], "config_version": None, "watched": {}, "last_command": None}
        p = self.root / META
        if p.exists():
            try:
                d = json.loads(p.read_bytes())
                if isinstance(d, dict):
                    meta.update({k: d[k] for k in meta if k in d})
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
        """Verify `src`, copy it into the store (verified again there), return (installed dir, manifest)."""
        src = Path(src)
        manifest = self.verify(src)  # errors name the source the operator gave us
        version = str(manifest["model_version"])
        if not _SAFE_VERSION.match(version):
            raise BundleError(f"model_version {version!r} is not a safe directory name")
        dst = self.root / version
        if dst.exists():
            try:
                return dst, self.verify(dst)
            except BundleError as e:
                aside = self.root / f".bad-{version}-{int(time.time())}"
                log.error("installed bundle %s fails verification (%s); replaced, evidence in %s", version, e, aside.name)
                os.replace(dst, aside)
        tmp = self.root / f".incoming-{version}-{os.getpid()}"
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
            if str(copied["model_version"]) != version:
                raise BundleError(f"bundle {src} changed while it was being installed")
            os.replace(tmp, dst)
            _fsync_dir(self.root)
        except OSError as e:
            raise BundleError(f"cannot install bundle {src} into {self.root}: {e.strerror or e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("installed bundle %s from %s", version, src)
        return dst, copied

    def open_installed(self, version: str) -> tuple[Path, dict]:
        d = self.root / version
        if not _SAFE_VERSION.match(version) or not d.is_dir():
            raise BundleError(f"bundle {version} is not installed in {self.root}")
        return d, self.verify(d)

    # -- activation history ------------------------------------------------------------------------
    def activated(self, version: str, *, config_version: str | None = None, command_id=None) -> None:
        h = [v for v in self.meta["history"] if v != version] + [version]
        self.meta["history"] = h[-self.keep:]
        self.meta["active"] = version
        if config_version is not None:
            self.meta["config_version"] = config_version
        if command_id is not None:
            self.meta["last_command"] = command_id
        self._write_meta()
        self._prune()

    def rolled_back(self, version: str, command_id=None) -> None:
        h = self.meta["history"]
        while h and h[-1] != version:
            h.pop()
        self.meta["active"] = version
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
