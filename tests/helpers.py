"""Test helpers: build adapted models reproducibly and change ranks by hand."""

from __future__ import annotations

import torch
from peft import get_peft_model

from tucker_lora import TuckerAdapterConfig, TuckerLayer
from tucker_lora.tucker_ops import random_orthonormal


def adapted(case, seed: int = 0, **overrides):
    """(base model, peft model, inputs) for a case; the base is rebuilt from the same seed each time."""
    torch.manual_seed(seed)
    model = case.make_model()
    config = TuckerAdapterConfig(**{**case.config, **overrides})
    return get_peft_model(model, config), case.make_inputs()


def fresh_base(case, seed: int = 0):
    torch.manual_seed(seed)
    return case.make_model()


def run(model, case, inputs) -> torch.Tensor:
    with torch.no_grad():
        return case.output_of(model(**inputs))


def tucker_layers(model):
    return [m for m in model.modules() if isinstance(m, TuckerLayer)]


def set_ranks_by_hand(layer: TuckerLayer, adapter: str, ranks: list[int], seed: int = 0) -> None:
    """Give `adapter` new ranks with fresh orthonormal bases and a random core block, zero outside it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for basis, rank in zip(layer.tucker_bases[adapter], ranks):
            basis.zero_()
            basis[:, :rank] = random_orthonormal(basis.shape[0], rank, generator=generator)
        core = layer.tucker_core[adapter]
        core.zero_()
        block = tuple(slice(0, r) for r in ranks)
        core[block] = torch.randn(core[block].shape, generator=generator)
    layer.set_active_ranks(adapter, ranks)


def reduction_size(model: torch.nn.Module) -> int:
    """Sum of the fan-ins of every Linear and Conv2d of `model` (base layers only): an upper bound on the number of
    rounded products an output accumulates along the network, for `tests.tolerances.reduction_tol`."""
    total = 0
    for module in model.modules():
        if isinstance(module, TuckerLayer):
            continue  # its base layer is counted; the adapter's own sums are shorter
        if isinstance(module, torch.nn.Linear):
            total += module.in_features
        elif isinstance(module, torch.nn.Conv2d):
            total += module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return total
