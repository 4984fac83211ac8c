"""DreamBooth data: instance (and class) images checked and encoded once to latents, prior-preservation batches.

Latents are computed once per image and flip at start-up (the autoencoder is frozen, so this is the same as
encoding per step, and much cheaper on a CPU). `--center_crop` off takes a random crop drawn once per image.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(folder: str | None, argument: str) -> list[str]:
    """Sorted image files in `folder`; a clear error naming `argument` if it is missing or holds none."""
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"`{argument}` must be an existing folder of images; got {folder!r}.")
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"`{argument}` holds no images ({', '.join(IMAGE_SUFFIXES)}); got {folder!r}.")
    return files


def load_image(path: str, argument: str, resolution: int, center_crop: bool, rng: random.Random) -> torch.Tensor:
    """RGB image resized (short side) and cropped to `resolution`, as a `(3, H, W)` tensor in [-1, 1]."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"`{argument}`: cannot read image {path!r} ({error}).") from error
    width, height = image.size
    scale = resolution / min(width, height)
    image = image.resize(
        (max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.BICUBIC
    )
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.array(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def check_prompts(instance_prompt: str | None, class_prompt: str | None, with_prior_preservation: bool) -> None:
    """The instance prompt must name the subject with an identifier that the class prompt lacks (`sks` in
    "a photo of sks dog" against "a photo of dog")."""
    if not instance_prompt or not instance_prompt.strip():
        raise ValueError(
            f"`instance_prompt` must be a non-empty prompt such as 'a photo of sks dog'; got {instance_prompt!r}."
        )
    if with_prior_preservation and (not class_prompt or not class_prompt.strip()):
        raise ValueError(f"`class_prompt` is required with `with_prior_preservation`; got {class_prompt!r}.")
    if class_prompt:
        identifier = set(instance_prompt.lower().split()) - set(class_prompt.lower().split())
        if not identifier:
            raise ValueError(
                f"`instance_prompt` must contain an identifier absent from `class_prompt` (e.g. 'sks' in "
                f"'a photo of sks dog'); got instance_prompt={instance_prompt!r}, class_prompt={class_prompt!r}."
            )


class LatentSet:
    """Latents of one image folder, per image and flip: `latents[i][flip]` of shape `(C, h, w)`."""

    def __init__(self, latents: list[list[torch.Tensor]], prompt: str, files: list[str]) -> None:
        self.latents, self.prompt, self.files = latents, prompt, files

    def __len__(self) -> int:
        return len(self.latents)


@torch.no_grad()
def encode_folder(
    files: list[str], argument: str, prompt: str, vae, resolution: int, center_crop: bool, random_flip: bool, seed: int
) -> LatentSet:
    rng = random.Random(seed)
    latents = []
    for path in files:
        image = load_image(path, argument, resolution, center_crop, rng)
        views = [image, image.flip(-1)] if random_flip else [image]
        latents.append(list(vae.encode(torch.stack(views)).float()))
    return LatentSet(latents, prompt, files)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def batch_at(micro_step: int, num_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of micro-batch `micro_step` (counted from 0): a pure function of the step, so that a resumed
    run sees exactly the batches an uninterrupted one would."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, position = divmod(micro_step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return order[position * batch_size : (position + 1) * batch_size]


def make_batch(
    indices: list[int], instances: LatentSet, classes: LatentSet | None, generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """Latents and prompts of one batch: the instance examples first, then (prior preservation) as many class
    examples, as diffusers' `collate_fn` orders them; `split_prior_loss` relies on this order."""
    sets = [instances] if classes is None else [instances, classes]
    latents, prompts = [], []
    for latent_set in sets:
        for index in indices:
            views = latent_set.latents[index % len(latent_set)]
            flip = int(torch.randint(len(views), (1,), generator=generator))
            latents.append(views[flip])
            prompts.append(latent_set.prompt)
    return torch.stack(latents), prompts


def split_prior_loss(
    prediction: torch.Tensor, target: torch.Tensor, with_prior_preservation: bool, prior_loss_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total loss, instance loss, prior loss): the batch's first half is instances, the second half class images."""
    prediction, target = prediction.float(), target.float()
    if not with_prior_preservation:
        loss = torch.nn.functional.mse_loss(prediction, target)
        return loss, loss, None
    pred_instance, pred_prior = prediction.chunk(2)
    target_instance, target_prior = target.chunk(2)
    instance_loss = torch.nn.functional.mse_loss(pred_instance, target_instance)
    prior_loss = torch.nn.functional.mse_loss(pred_prior, target_prior)
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss
