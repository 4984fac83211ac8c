"""A small regression task for the Trainer-based tests: test_callback.py and the DDP script next to this file."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn
from transformers import TrainingArguments

from tucker_lora import TuckerAdapterConfig, TuckerLayer


class Regressor(nn.Module):
    """Linear and Conv2d layers, adapted; returns a dict with the loss, as Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 24)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.out = nn.Linear(24 + 6, 4)

    def forward(self, x: torch.Tensor, image: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        h = torch.cat([torch.tanh(self.inp(x)), self.conv(image).mean(dim=(2, 3))], dim=1)
        prediction = self.out(h)
        result = {"logits": prediction}
        if labels is not None:
            result["loss"] = ((prediction - labels) ** 2).mean()
        return result


def dataset(n: int = 256, seed: int = 0) -> list[dict]:
    """Targets of a teacher: the base model of `tucker_model(seed)` with low-rank updates of `inp` (rank 2) and
    `conv` (channel ranks 2), so that the adapted model can fit them."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        teacher = Regressor()  # the same weights as the base model of tucker_model(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 16, generator=gen)
    image = torch.randn(n, 2, 4, 4, generator=gen)
    with torch.no_grad():
        teacher.inp.weight += torch.randn(24, 2, generator=gen) @ torch.randn(2, 16, generator=gen) / 2
        spatial = torch.randn(2, 2, 3, 3, generator=gen)
        teacher.conv.weight += torch.einsum("abhw,ia,jb->ijhw", spatial, torch.randn(6, 2, generator=gen),
                                            torch.randn(2, 2, generator=gen))  # fmt: skip
        labels = teacher(x, image)["logits"]
    return [{"x": x[i], "image": image[i], "labels": labels[i]} for i in range(n)]


def tucker_model(seed: int = 0, **config) -> nn.Module:
    torch.manual_seed(seed)
    defaults = {
        "r": 2, "r_max": 4, "tau": 0.1, "target_modules": ["inp", "conv"], "core_steps": 2, "augment_start_step": 2,
    }  # fmt: skip
    return get_peft_model(Regressor(), TuckerAdapterConfig(**{**defaults, **config}))


def training_args(output_dir: str, **overrides) -> TrainingArguments:
    defaults = {
        "output_dir": output_dir, "max_steps": 20, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
        "logging_steps": 1, "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True,
        "remove_unused_columns": False, "seed": 0, "lr_scheduler_type": "linear", "dataloader_num_workers": 0,
    }  # fmt: skip
    return TrainingArguments(**{**defaults, **overrides})


def adapter_state(model: nn.Module, optimizer=None) -> dict[str, torch.Tensor]:
    """Every Tucker tensor (cores, bases, ranks) and, with an optimizer, the cores' state tensors, by name."""
    state = {}
    inner = getattr(optimizer, "optimizer", optimizer)
    for name, module in model.named_modules():
        if not isinstance(module, TuckerLayer):
            continue
        for adapter, core in module.tucker_core.items():
            state[f"{name}.core"] = core.detach().clone()
            state[f"{name}.ranks"] = module.tucker_ranks[adapter].clone()
            for i, basis in enumerate(module.tucker_bases[adapter]):
                state[f"{name}.basis{i}"] = basis.detach().clone()
            if inner is not None:
                for key, value in inner.state.get(core, {}).items():
                    if torch.is_tensor(value):
                        state[f"{name}.core.{key}"] = value.clone()
    return state
