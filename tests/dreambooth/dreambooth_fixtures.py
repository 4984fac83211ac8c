"""Helpers for the DreamBooth recipe tests: a tiny offline base folder and small image folders, all under tmp paths.

The tiny base has the offline layout (`unet/`, `scheduler/`, `offline_base.json`) with the real MiniLM text encoder,
a TAEF2 with random weights (so that no test needs ../shared/data) and a randomly initialized 8x8-latent UNet.
Importing this module puts `recipes/dreambooth` on `sys.path`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO / "recipes" / "dreambooth"
SHARED_DATA = REPO.parent / "shared" / "data"
if str(RECIPE_DIR) not in sys.path:
    sys.path.insert(0, str(RECIPE_DIR))

RESOLUTION = 64  # 8x8 latents through TAEF2


def tiny_unet_config(cross_attention_dim: int = 384) -> dict:
    return {
        "sample_size": RESOLUTION // 8,
        "in_channels": 32,
        "out_channels": 32,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 2,
        "norm_num_groups": 4,
    }


ADAPTED_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def adapted_tiny_unet(folder: Path):
    """A tiny UNet (saved to `folder/base` without adapter) with a Tucker adapter as after training: random cores at
    unequal ranks and alpha != r (so that a folded scaling matters), on attention and 3x3 convs; and its inputs."""
    from diffusers import UNet2DConditionModel

    import tucker_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(cross_attention_dim=16)).eval()
    unet.save_pretrained(folder / "base")
    config = tucker_lora.TuckerAdapterConfig(
        r=3, alpha=5.0, r_max=4, target_modules=ADAPTED_TARGETS, init_weights=False,
        rank_pattern={"down_blocks.0.resnets.0.conv1": [2, 3], "to_v": [1, 2]},
    )  # fmt: skip
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(2, 32, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator),
    }
    return unet, inputs


def make_tiny_base(folder: Path) -> Path:
    from components import OFFLINE_MARKER
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from taef2 import TAEF2

    torch.manual_seed(0)
    taef2 = TAEF2()
    (folder / "taef2").mkdir(parents=True)
    torch.save(taef2.encoder.state_dict(), folder / "taef2" / "taef2_encoder.pth")
    torch.save(taef2.decoder.state_dict(), folder / "taef2" / "taef2_decoder.pth")
    UNet2DConditionModel(**tiny_unet_config()).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    meta = {"taef2_folder": str(folder / "taef2"), "latent_scaling_factor": 1.0, "description": "test base"}
    (folder / OFFLINE_MARKER).write_text(json.dumps(meta))
    return folder


def make_image_folder(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (80, 72)) -> Path:
    """`count` random RGB JPEGs (not square, so that crops are exercised)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"{i:02d}.jpg")
    return folder


def train_args(base: Path, instances: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(instances),
        "--instance_prompt", "a photo of sks dog", "--output_dir", str(output), "--resolution", str(RESOLUTION),
        "--learning_rate", "1e-2", "--logging_steps", "1", "--seed", "0", "--center_crop", *extra,
    ]  # fmt: skip


def make_tiny_clip(folder: Path) -> Path:
    """A randomly initialized tiny `CLIPModel` with its processor (a letter-level CLIP tokenizer, 32x32 images),
    saved like a hub checkpoint."""
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:  # no merges: every word is spelled out letter by letter
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    text = {"vocab_size": len(vocab), "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}  # fmt: skip
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = {"image_size": 32, "patch_size": 8}
    CLIPModel(
        CLIPConfig(text_config={**tiny, **text}, vision_config={**tiny, **vision}, projection_dim=8)
    ).save_pretrained(folder)
    return folder


def make_tiny_dino(folder: Path) -> Path:
    """A randomly initialized tiny ViT (the architecture of the DINO checkpoints) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)  # fmt: skip
    ViTModel(config).save_pretrained(folder)
    return folder
