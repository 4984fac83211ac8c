"""Exact export of Tucker adapters to a standard PEFT LoRA adapter (METHOD section 1).

Linear: `dW = U_out C U_in^T` is a LoRA pair of rank min(r_out, r_in). Channel-Tucker conv: `dW` flattened to
`out x (in*kh*kw)` is `U_out * Mat_1(C x_2 U_in)`: a LoRA conv with `A = C x_2 U_in` (kernel kh x kw) and a 1x1 `B`.
The scaling is kept as LoRA's `alpha / r` per module, so nothing needs to be remembered outside the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .layer import Conv2d, Linear, TuckerLayer


def _lora_pairs(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, TuckerLayer, torch.Tensor, torch.Tensor]]:
    """`(module name, layer, lora_A, lora_B)` for every layer holding the Tucker adapter `adapter_name`, unscaled."""
    for full_name, layer in model.named_modules():
        if not isinstance(layer, TuckerLayer) or adapter_name not in layer.tucker_core:
            continue
        name = full_name.removeprefix("base_model.model.")
        _check_exportable(name, layer)
        with torch.no_grad():
            lora_a, lora_b = _lora_pair(layer, adapter_name)
        yield name, layer, lora_a, lora_b


def _lora_pair(layer: TuckerLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` with `B @ A == dW` (unscaled), in PEFT LoRA's weight shapes."""
    u_out, u_in = layer.active_bases(adapter_name)[:2]
    if isinstance(layer, Linear):
        core = layer.active_core(adapter_name)
        if core.shape[0] <= core.shape[1]:
            return core @ u_in.T, u_out
        return u_in.T, u_out @ core
    kernel = layer.spatial_kernel(adapter_name)
    lora_a = torch.einsum("abhw,ib->aihw", kernel, u_in)
    return lora_a, u_out[:, :, None, None]


def _check_exportable(name: str, layer: TuckerLayer) -> None:
    if isinstance(layer, Conv2d):
        base = layer.get_base_layer()
        if base.dilation != (1, 1) or base.padding_mode != "zeros":
            raise ValueError(
                f"Module {name!r} cannot be exported exactly: PEFT's LoRA conv ignores dilation and padding_mode, "
                f"and this layer has dilation={base.dilation}, padding_mode={base.padding_mode!r}."
            )


def export_lora(model: nn.Module, output_dir: str | os.PathLike, adapter_name: str = "default") -> LoraConfig:
    """
    Write the Tucker adapter `adapter_name` of `model` as a standard PEFT LoRA adapter in `output_dir`.

    The result loads with `PeftModel.from_pretrained(base_model, output_dir)` in a process that never imports
    tucker_lora, and gives the same outputs within float32 tolerance. Per-module ranks go to `rank_pattern` and
    the scaling to `alpha_pattern`; `modules_to_save` (e.g. a classifier head) are written as they are.

    Example:
        ```py
        >>> tucker_lora.export_lora(peft_model, "my-adapter-as-lora")
        >>> PeftModel.from_pretrained(base_model, "my-adapter-as-lora")
        ```
    """
    config = model.peft_config[adapter_name]
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer, lora_a, lora_b in _lora_pairs(model, adapter_name):
        rank = lora_a.shape[0]
        scaling = layer.tucker_alpha[adapter_name] / layer.tucker_r_init[adapter_name]
        rank_pattern[name] = rank
        alpha_pattern[name] = scaling * rank
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.detach().float().contiguous().cpu()
    if not tensors:
        raise ValueError(f"The model has no Tucker adapter named {adapter_name!r} to export.")

    # modules_to_save (a classifier head) are stored the same way for every PEFT method
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items():
        if ".tucker_" not in key:
            tensors[key] = value.detach().contiguous().cpu()

    max_rank = max(rank_pattern.values())
    lora_config = LoraConfig(
        r=max_rank,
        lora_alpha=max_rank,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=sorted(rank_pattern),
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        lora_dropout=0.0,
    )
    os.makedirs(output_dir, exist_ok=True)
    lora_config.save_pretrained(output_dir)
    save_file(tensors, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return lora_config


def diffusers_lora_state_dict(model: nn.Module, adapter_name: str = "default", prefix: str = "unet") -> dict:
    """
    The Tucker adapter `adapter_name` of a diffusers model (e.g. a `UNet2DConditionModel` with `add_adapter`) as a
    diffusers-format LoRA state dict: keys `{prefix}.{module}.lora_A.weight` / `.lora_B.weight`, convolutions
    included, and the Tucker scaling folded into `lora_B`, so that loaders which assume `alpha == rank` per module
    (scale 1, diffusers' convention when a file carries no alphas) reproduce the adapted model exactly.

    Save it with `safetensors.torch.save_file(..., "pytorch_lora_weights.safetensors")`; it loads with
    `pipe.load_lora_weights(folder)` or `unet.load_lora_adapter(folder, prefix="unet")`, without tucker_lora.
    """
    tensors = {}
    for name, layer, lora_a, lora_b in _lora_pairs(model, adapter_name):
        lora_b = lora_b * (layer.tucker_alpha[adapter_name] / layer.tucker_r_init[adapter_name])
        key = f"{prefix}.{name}" if prefix else name
        tensors[f"{key}.lora_A.weight"] = lora_a.detach().float().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = lora_b.detach().float().contiguous().cpu()
    if not tensors:
        raise ValueError(f"The model has no Tucker adapter named {adapter_name!r} to export.")
    return tensors


KOHYA_CONV_FORMATS = ("tucker", "flat")


def kohya_lora_state_dict(
    model: nn.Module, adapter_name: str = "default", prefix: str = "lora_unet", conv_format: str = "tucker"
) -> dict[str, torch.Tensor]:
    """
    The Tucker adapter `adapter_name` as a kohya / sd-scripts LoRA state dict (the format of AUTOMATIC1111, ComfyUI,
    LyCORIS): keys `{prefix}_{module path with "_"}.lora_down.weight`, `.lora_up.weight` and `.alpha`.

    Linear layers and 1x1 convolutions are a LoRA pair (`lora_down` = `C x U_in^T`, `lora_up` = `U_out`). A kxk
    convolution keeps its Tucker form with `conv_format="tucker"`, LyCORIS' "tucker" LoCon layout: `lora_down`
    (1x1, `U_in^T`), `lora_mid` (the kxk core, applied with the layer's stride and padding) and `lora_up` (1x1,
    `U_out`); a core with unequal ranks is zero-padded to a square one, which changes nothing, because these loaders
    read one rank per module. With `conv_format="flat"` the kernel is folded into a kxk `lora_down` (PEFT LoRA's
    flattened conv), which loaders without `lora_mid` support (diffusers) read too.

    Every module gets the same `alpha` (the file's largest rank) and `lora_up` holds the Tucker scaling times
    `rank / alpha`, so that the kohya convention `dW = alpha / rank * lora_up @ (lora_mid @) lora_down` gives the
    Tucker delta exactly. One alpha for the whole file matters: diffusers' kohya converter (0.42) loses the
    per-module alphas of attention layers when they differ, and then scales every module by the most common one.

    Save it with `safetensors.torch.save_file`.
    """
    if conv_format not in KOHYA_CONV_FORMATS:
        raise ValueError(f"`conv_format` must be one of {KOHYA_CONV_FORMATS}; got {conv_format!r}.")
    modules = {}  # kohya name -> (scaling, lora_down, lora_mid or None, lora_up), all unscaled
    for name, layer, lora_a, lora_b in _lora_pairs(model, adapter_name):
        scaling = layer.tucker_alpha[adapter_name] / layer.tucker_r_init[adapter_name]
        key = f"{prefix}_{name.replace('.', '_')}" if prefix else name.replace(".", "_")
        spatial = isinstance(layer, Conv2d) and tuple(layer.get_base_layer().kernel_size) != (1, 1)
        if spatial and conv_format == "tucker":
            with torch.no_grad():
                modules[key] = (scaling, *_kohya_tucker_conv(layer, adapter_name))
        else:
            modules[key] = (scaling, lora_a, None, lora_b)
    if not modules:
        raise ValueError(f"The model has no Tucker adapter named {adapter_name!r} to export.")
    alpha = max(down.shape[0] for _, down, _, _ in modules.values())
    tensors = {}
    for key, (scaling, down, mid, up) in modules.items():
        tensors[f"{key}.lora_down.weight"] = down.detach().float().contiguous().cpu()
        if mid is not None:
            tensors[f"{key}.lora_mid.weight"] = mid.detach().float().contiguous().cpu()
        up = up * (scaling * down.shape[0] / alpha)
        tensors[f"{key}.lora_up.weight"] = up.detach().float().contiguous().cpu()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors


def _kohya_tucker_conv(layer: Conv2d, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(lora_down, lora_mid, lora_up)` of a kxk Tucker conv (unscaled), padded with zeros to one rank
    `r = max(r_out, r_in)`: shapes `(r, in, 1, 1)`, `(r, r, kh, kw)`, `(out, r, 1, 1)`."""
    u_out, u_in = layer.active_bases(adapter_name)[:2]
    kernel = layer.spatial_kernel(adapter_name)
    r_out, r_in = kernel.shape[:2]
    rank = max(r_out, r_in)
    down = u_in.new_zeros(rank, u_in.shape[0], 1, 1)
    down[:r_in, :, 0, 0] = u_in.T
    mid = kernel.new_zeros(rank, rank, *kernel.shape[2:])
    mid[:r_out, :r_in] = kernel
    up = u_out.new_zeros(u_out.shape[0], rank, 1, 1)
    up[:, :r_out, 0, 0] = u_out
    return down, mid, up
