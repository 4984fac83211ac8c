"""Honest numbers: the ranks in use and the trainable parameters they amount to.

PEFT's `print_trainable_parameters` counts the allocated capacity of the Tucker tensors; these count what is active.
"""

from __future__ import annotations

from torch import nn

from .layer import TuckerLayer


def _tucker_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, TuckerLayer):
            yield name.removeprefix("base_model.model."), module


def get_ranks(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[int]]:
    """
    Active ranks per adapted module, one per adaptive mode (`[r_out, r_in]` for Linear and channel-Tucker conv).

    Args:
        model (`nn.Module`): a `PeftModel` or a model with Tucker adapters injected.
        adapter_name (`str`, *optional*): defaults to each layer's active adapter.
    """
    ranks = {}
    for name, layer in _tucker_layers(model):
        adapter = adapter_name or layer.active_adapters[0]
        if adapter in layer.tucker_core:
            ranks[name] = layer.active_ranks(adapter)
    return ranks


def count_parameters(model: nn.Module, adapter_name: str | None = None) -> int:
    """
    Active trainable parameters: active core entries + active basis columns of every Tucker adapter, plus every
    other trainable parameter (`modules_to_save` such as a classifier head).

    Example:
        ```py
        >>> tucker_lora.count_parameters(peft_model)
        412934
        ```
    """
    tucker_param_ids = set()
    total = 0
    for _, layer in _tucker_layers(model):
        for adapter in layer.tucker_core:
            tucker_param_ids.add(id(layer.tucker_core[adapter]))
            tucker_param_ids.update(id(b) for b in layer.tucker_bases[adapter])
        adapter = adapter_name or layer.active_adapters[0]
        if adapter in layer.tucker_core and layer.tucker_core[adapter].requires_grad:
            total += layer.active_parameter_count(adapter)
    seen = set()
    for param in model.parameters():
        if param.requires_grad and id(param) not in tucker_param_ids and id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total
