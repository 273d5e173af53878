import pytest
import torch

from meta_train.model import build_model, init_params
from meta_train.tasks.sinusoid import SinusoidOptions, SinusoidSource


@pytest.fixture
def sinusoid_setup():
    model = build_model({"in_features": 1, "hidden": [40, 40], "out_features": 1})
    gen = torch.Generator().manual_seed(0)
    params = {k: v.requires_grad_() for k, v in init_params(model, gen).items()}
    batch = SinusoidSource(SinusoidOptions()).sample("train", 6, 10, 10, gen)
    return model, params, batch
