"""The adapt graph really performs gradient descent: checked in a process that cannot import torch.

The reference is one SGD step on the MLP written out by hand in numpy (standardise, forward, weighted
MSE, backward), from nothing but the bundle: init_state, state_layout, preprocessing and the rate.
"""

import json
import subprocess
import sys
import textwrap

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    r"""
    import sys
    for name in ("torch", "meta_train", "export"):
        sys.modules[name] = None  # any `import torch` below raises ImportError

    import json
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    bundle = Path(sys.argv[1])
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["task_kind"] == "regression" and m["loss"] == "mse" and m["inner"]["steps"] == 1
    assert m["inner"]["lr_mode"] == "fixed" and not m["inner"]["head_only"]
    init = np.load(bundle / "init_state.npy", allow_pickle=False)
    P = {e["name"]: init[e["offset"]: e["offset"] + int(np.prod(e["shape"]))].reshape(e["shape"])
         for e in m["state_layout"]}
    lr = {n: float(v) for n, v in m["inner"]["lr_summary"].items()}
    mean = np.array(m["preprocessing"]["mean"], np.float64)
    std = np.array(m["preprocessing"]["std"], np.float64)
    layers = ["body.0", "body.2", "head"]

    def sgd_step(x, y, w):
        P64 = {k: v.astype(np.float64) for k, v in P.items()}
        a = [(x - mean) / std]
        pre = []
        for i, l in enumerate(layers):
            z = a[-1] @ P64[l + ".weight"].T + P64[l + ".bias"]
            pre.append(z)
            a.append(np.maximum(z, 0.0) if i < len(layers) - 1 else z)
        pred = a[-1][:, 0]
        # loss = sum(w * (pred - y)^2) / max(sum(w), 1e-6)
        g = (2.0 * w * (pred - y) / max(w.sum(), 1e-6))[:, None]
        new = {}
        for i in reversed(range(len(layers))):
            l = layers[i]
            if i < len(layers) - 1:
                g = g * (pre[i] > 0)
            new[l + ".weight"] = P64[l + ".weight"] - lr[l + ".weight"] * (g.T @ a[i])
            new[l + ".bias"] = P64[l + ".bias"] - lr[l + ".bias"] * g.sum(0)
            g = g @ P64[l + ".weight"]
        return np.concatenate([new[e["name"]].reshape(-1) for e in m["state_layout"]])

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / "adapt.onnx"), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst, moved = 0.0, 0.0
    for n in (1, 5, m["max_support"]):
        for _ in range(3):
            x = (mean + std * rng.standard_normal((n, len(mean)))).astype(np.float32)
            y = rng.standard_normal(n).astype(np.float32)
            w = np.ones(n, np.float32)
            if n > 2:
                w[n // 2:] = 0.0  # padding must not count
            got = sess.run(None, {"support_x": x, "support_y": y, "support_w": w})[0]
            want = sgd_step(x.astype(np.float64), y.astype(np.float64), w.astype(np.float64))
            worst = max(worst, float(np.abs(got - want).max()))
            moved = max(moved, float(np.abs(want - init).max()))
    print(json.dumps({"max_abs": worst, "moved": moved, "torch_loaded": "torch" in sys.modules and sys.modules["torch"] is not None}))
    """
)


def test_one_adapt_step_is_numpy_sgd(quality_bundle):
    bundle, _ = quality_bundle
    r = subprocess.run([sys.executable, "-c", CHILD, str(bundle)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["torch_loaded"]
    assert out["moved"] > 1e-3, "the step did not move the parameters: nothing to compare"
    assert out["max_abs"] <= 1e-5, out


def test_child_really_cannot_import_torch():
    code = "import sys; sys.modules['torch'] = None\ntry:\n import torch\nexcept ImportError:\n print('blocked')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "blocked"
