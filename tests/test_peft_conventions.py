"""PEFT's conventions for a tuner, as PEFT's own custom-model tests exercise them: `low_cpu_mem_usage`,
`autocast_adapter_dtype`, `in_features`/`out_features`, `target_modules="all-linear"`."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn

import tucker_lora
from tests.helpers import adapted, fresh_base, run, tucker_layers
from tests.tolerances import tol
from tests.toy_models import CASES, MLP, ConvNet, tiny_deberta

MLP_CASE = CASES[0]


def saved_mlp(tmp_path):
    model, inputs = adapted(MLP_CASE, init_weights=False)
    model.save_pretrained(tmp_path)
    return run(model, MLP_CASE, inputs), inputs


def test_get_peft_model_with_low_cpu_mem_usage_builds_the_adapter_on_meta():
    model = get_peft_model(MLP(), tucker_lora.TuckerAdapterConfig(target_modules=["lin0"]), low_cpu_mem_usage=True)
    layer = tucker_layers(model)[0]
    assert layer.tucker_core["default"].device.type == "meta"
    assert all(basis.device.type == "meta" for basis in layer.tucker_bases["default"])


def test_inject_adapter_in_model_with_low_cpu_mem_usage():
    model = inject_adapter_in_model(
        tucker_lora.TuckerAdapterConfig(target_modules=["lin0", "lin1"]), MLP(), low_cpu_mem_usage=True
    )
    assert len(tucker_layers(model)) == 2
    assert all(layer.tucker_core["default"].device.type == "meta" for layer in tucker_layers(model))


def test_from_pretrained_with_low_cpu_mem_usage_gives_the_same_outputs(tmp_path):
    expected, inputs = saved_mlp(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(MLP_CASE), tmp_path, low_cpu_mem_usage=True)
    for layer in tucker_layers(loaded):
        assert layer.tucker_core["default"].device.type == "cpu"
    torch.testing.assert_close(run(loaded, MLP_CASE, inputs), expected, **tol(torch.float32))


def test_load_adapter_with_low_cpu_mem_usage_gives_the_same_outputs(tmp_path):
    expected, inputs = saved_mlp(tmp_path)
    other = get_peft_model(fresh_base(MLP_CASE), tucker_lora.TuckerAdapterConfig(**MLP_CASE.config))
    other.load_adapter(str(tmp_path), "saved", low_cpu_mem_usage=True)
    other.set_adapter("saved")
    torch.testing.assert_close(run(other, MLP_CASE, inputs), expected, **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapter_dtype_is_float32_by_default_and_follows_the_base_without_autocast(dtype):
    config = tucker_lora.TuckerAdapterConfig(target_modules=["lin0", "conv0"])

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0, self.conv0 = nn.Linear(8, 8), ConvNet(kernel_size=3).conv0

    default = get_peft_model(Both().to(dtype), config)
    kept = get_peft_model(Both().to(dtype), config, autocast_adapter_dtype=False)
    for layer in tucker_layers(default):
        assert layer.tucker_core["default"].dtype == torch.float32
        assert all(b.dtype == torch.float32 for b in layer.tucker_bases["default"])
    for layer in tucker_layers(kept):
        assert layer.tucker_core["default"].dtype == dtype
        assert all(b.dtype == dtype and b.requires_grad for b in layer.tucker_bases["default"])
        assert layer.tucker_ranks["default"].dtype == torch.long
    # the base-dtype adapter trains: its parameters are the ones the optimizer sees
    assert {p.dtype for p in kept.parameters() if p.requires_grad} == {dtype}


def test_tucker_layers_expose_in_and_out_features():
    model = get_peft_model(ConvNet(kernel_size=3), tucker_lora.TuckerAdapterConfig(target_modules=["conv0"]))
    conv = tucker_layers(model)[0]
    assert (conv.in_features, conv.out_features) == (4, 12)
    linear = tucker_layers(adapted(MLP_CASE)[0])[0]
    assert (linear.in_features, linear.out_features) == (10, 20)


def test_all_linear_targets_every_linear_layer_of_the_encoder():
    base = tiny_deberta()
    encoder_linears = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.startswith("deberta.")}
    model = get_peft_model(base, tucker_lora.TuckerAdapterConfig(target_modules="all-linear"))
    adapted_names = {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, tucker_lora.TuckerLayer)
    }
    assert encoder_linears and encoder_linears <= adapted_names
