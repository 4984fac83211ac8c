"""Trainable-parameter counts: the adapter's true count, and what PEFT LoRA at rank r costs on the same layers."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def adapted_base_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> base layer (`nn.Linear` / `nn.Conv2d`) of every adapted layer."""
    return {
        name.removeprefix("base_model.model."): module.get_base_layer()
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def lora_layer_parameters(layer: nn.Module, r: int) -> int:
    """PEFT LoRA at rank r: `A` (r x in, a kh x kw conv for a Conv2d, i.e. the flattened kernel) and `B` (out x r)."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return r * (layer.in_channels // layer.groups * kh * kw + layer.out_channels)
    return r * (layer.in_features + layer.out_features)


def lora_parameter_count(model: nn.Module, r: int) -> int:
    """What LoRA at rank `r` would train on the layers `model` adapts."""
    return sum(lora_layer_parameters(layer, r) for layer in adapted_base_layers(model).values())


def adapter_parameter_count(model: nn.Module, method: str) -> int:
    """Active trainable parameters: `tucker_lora.count_parameters` for Tucker (active ranks, not storage), every
    trainable tensor for LoRA."""
    if method == "tucker":
        import tucker_lora

        return tucker_lora.count_parameters(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
