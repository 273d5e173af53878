"""Signed (and deliberately broken) linear bundles for the hot-reload and security tests."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from export.signing import generate_keypair, sign_manifest
from linear_bundle import LinearFamily, make_linear_bundle


class BundleSet:
    """A key pair and bundles of the same line protocol (4 features, regression) in several versions."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.priv, self.pub = generate_keypair(self.base / "keys")
        self.fam = LinearFamily()

    def signed(self, name: str, lr: float) -> Path:
        p = make_linear_bundle(self.base / name, self.fam, lr=lr)
        sign_manifest(p, self.priv)
        return p

    def unsigned(self, name: str, lr: float) -> Path:
        return make_linear_bundle(self.base / name, self.fam, lr=lr)

    def tampered_file(self, name: str, lr: float) -> Path:
        p = self.signed(name, lr)
        with open(p / "init_state.npy", "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(b"\x01" if last != b"\x01" else b"\x02")
        return p

    def tampered_manifest(self, name: str, lr: float) -> Path:
        p = self.signed(name, lr)
        m = json.loads((p / "manifest.json").read_text())
        m["recommended_k"] = 3  # a harmless-looking edit: the signature no longer matches
        (p / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
        return p

    def same_model(self, src: Path, name: str, **manifest_edits) -> Path:
        """A signed copy of `src` with the same model files (so the same model_version) and an edited
        manifest: e.g. other feature names, which the running line refuses after installation."""
        p = self.base / name
        shutil.copytree(src, p)
        (p / "manifest.sig").unlink(missing_ok=True)
        m = json.loads((p / "manifest.json").read_text())
        m.update(manifest_edits)
        (p / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
        sign_manifest(p, self.priv)
        return p

    def incompatible(self, name: str) -> Path:
        fam3 = LinearFamily(mean_x=np.array([200.0, 5.0, 1200.0], np.float32),
                            std_x=np.array([10.0, 0.5, 100.0], np.float32),
                            theta0=np.array([2.0, -1.0, 0.5, 5.0], np.float32))
        p = make_linear_bundle(self.base / name, fam3)
        sign_manifest(p, self.priv)
        return p


def version(bundle_dir: Path) -> str:
    return json.loads((Path(bundle_dir) / "manifest.json").read_text())["model_version"]


def key(bundle_dir: Path) -> str:
    """The name of the bundle's directory once installed in <state_dir>/bundles (docs/edge_agent.md):
    the first 32 hex digits of the SHA-256 of its signed manifest.json."""
    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()[:32]


def drop(bundle_dir: Path, watch_dir: Path, name: str) -> Path:
    """Drop a bundle into a watched directory atomically: copy to a dot-name, then rename."""
    tmp = watch_dir / f".{name}"
    shutil.copytree(bundle_dir, tmp)
    final = watch_dir / name
    tmp.rename(final)
    return final
