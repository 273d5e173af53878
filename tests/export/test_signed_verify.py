"""A signed bundle passes the device's verifier (edge_agent/verify.py), run torch-free in a subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_signed_bundle_passes_edge_verifier(quality_bundle):
    if not (REPO / "edge_agent" / "verify.py").exists():
        pytest.skip("edge_agent/verify.py does not exist yet (another engineer's file)")
    bundle, pub = quality_bundle
    assert (bundle / "manifest.sig").stat().st_size == 64
    code = (
        "import sys\n"
        "for n in ('torch', 'meta_train', 'export'): sys.modules[n] = None\n"
        "from edge_agent.verify import main_verify\n"
        "sys.exit(main_verify(sys.argv[1], sys.argv[2]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(bundle), str(pub)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK")


def test_python_m_edge_agent_verify(quality_bundle):
    if not (REPO / "edge_agent" / "__main__.py").exists():
        pytest.skip("edge_agent/__main__.py (the `python -m edge_agent` CLI) does not exist yet")
    bundle, pub = quality_bundle
    r = subprocess.run([sys.executable, "-m", "edge_agent", "verify", str(bundle), "--public-key", str(pub)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_device_model_loads_and_adapts(quality_bundle):
    """edge_agent/model.py (the device's loader) accepts the bundle and runs adapt + predict, torch-free."""
    if not (REPO / "edge_agent" / "model.py").exists():
        pytest.skip("edge_agent/model.py does not exist yet (another engineer's file)")
    bundle, pub = quality_bundle
    code = (
        "import sys\n"
        "for n in ('torch', 'meta_train', 'export'): sys.modules[n] = None\n"
        "import numpy as np\n"
        "from edge_agent.model import Model, load_manifest\n"
        "m = Model(sys.argv[1], load_manifest(sys.argv[1], sys.argv[2], False))\n"
        "mean = np.array(m.manifest['preprocessing']['mean'], np.float32)\n"
        "x = mean + np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)\n"
        "state = m.adapt(x, np.linspace(0, 1, 12, dtype=np.float32))\n"
        "assert not np.array_equal(state, m.init_state)\n"
        "y = m.predict(state, x[:3])\n"
        "assert y.shape == (3,) and np.isfinite(y).all(), y\n"
        "print('ok', m.version)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(bundle), str(pub)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")
