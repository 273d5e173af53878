"""Run directory -> bundle directory (docs/bundle.md), all or nothing.

Everything is written into a scratch directory next to the destination and moved into place only
after parity has passed and the manifest is signed, so a failed export never leaves a bundle behind
that a device could pick up.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_agent.model import ort_session  # parity is proven under the device's own session settings
from meta_train.trained import load_trained

from . import manifest as manifest_mod
from . import onnx_export, parity, population, torchscript
from .errors import ExportError, SigningKeyError
from .signing import MANIFEST_NAME, SIGNATURE_NAME, load_private_key, sign_manifest
from .trace import Functions, trace

BUNDLE_FILES = ["adapt.onnx", "predict.onnx", "init_state.npy", "model.pt"]
POPULATION_FILE = "population_state.npy"  # the pooled model's state for predict.onnx (export/population.py)
DEFAULT_MAX_SUPPORT = 64
PARITY_TASKS = 20
# Names what really exists on the device side: the agent's config key (edge_agent/config.py) and the flag of
# `edge-agent verify`; `edge-agent run` takes only --config.
UNSIGNED_WARNING = ("meta-export: warning: no --sign-key given; this bundle is UNSIGNED: an agent refuses it "
                    "unless its config sets bundle.allow_unsigned: true, and `edge-agent verify` unless given "
                    "--allow-unsigned (development only)")


@dataclass
class Exported:
    path: Path
    manifest: dict
    signed: bool


def _backends(work: Path, script_module) -> dict:
    adapt_s, predict_s = ort_session(work / "adapt.onnx"), ort_session(work / "predict.onnx")

    def ort_adapt(sx, sy, sw):
        return adapt_s.run(None, {"support_x": sx, "support_y": sy, "support_w": sw})[0]

    def ort_predict(state, x):
        return predict_s.run(None, {"state": state, "x": x})[0]

    def ts_adapt(sx, sy, sw):
        with torch.no_grad():
            return script_module.adapt(torch.from_numpy(sx), torch.from_numpy(sy), torch.from_numpy(sw)).numpy()

    def ts_predict(state, x):
        with torch.no_grad():
            return script_module.predict(torch.from_numpy(state), torch.from_numpy(x)).numpy()

    return {"onnx": (ort_adapt, ort_predict), "torchscript": (ts_adapt, ts_predict)}


def _prepare_destination(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory")
        known = set(BUNDLE_FILES) | {POPULATION_FILE, MANIFEST_NAME, SIGNATURE_NAME}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in known)
        if foreign:
            # Replacing a previous bundle is fine; deleting someone's other files is not.
            raise ExportError(f"{out} holds files that are not part of a bundle ({', '.join(foreign)}); "
                              "choose an empty or new directory")


def export_bundle(run, out, *, sign_key=None, max_support: int = DEFAULT_MAX_SUPPORT, steps: int | None = None,
                  parity_tasks: int = PARITY_TASKS, optimize: bool = True, population_model: bool | None = None,
                  pooled: bool = False, population_tasks: int = population.VAL_TASKS, log=print) -> Exported:
    """`population_model`: ship the pooled model next to the meta-init, with the expected-error curves
    the device picks its predictor by (None: for regression runs). `pooled`: the bundle IS the pooled
    model (fine-tuned on the device at the baseline's rate), for a run whose verdict is "use a pooled model"."""
    out = Path(out)
    if max_support < 1:
        raise ExportError(f"--max-support must be >= 1, got {max_support}")
    if sign_key is not None:
        try:  # fail before the minutes of tracing and parity, not after
            load_private_key(sign_key)
        except (OSError, ValueError, TypeError) as e:
            raise SigningKeyError(f"signing key {sign_key}: {e}") from None
    _prepare_destination(out)
    trained = load_trained(run)
    auto = population_model is None
    if auto:
        population_model = not pooled
    source = pooled_p = None
    if population_model or pooled:
        try:
            source = population.source_of(trained)
            why = population.unsupported(trained, source)
        except Exception as e:  # noqa: BLE001 - any source failure (missing data file, unknown name) means the same
            source, why = None, f"the run's task source cannot be built here ({e})"
        if why is not None:
            if pooled or not auto:
                raise ExportError(f"no pooled / population model for this run: {why}")
            source = None
            print(f"meta-export: warning: no population model in this bundle: {why}; the device will use the "
                  "meta-init / adapted model only", file=sys.stderr)
    if source is not None:
        log("training the pooled model (the meta run's compute budget, early-stopped on validation tasks)")
        pooled_p, pooled_info = population.pooled_with_budget(trained, source)
        log(f"pooled model: {pooled_info['iterations_run']} of {pooled_info['iterations_budget']} iterations of "
            f"batch {pooled_info['batch']}, best on validation at iteration {pooled_info['best_iteration']}")
        if pooled:
            trained = population.as_pooled_run(trained, pooled_p)
    try:
        fns = Functions(trained, steps)
    except ValueError as e:
        raise ExportError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            adapt_gm, predict_gm = trace(fns, max_support, optimize=optimize)
        except Exception as e:  # make_fx failures come in many types; all mean "cannot build the graphs"
            raise ExportError(f"tracing adapt/predict failed: {type(e).__name__}: {e}") from e
        adapt_args, predict_args = fns.example_inputs(max_support)
        onnx_export.export_adapt(adapt_gm, adapt_args, max_support, work / "adapt.onnx")
        onnx_export.export_predict(predict_gm, predict_args, work / "predict.onnx")
        script = torchscript.export_torchscript(adapt_gm, predict_gm, work / "model.pt")
        np.save(work / "init_state.npy", fns.init_state().numpy().astype(np.float32), allow_pickle=False)

        k = manifest_mod.recommended_k(fns, max_support)
        result = parity.check(fns, _backends(work, script), parity_tasks, k, max_support)
        log(f"parity on {result.tasks} tasks ({result.task_source}), support sizes {result.support_sizes} (+ padded): "
            + ", ".join(f"{b} max|dy| {v['y']:.2e} max|dstate| {v['state']:.2e}" for b, v in result.max_abs.items()))

        files = list(BUNDLE_FILES)
        predictors = None
        if source is not None:
            pop_state, pop_file = None, "init_state.npy"  # a pooled bundle's init is the population model
            if not pooled:
                pop_state, pop_file = fns.layout.flatten(pooled_p).float(), POPULATION_FILE
                np.save(work / pop_file, pop_state.numpy().astype(np.float32), allow_pickle=False)
                files.append(pop_file)
            curves = population.expected_errors(fns, fns.init_state() if pooled else pop_state, source, max_support,
                                                tasks=population_tasks, seed=int(trained.config.seed))
            predictors = manifest_mod.predictors(pop_file, curves, pooled_info)
            log(f"expected {curves['metric']} on {curves['tasks']} validation tasks: population {curves['population']:.4g}, "
                + ", ".join(f"K={k} {curves['adapted'][k]:.4g}" for k in (0, 1, 5, 10) if k <= max_support))
        manifest = manifest_mod.build(fns, work, max_support=max_support, parity=result.to_manifest(),
                                      files=files, predictors=predictors)
        manifest_mod.write(manifest, work)
        if sign_key is not None:
            try:
                sign_manifest(work, sign_key)
            except (OSError, ValueError) as e:
                raise SigningKeyError(f"signing with {sign_key} failed: {e}") from e
        else:
            print(UNSIGNED_WARNING, file=sys.stderr)
        work.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from a copying or serving user
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return Exported(out, manifest, sign_key is not None)
