"""Small models and the (name, model factory, config kwargs, inputs) cases the behaviour tests run through."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self, **conv_kwargs) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(4, 12, **conv_kwargs)
        self.conv1 = nn.Conv2d(12, 8, kernel_size=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.relu(self.conv0(x)))
        return self.head(h.mean(dim=(2, 3)))


def tiny_deberta_config(vocab_size: int = 100, num_labels: int = 2):
    """A 2-layer DeBERTa-v2 config (hidden 32) with DeBERTaV3's attention settings: relative positions, disentangled
    p2c/c2p attention, no absolute positions."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        relative_attention=True,
        position_buckets=32,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        pooler_hidden_size=32,
        num_labels=num_labels,
    )


def tiny_deberta(num_labels: int = 2):
    from transformers import DebertaV2ForSequenceClassification

    return DebertaV2ForSequenceClassification(tiny_deberta_config(num_labels=num_labels)).eval()


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    config: dict
    make_inputs: Callable[[], dict]
    output_of: Callable = field(default=lambda out: out)


def _deberta_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 100, (3, 12), generator=generator), "attention_mask": torch.ones(3, 12)}


def _unet_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 5, 8, generator=generator),
    }


def _image(channels: int = 4, size: int = 9) -> Callable[[], dict]:
    return lambda: {"x": torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))}


CASES = [
    Case(
        "mlp",
        MLP,
        {"target_modules": ["lin0", "lin1"], "r": 3},
        lambda: {"x": torch.randn(5, 10, generator=torch.Generator().manual_seed(1))},
    ),
    Case("conv1x1", lambda: ConvNet(kernel_size=1), {"target_modules": ["conv0", "conv1"], "r": 3}, _image()),
    Case("conv3x3", lambda: ConvNet(kernel_size=3, padding=1), {"target_modules": ["conv0"], "r": 3}, _image()),
    Case(
        "conv3x3-stride2-pad2-dil2",
        lambda: ConvNet(kernel_size=3, stride=2, padding=2, dilation=2),
        {"target_modules": ["conv0", "conv1"], "r": 4},
        _image(),
    ),
    Case(
        "conv3x2-reflect",
        lambda: ConvNet(kernel_size=(3, 2), padding=1, padding_mode="reflect"),
        {"target_modules": ["conv0"], "r": 2},
        _image(),
    ),
    Case(
        "conv3x3-all-modes",
        lambda: ConvNet(kernel_size=3, padding=1),
        {"target_modules": ["conv0"], "r": 3, "conv_modes": "all"},
        _image(),
    ),
    Case(
        "deberta-v2",
        tiny_deberta,
        {"task_type": "SEQ_CLS", "r": 4},
        _deberta_inputs,
        output_of=lambda out: out.logits,
    ),
    Case("unet", tiny_unet, {"target_modules": UNET_TARGETS, "r": 2}, _unet_inputs, output_of=lambda out: out.sample),
]
