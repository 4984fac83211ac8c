"""Bad input gets a clear error naming the field, the rule and the value."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from tests.helpers import adapted, fresh_base
from tests.toy_models import CASES, MLP
from tucker_lora import TuckerAdapterConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau": 1.5}, r"`tau` must be in \(0, 1\); got 1.5"),
        ({"tau": 0.0}, r"`tau` must be in \(0, 1\); got 0.0"),
        ({"r": 0}, r"`r` must be an integer >= 1; got 0"),
        ({"r": 8, "r_max": 4}, r"`r_max` must be >= `r` \(8\); got 4"),
        ({"r_min": 0}, r"`r_min` must be an integer >= 1; got 0"),
        ({"r": 4, "r_min": 5}, r"`r_min` must be <= `r` \(4\); got 5"),
        ({"alpha": -1}, r"`alpha` must be a finite number > 0; got -1"),
        ({"alpha": float("nan")}, r"`alpha` must be a finite number > 0; got nan"),
        ({"alpha": float("inf")}, r"`alpha` must be a finite number > 0; got inf"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\); got 1.0"),
        ({"conv_modes": "spatial"}, r"`conv_modes` must be one of \['channels', 'all'\]; got 'spatial'"),
        ({"core_steps": 0}, r"`core_steps` must be an integer >= 1; got 0"),
        ({"augment_start_step": -1}, r"`augment_start_step` must be an integer >= 0; got -1"),
        ({"freeze_ranks_after": 1.5}, r"`freeze_ranks_after` as a fraction must be in \(0, 1\]; got 1.5"),
        ({"tau_warmup": 1.5}, r"`tau_warmup` as a fraction must be in \(0, 1\]; got 1.5"),
        ({"tau_warmup": -3}, r"`tau_warmup` must be an integer >= 0; got -3"),
        ({"rank_pattern": {"lin0": 99}}, r"`rank_pattern\[.lin0.\]` must hold integers in \[1, 2 \* r_max=32\]; got"),
    ],
)
def test_bad_config_values_raise_naming_field_rule_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuckerAdapterConfig(**kwargs)


def test_defaults_follow_the_documented_rules():
    config = TuckerAdapterConfig()
    assert (config.tau, config.r, config.r_max, config.r_min) == (0.1, 8, 16, 1)
    assert config.peft_type == "TUCKER"


def test_target_modules_matching_nothing_lists_existing_modules():
    with pytest.raises(ValueError, match=r"match no module of the model.*'lin0'"):
        get_peft_model(MLP(), TuckerAdapterConfig(target_modules=["query", "nothing"]))


def test_partial_match_warns_naming_the_unmatched_ones():
    with pytest.warns(UserWarning, match=r"match no module of the model and are ignored: \['typo'\]"):
        model = get_peft_model(MLP(), TuckerAdapterConfig(target_modules=["lin0", "typo"]))
    assert "lin0" in str(model)


def test_unsupported_layer_type_names_the_supported_ones():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

    with pytest.raises(TypeError, match=r"not supported.*`torch.nn.Linear`, `torch.nn.Conv2d`"):
        get_peft_model(WithEmbedding(), TuckerAdapterConfig(target_modules=["emb"]))


def test_grouped_convolution_is_rejected_clearly():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, groups=2)

    with pytest.raises(ValueError, match=r"groups=1 only; got groups=2"):
        get_peft_model(Grouped(), TuckerAdapterConfig(target_modules=["conv"]))


def test_adapter_file_whose_shapes_disagree_with_its_config(tmp_path):
    from safetensors.torch import load_file, save_file

    case = CASES[0]
    model, _ = adapted(case, init_weights=False)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lin0.tucker_core"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"disagrees with its config at .*lin0\.tucker_core"):
        PeftModel.from_pretrained(fresh_base(case), tmp_path)
