"""Every touch of PEFT internals lives here: the `PeftType.TUCKER` enum member, the method registration, and
the compact save/load hooks (`_get_adapter_state_dict` / `_remap_adapter_state_dict_for_load`, PEFT's internal API).

`register_peft_method` only accepts names that are already members of `PeftType`, and transformers calls
`peft_type.value` in several places, so a real enum member is required. Python's `Enum` has no public way to add a
member after class creation; we add one the way `aenum.extend_enum` does. `tests/test_peft_registration.py` fails
loudly if a PEFT or Python release breaks this.
"""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.utils.peft_types import PeftType, register_peft_method

__all__ = ["BufferDict", "CompactSerialization", "ensure_peft_type", "register_tucker_method"]

PEFT_TYPE_NAME = "TUCKER"
PREFIX = "tucker_"


def ensure_peft_type() -> PeftType:
    """Add `PeftType.TUCKER` if it is not there yet and return it. Calling it twice is harmless."""
    existing = PeftType._member_map_.get(PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    member.__init__(PEFT_TYPE_NAME)
    # set the class attribute before the member maps: EnumType refuses to reassign a known member
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    return member


def register_tucker_method(config_cls: type, model_cls: type) -> None:
    """Register config and tuner classes with PEFT under `PeftType.TUCKER`, once per process."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = ensure_peft_type()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is model_cls:
        return
    if registered is not None:
        raise KeyError(
            f"PEFT type {PEFT_TYPE_NAME} is already registered to {registered.__qualname__}; "
            f"tucker_lora cannot register {model_cls.__qualname__} over it."
        )
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)


_PEFT_PREFIX = "base_model.model."


class CompactSerialization:
    """Mixin for the tuner class: save only the active slices and the ranks, re-expand to capacity on load."""

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Save only the active slices and the ranks, and record the ranks in `config.rank_pattern`."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        ranks_suffix = f".tucker_ranks.{adapter_name}"
        ranks_by_module = {
            key.removesuffix(ranks_suffix): [int(r) for r in value.tolist()]
            for key, value in selected.items()
            if key.endswith(ranks_suffix)
        }
        compact = {}
        for key, value in selected.items():
            ranks = _ranks_of_owner(key, adapter_name, ranks_by_module)
            if ranks is None:
                compact[key] = value
            elif ".tucker_core." in key:
                compact[key] = value[tuple(slice(0, r) for r in ranks)].contiguous()
            else:
                mode = int(key.rsplit(".", 1)[1])
                compact[key] = value[:, : ranks[mode]].contiguous()
        config.rank_pattern = {name.removeprefix(_PEFT_PREFIX): ranks for name, ranks in ranks_by_module.items()}
        return compact

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Pad the saved active slices back to the capacity the model allocated, checking every shape."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        model_state = model.state_dict()
        ranks_suffix = f".tucker_ranks.{adapter_name}"
        ranks_by_module = {
            key.removesuffix(ranks_suffix): [int(r) for r in value.tolist()]
            for key, value in remapped.items()
            if key.endswith(ranks_suffix)
        }
        padded = {}
        for key, value in remapped.items():
            ranks = _ranks_of_owner(key, adapter_name, ranks_by_module)
            if ranks is None or key.endswith(ranks_suffix) or key not in model_state:
                padded[key] = value
                continue
            target = model_state[key]
            if ".tucker_core." in key:
                expected = tuple(ranks) + tuple(target.shape[len(ranks) :])
            else:
                mode = int(key.rsplit(".", 1)[1])
                expected = (target.shape[0], ranks[mode])
            if tuple(value.shape) != expected or any(e > t for e, t in zip(expected, target.shape)):
                raise ValueError(
                    f"The adapter file disagrees with its config at {key!r}: saved shape {tuple(value.shape)}, "
                    f"but the saved ranks {ranks} and the layer's capacity {tuple(target.shape)} need {expected}."
                )
            full = torch.zeros(target.shape, dtype=value.dtype)
            full[tuple(slice(0, s) for s in value.shape)] = value
            padded[key] = full
        _record_loaded_ranks(config, ranks_by_module)
        return padded


def _ranks_of_owner(key: str, adapter_name: str, ranks_by_module: dict[str, list[int]]) -> list[int] | None:
    """The saved ranks of the layer that owns a core or basis `key`; None for any other key."""
    for attribute in ("tucker_core", "tucker_bases"):
        marker = f".{attribute}.{adapter_name}"
        if marker in key:
            return ranks_by_module.get(key.split(marker)[0])
    return None


def _record_loaded_ranks(config, ranks_by_module: dict[str, list[int]]) -> None:
    """The weights carry their own ranks (`tucker_ranks`), which win over the model's config: `load_adapter` of an
    older save into a live adapter (Trainer's `load_best_model_at_end`) restores the older ranks, and the config
    then says so, as a save would."""
    if ranks_by_module:
        config.rank_pattern = {owner.removeprefix(_PEFT_PREFIX): ranks for owner, ranks in ranks_by_module.items()}
