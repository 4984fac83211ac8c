"""Final adapter files: the adapter in PEFT format, `pytorch_lora_weights.safetensors` in diffusers format and,
optionally, `pytorch_lora_weights_kohya.safetensors` in kohya / sd-scripts format."""

from __future__ import annotations

import os

from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"  # the name diffusers' training scripts use
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model: nn.Module, output_dir: str, method: str, adapter_name: str = "default") -> str:
    """`{method}_adapter/`: `adapter_config.json` + `adapter_model.safetensors`. A Tucker config records the final
    ranks in `rank_pattern`, so `load_adapter` rebuilds the adapter at the right ranks."""
    folder = os.path.join(output_dir, f"{method}_adapter")
    config = model.peft_config[adapter_name]
    if method == "tucker":
        import copy

        import tucker_lora

        config = copy.deepcopy(config)
        config.rank_pattern = tucker_lora.get_ranks(model, adapter_name)
    config.save_pretrained(folder)
    tensors = {
        k: v.detach().contiguous().cpu()
        for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
    }
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def load_adapter(unet: nn.Module, folder: str, adapter_name: str = "default") -> nn.Module:
    """Add the adapter saved by `save_adapter` (Tucker or LoRA) to `unet`."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(
        folder
    )  # a Tucker config needs `import tucker_lora` first (done by the caller)
    unet.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(
        unet, load_file(os.path.join(folder, ADAPTER_WEIGHTS)), adapter_name=adapter_name
    )
    if result.unexpected_keys:
        raise ValueError(f"adapter {folder!r} does not match the model: unexpected keys {result.unexpected_keys[:3]}")
    return unet


def save_diffusers_lora(model: nn.Module, output_dir: str, method: str, adapter_name: str = "default") -> str:
    """`pytorch_lora_weights.safetensors`: keys `unet.<module>.lora_A/B.weight`, loadable by stock diffusers."""
    if method == "tucker":
        from tucker_lora.export import diffusers_lora_state_dict

        tensors = diffusers_lora_state_dict(model, adapter_name, prefix="unet")
    else:
        # alpha == rank: the scale is 1, what stock loaders assume
        tensors = {
            f"unet.{k}": v.detach().float().contiguous().cpu()
            for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
        }
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, DIFFUSERS_WEIGHT_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def save_kohya_lora(
    model: nn.Module, output_dir: str, method: str, conv_format: str = "tucker", adapter_name: str = "default"
) -> str:
    """`pytorch_lora_weights_kohya.safetensors`: keys `lora_unet_<module>.lora_down/lora_up.weight` and `.alpha`
    (= the rank: the scaling is folded in); a Tucker kxk conv adds `.lora_mid.weight` with `conv_format="tucker"`."""
    if method == "tucker":
        from tucker_lora.export import kohya_lora_state_dict

        tensors = kohya_lora_state_dict(model, adapter_name, prefix="lora_unet", conv_format=conv_format)
    else:
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

        # alpha == rank: the scale is 1, and diffusers' converter writes alpha = rank
        peft = {
            f"unet.{k}": v.detach().float().contiguous().cpu()
            for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
        }
        tensors = {k: v.float() for k, v in convert_state_dict_to_kohya(peft).items()}
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, KOHYA_WEIGHT_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path
