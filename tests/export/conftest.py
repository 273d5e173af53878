"""Session fixtures: one hand-made Standardize regression run and its signed bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from export_helpers import QUALITY_SPEC, write_checkpoint


@pytest.fixture(scope="session")
def quality_run(tmp_path_factory) -> Path:
    """Regression with a Standardize transform in raw units (a stand-in for the quality source)."""
    return write_checkpoint(
        tmp_path_factory.mktemp("quality_run"), QUALITY_SPEC, steps=1, lr=0.05,
        source={"name": "quality", "kind": "regression", "feature_names": ["temperature", "pressure", "speed", "feed"],
                "target_name": "quality", "class_names": None},
    )


@pytest.fixture(scope="session")
def quality_bundle(quality_run, tmp_path_factory):
    """Signed, one inner step: the bundle the torch-free tests inspect."""
    from export.bundle import export_bundle
    from export.signing import generate_keypair

    keys = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(keys)
    out = tmp_path_factory.mktemp("bundles") / "quality"
    result = export_bundle(quality_run, out, sign_key=priv, max_support=16, log=lambda *_: None)
    return result.path, pub
