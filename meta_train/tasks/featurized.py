"""Evaluate a run with its fixed input transform applied once per sample instead of once per inner step.

The model is head(body(transform(x))) and the transform (Standardize / Spectrum) is a buffer-only module
that the inner loop never changes, so f(x) = g(transform(x)) with g the same MLP without the transform and
the same parameter dict. Evaluation adapts for up to 100 steps and scores the query set after every step;
computing a 1024-point Spectrum 100 times per window is what made a 600-episode evaluation take minutes on
a shared CPU. The benchmarks use this; results are the same function (up to float rounding, checked in
tests/tasks/test_featurized.py), and the exported graphs still carry the transform.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..model import build_input_transform, build_model
from . import TaskBatch


class FeatureSource:
    """Wraps a task source: every tensor it returns has been passed through `transform`."""

    def __init__(self, source, transform_spec: dict | None, chunk: int = 4096):
        self.source = source
        self.transform = build_input_transform(transform_spec).eval()
        self.kind, self.loss = source.kind, source.loss
        self.chunk = chunk
        if hasattr(source, "pretrain_classes"):
            self.pretrain_classes = source.pretrain_classes

    @torch.no_grad()
    def _t(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        out = torch.cat([self.transform(flat[i : i + self.chunk]) for i in range(0, len(flat), self.chunk)])
        return out.reshape(*lead, out.shape[-1])

    def sample(self, split, batch, shots, query, generator) -> TaskBatch:
        b = self.source.sample(split, batch, shots, query, generator)
        return TaskBatch(self._t(b.support_x), b.support_y, self._t(b.query_x), b.query_y)

    def pretrain_batch(self, size, generator):
        x, y = self.source.pretrain_batch(size, generator)
        return self._t(x), y

    def model_spec_defaults(self) -> dict:
        return feature_spec(self.source.model_spec_defaults())

    def describe(self) -> dict:
        return self.source.describe()


def feature_spec(spec: dict) -> dict:
    transform = spec.get("input_transform") or {}
    width = int(transform["bins"]) if transform.get("kind") == "spectrum" else int(spec["in_features"])
    return {**spec, "in_features": width, "input_transform": None}


def featurized(trained, source):
    """(trained run on features, source of features): pass both to meta_train.evaluate.evaluate."""
    spec = feature_spec(trained.spec)
    model = build_model(spec)
    model.eval()
    return replace(trained, spec=spec, model=model), FeatureSource(source, trained.spec.get("input_transform"))
