"""The two baselines every meta-learned initialisation must beat, adapted by the very same inner loop.

- scratch: a random initialisation.
- pretrain + fine-tune: one network trained jointly on samples pooled over all training tasks (the
  "transfer learning" answer). For classification it is trained on the global class labels, and its head
  is replaced by a zero head of the episode's N-way size before fine-tuning, since episode labels are
  shuffled per task and a fixed head would only encode the shuffle.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from .inner import loss_value
from .model import build_model, init_params


def scratch_params(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    return init_params(build_model(spec), torch.Generator().manual_seed(seed))


@torch.enable_grad()  # evaluation runs under no_grad; joint training needs gradients
def pretrain_params(spec: dict, source, iterations: int, batch: int, lr: float, seed: int) -> dict[str, torch.Tensor]:
    classification = source.kind == "classification"
    pre_spec = dict(spec)
    if classification:
        pre_spec["out_features"] = int(source.pretrain_classes)
    model = build_model(pre_spec)
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.requires_grad_() for n, p in init_params(model, gen).items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(iterations):
        x, y = source.pretrain_batch(batch, gen)
        loss = loss_value(functional_call(model, params, (x,)), y, source.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = {n: p.detach() for n, p in params.items()}
    if classification:
        width = params["head.weight"].shape[1]
        params["head.weight"] = torch.zeros(int(spec["out_features"]), width)
        params["head.bias"] = torch.zeros(int(spec["out_features"]))
    return params
