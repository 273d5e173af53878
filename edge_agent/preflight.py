"""`edge-agent check-config`: every file the config names, checked the way the service will read it.

The shipped unit runs the agent as a systemd DynamicUser: a uid that owns no file and is in no group,
so outside the credentials directory only the "other" permission bits count (on the file, and x on
every directory above it). A root-owned 0600 secret passes `cat` as root yet makes the service exit
2; here it fails with the file named. Secrets belong in LoadCredential= (docs: deploy/systemd).
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .credentials import read_password_file
from .errors import ConfigError


@dataclass(frozen=True)
class ServiceUser:
    """Who the service runs as: `dynamic` (a DynamicUser), `current` (this process), or an account."""

    name: str
    uid: int | None = None  # None: owns nothing (DynamicUser)
    gids: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, spec: str) -> "ServiceUser":
        if spec in ("dynamic", "current"):
            return cls(spec)
        try:
            pw = pwd.getpwnam(spec)
        except KeyError:
            raise ConfigError(f"--service-user: no account named {spec!r}") from None
        return cls(spec, pw.pw_uid, frozenset(os.getgrouplist(spec, pw.pw_gid)))

    def describe(self) -> str:
        return {"dynamic": "the service's DynamicUser", "current": "the current user"}.get(self.name, self.name)


def _denied(path: Path, user: ServiceUser, want: int) -> str | None:
    """Why `user` cannot access `path` with `want` (4: read, 5: read+list), judged from the mode bits of
    the path and every directory above it; None if it can."""
    if user.name == "current":
        return None if os.access(path, os.R_OK | (os.X_OK if want == 5 else 0)) else "permission denied"
    chain = [(p, 1) for p in reversed(path.parents)] + [(path, want)]
    for p, need in chain:
        try:
            st = os.stat(p)
        except OSError as e:
            return f"{p}: {e.strerror}"
        if user.uid == 0:
            continue
        if user.uid is not None and st.st_uid == user.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in user.gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if bits & need != need:
            owner = _owner(st.st_uid)
            what = "directory" if stat.S_ISDIR(st.st_mode) else "file"
            return f"{what} {p} is mode {stat.S_IMODE(st.st_mode):04o}, owner {owner}"
    return None


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _files(cfg: Config) -> list[tuple[str, str, int]]:
    """(config key, path, 4 file / 5 directory) of everything the agent reads at start-up."""
    out = [("bundle.dir", cfg.bundle.dir, 5)]
    bundle = Path(cfg.bundle.dir)
    if bundle.is_dir():
        out += [("bundle.dir", str(f), 4) for f in sorted(bundle.iterdir()) if f.is_file()]
    if cfg.bundle.public_key:
        out.append(("bundle.public_key", cfg.bundle.public_key, 4))
    if cfg.broker.password_file:
        out.append(("broker.password_file", cfg.broker.password_file, 4))
    if cfg.broker.tls is not None:
        for key in ("ca", "cert", "key"):
            path = getattr(cfg.broker.tls, key)
            if path:
                out.append((f"broker.tls.{key}", path, 4))
    return out


def check_files(cfg: Config, user: ServiceUser, credentials_dir: str | None = None) -> list[str]:
    """Raise ConfigError naming the first file the service could not read; return the files checked."""
    checked = []
    cred = Path(credentials_dir).resolve() if credentials_dir else None
    for key, path, want in _files(cfg):
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{key}: {p} does not exist")
        if want == 5 and not p.is_dir():
            raise ConfigError(f"{key}: {p} is not a directory")
        # systemd hands credentials to the service itself, whatever their source's mode.
        in_cred = cred is not None and (cred == p.resolve().parent or cred in p.resolve().parents)
        why = None if in_cred else _denied(p, user, want)
        if why:
            hint = ""
            if key in ("broker.password_file", "broker.tls.key"):
                hint = (f"; hand secrets over with LoadCredential=<name>:{p} in the unit and set {key}: "
                        f"$CREDENTIALS_DIRECTORY/<name>")
            raise ConfigError(f"{key}: {p} is not readable by {user.describe()} ({why}){hint}")
        if want == 4:
            try:
                with open(p, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(f"{key}: cannot read {p}: {e.strerror}") from None
        checked.append(str(p))
    if cfg.broker.password_file:
        read_password_file(cfg.broker.password_file)  # empty, two lines, not UTF-8: named, not shown
    return checked
