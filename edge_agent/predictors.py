"""Which model answers a sample: the population model, the bare meta-initialisation, or the adapted one.

The bundle's manifest (`predictors`, docs/bundle.md) says how large each one's error is expected to be
against the number of labels K the context has been adapted on, measured on the workstation's
validation tasks: the population model (trained on every past line pooled; it does not adapt) and the
shipped initialisation adapted on K labels (K = 0: the bare initialisation). For each prediction the
agent takes the one with the smaller expected error at the context's current K and says which in the
prediction's `source` field. A bundle without `predictors` (older exports, classification runs)
behaves as before: the adapted state once there is one, else the initialisation.

Torch-free: numpy only; the population model is a state vector for the bundle's own predict graph.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import BundleError
from .calibration import Calibration
from .intervals import Quantiles

POPULATION, ADAPTED, META_INIT = "population", "adapted", "meta_init"


class Predictors:
    def __init__(self, population_state: np.ndarray | None, population_error: float | None,
                 adapted_error: list[float] | None, population_is_init: bool = False, quantiles=None,
                 calibration=None):
        self.population_state = population_state
        self.population_error = population_error
        self.adapted_error = adapted_error  # index K = labels adapted on (0 = bare init)
        self.population_is_init = population_is_init
        self.quantiles = quantiles  # intervals.Quantiles: |residual| per predictor and K, or None
        self.calibration = calibration  # calibration.Calibration (classification), or None

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, manifest: dict, init_state: np.ndarray) -> "Predictors":
        spec = manifest.get("predictors")
        if spec is None:
            return cls(None, None, None)
        try:
            name = str(spec["population"]["file"])
            curves = spec["expected_error"]
            pop_err = float(curves["population"])
            adapted = [float(v) for v in curves["adapted"]]
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest predictors: malformed ({type(e).__name__}: {e})") from None
        if not adapted or not all(math.isfinite(v) for v in adapted + [pop_err]):
            raise BundleError("manifest predictors.expected_error: empty or non-finite curve")
        try:
            quantiles = Quantiles.from_manifest(manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest predictors.expected_error.abs_residual_quantiles: malformed ({e})") from None
        try:
            calibration = Calibration.from_manifest(manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest predictors.expected_error.calibration: malformed ({e})") from None
        if name not in manifest.get("files", {}):
            raise BundleError(f"manifest predictors.population.file {name!r} is not a listed (hashed) bundle file")
        if name == "init_state.npy":
            return cls(init_state, pop_err, adapted, population_is_init=True, quantiles=quantiles,
                       calibration=calibration)
        try:
            state = np.load(Path(bundle_dir) / name, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BundleError(f"{name}: cannot load: {e}") from e
        if state.dtype != np.float32 or state.shape != init_state.shape:
            raise BundleError(f"{name} is {state.dtype}{list(state.shape)}, expected float32{list(init_state.shape)}")
        return cls(state, pop_err, adapted, quantiles=quantiles, calibration=calibration)

    @property
    def has_population(self) -> bool:
        return self.population_state is not None

    def expected(self, k: int) -> float:
        """Expected error of the own (meta-init / adapted) model after adapting on k labels."""
        a = self.adapted_error
        return a[min(max(k, 0), len(a) - 1)]  # beyond max_support the device adapts on max_support anyway

    def choose(self, adapted_state: np.ndarray | None, n_support: int, init_state: np.ndarray) -> tuple[str, np.ndarray]:
        """(source, state) for a context whose adapted state (None: not adapted yet) used n_support labels."""
        if adapted_state is None:
            own = (META_INIT, init_state, 0)
        else:
            own = (ADAPTED, adapted_state, n_support)
        if self.population_state is not None and self.population_error < self.expected(own[2]):
            return POPULATION, self.population_state
        if self.population_is_init and own[0] == META_INIT:
            return POPULATION, init_state  # a pooled bundle: its initialisation is the population model
        return own[0], own[1]


_PLAIN = Predictors(None, None, None)


def of(model) -> Predictors:
    """The model's predictors; a model object without them (a test stub) predicts as before."""
    return getattr(model, "predictors", None) or _PLAIN
