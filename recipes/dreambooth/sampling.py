"""Image generation from a UNet, a text encoder and an autoencoder (DDIM), for validation and class images.

The UNet runs in its own dtype under autocast: validation never casts the live (training) UNet, which in fp16 broke
training in diffusers' examples.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image


@torch.no_grad()
def generate(
    unet, text_encoder, vae, scheduler_config, prompts: list[str], seed: int, num_inference_steps: int = 25
) -> torch.Tensor:
    """Images `(n, 3, H, W)` in [-1, 1], one per prompt, from seeded noise."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    config = unet.config
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    shape = (len(prompts), config.in_channels, config.sample_size, config.sample_size)
    latents = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    states = text_encoder(prompts)
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        noise = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=states).sample
        latents = scheduler.step(noise.float(), t, latents).prev_sample
    unet.train(was_training)
    return vae.decode(latents.float()).float().cpu()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def save_grid(images: torch.Tensor, path: str, columns: int = 4) -> str:
    """Save images side by side (rows of `columns`) as one PNG."""
    pil = to_pil(images)
    columns = min(columns, len(pil))
    rows = -(-len(pil) // columns)
    width, height = pil[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(pil):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)
    return path
