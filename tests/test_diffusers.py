"""Tucker adapters in a diffusers UNet: add_adapter, set_adapters, cross_attention_kwargs scale."""

from __future__ import annotations

import torch

import tucker_lora
from tests.helpers import tucker_layers
from tests.tolerances import assert_close
from tests.toy_models import UNET_TARGETS, _unet_inputs, tiny_unet


def _unet_with_adapter():
    torch.manual_seed(0)
    unet = tiny_unet()
    with torch.no_grad():
        base = unet(**_unet_inputs()).sample
    unet.add_adapter(tucker_lora.TuckerAdapterConfig(r=2, target_modules=UNET_TARGETS, init_weights=False))
    return unet, base


def test_add_adapter_adapts_convolutions_and_attention():
    unet, _ = _unet_with_adapter()
    adapted = {type(m.get_base_layer()).__name__ for m in tucker_layers(unet)}
    assert adapted == {"Linear", "Conv2d"}
    assert any(name.endswith("resnets.0.conv1") for name in tucker_lora.get_ranks(unet))


def test_cross_attention_kwargs_scale_and_set_adapters():
    unet, base = _unet_with_adapter()
    inputs = _unet_inputs()
    with torch.no_grad():
        full = unet(**inputs).sample
        # diffusers scales every PEFT layer through scale_layer, then restores it with unscale_layer
        zero = unet(**inputs, cross_attention_kwargs={"scale": 0.0}).sample
        after = unet(**inputs).sample
    assert not torch.allclose(full, base)
    assert_close(zero, base)
    assert_close(after, full)
    unet.set_adapters(["default"], weights=[0.0])
    with torch.no_grad():
        assert_close(unet(**inputs).sample, base)
    unet.set_adapters(["default"], weights=[1.0])
    with torch.no_grad():
        assert_close(unet(**inputs).sample, full)
