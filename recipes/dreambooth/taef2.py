"""TAEF2, the tiny autoencoder for FLUX.2 latents (madebyollin/taesd, MIT), as plain PyTorch modules.

The layout matches the published `taef2_encoder.pth` / `taef2_decoder.pth` state dicts key for key (they load with
`strict=True`). diffusers' `AutoencoderTiny` cannot hold them: its blocks lack the group-normed 1x1 "pool" branch
that TAEF2 adds to the three lowest-resolution blocks. Images are RGB in [0, 1]; a 256x256 image maps to a
32-channel 32x32 latent and back.
"""

from __future__ import annotations

import os

import torch
from torch import nn

LATENT_CHANNELS = 32
DOWNSCALE = 8


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, with_pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if with_pool:
            wide = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, wide, 1, bias=False),
                nn.GroupNorm(4, wide),
                nn.ReLU(),
                nn.Conv2d(wide, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def taef2_encoder() -> nn.Sequential:
    return nn.Sequential(
        _conv(3, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), _Block(64, 64, True), _Block(64, 64, True), _Block(64, 64, True),
        _conv(64, LATENT_CHANNELS),
    )  # fmt: skip


def taef2_decoder() -> nn.Sequential:
    return nn.Sequential(
        _Clamp(), _conv(LATENT_CHANNELS, 64), nn.ReLU(),
        _Block(64, 64, True), _Block(64, 64, True), _Block(64, 64, True),
        nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False),
        _Block(64, 64), _conv(64, 3),
    )  # fmt: skip


class TAEF2(nn.Module):
    """Frozen TAEF2 encoder + decoder. `encode` takes images in [-1, 1] (the diffusion scripts' convention) and
    returns latents; `decode` returns images in [-1, 1]."""

    latent_channels = LATENT_CHANNELS
    downscale = DOWNSCALE

    def __init__(self) -> None:
        super().__init__()
        self.encoder = taef2_encoder()
        self.decoder = taef2_decoder()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> TAEF2:
        """Load `taef2_encoder.pth` and `taef2_decoder.pth` from `folder`, strictly."""
        model = cls()
        for part in ("encoder", "decoder"):
            path = os.path.join(folder, f"taef2_{part}.pth")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"TAEF2 weights not found: {path} (expected taef2_encoder.pth and taef2_decoder.pth)"
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            getattr(model, part).load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder((images + 1) / 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).clamp(0, 1) * 2 - 1
