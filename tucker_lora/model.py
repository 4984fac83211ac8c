"""`TuckerModel`: injects Tucker adapters into a model through PEFT's `BaseTuner`, and saves them compactly."""

from __future__ import annotations

import copy
import re
import warnings

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.other import get_pattern_key
from torch import nn

from ._peft_internals import CompactSerialization
from .config import TuckerAdapterConfig
from .layer import SUPPORTED_LAYERS, Conv2d, Linear, TuckerLayer

# the paper's targets for DeBERTaV3 ("output.dense" matches attention.output.dense and output.dense: 72 matrices)
TARGET_MODULES_BY_MODEL_TYPE = {
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "intermediate.dense", "output.dense"],
    "bert": ["query", "key", "value", "intermediate.dense", "output.dense"],
}


class TuckerModel(CompactSerialization, BaseTuner):
    """
    Tucker adapters on a model's `nn.Linear` and `nn.Conv2d` layers. Made by `peft.get_peft_model` or
    `model.add_adapter` with a [`TuckerAdapterConfig`]; not meant to be built by hand.
    """

    prefix: str = "tucker_"
    tuner_layer_cls = TuckerLayer
    target_module_mapping = TARGET_MODULES_BY_MODEL_TYPE

    def _pre_injection_hook(self, model: nn.Module, config: TuckerAdapterConfig, adapter_name: str) -> None:
        check_targets(model, config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        # the model keeps its own copy: saving writes the ranks in use into `rank_pattern`, which must not leak into
        # the caller's config object (a second model built from it would start at those ranks). So edits to the
        # caller's config after `get_peft_model` do not reach the model: edit `model.peft_config[name]` instead
        self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, **kwargs)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's convention: by default adapters hold float32 (fp16/bf16 are upcast); `autocast_adapter_dtype=False`
        makes them follow the base layer's dtype."""
        if autocast_adapter_dtype:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=True)
            return
        for module in self.model.modules():
            if isinstance(module, TuckerLayer):
                module.cast_adapter_to_base_dtype(adapter_name)

    def _create_and_replace(
        self,
        config: TuckerAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        ranks = None
        pattern_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        if pattern_key in config.rank_pattern:
            value = config.rank_pattern[pattern_key]
            ranks = list(value) if isinstance(value, (list, tuple)) else None
            if ranks is None:  # a single int sets the channel modes; spatial modes stay full
                ranks = [value, value]
                base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
                if isinstance(base, nn.Conv2d) and config.conv_modes == "all":
                    ranks += list(base.weight.shape[2:])
        if isinstance(target, TuckerLayer):
            target.update_layer(adapter_name, config, ranks=ranks)
            return
        new_module = self._create_new_module(config, adapter_name, target, ranks=ranks)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        config: TuckerAdapterConfig, adapter_name: str, target: nn.Module, ranks: list[int] | None
    ) -> TuckerLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear):
            return Linear(target, adapter_name, config, ranks=ranks)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, config, ranks=ranks)
        raise TypeError(
            f"Target module {base} is not supported. Currently, only "
            f"{', '.join(f'`torch.nn.{cls.__name__}`' for cls in SUPPORTED_LAYERS)} are supported."
        )


def check_targets(model: nn.Module, config: TuckerAdapterConfig) -> None:
    """Fail early when `target_modules` match nothing, warn on list entries that match nothing."""
    targets = config.target_modules
    if targets is None or targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:  # PEFT expands "all-linear" and checks it
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        unmatched = [] if any(re.fullmatch(targets, name) for name in names) else [targets]
        all_unmatched = bool(unmatched)
    else:
        unmatched = sorted(t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names))
        all_unmatched = len(unmatched) == len(targets)
    if all_unmatched:
        examples = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)][:8]
        raise ValueError(
            f"`target_modules` {sorted(targets) if not isinstance(targets, str) else targets!r} match no module of "
            f"the model. Some Linear/Conv2d modules it has: {examples}."
        )
    if unmatched:
        warnings.warn(f"These `target_modules` match no module of the model and are ignored: {unmatched}.")
