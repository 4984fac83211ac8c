"""Non-finite values at the rank cycle's events, and misuse of the updater's call order."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import tucker_lora
from tests.ddp.task import Regressor, dataset, tucker_model
from tucker_lora import TuckerLayer, TuckerRankUpdater

DATA = dataset(n=64)


def batch(i: int) -> dict:
    rows = DATA[(i * 8) % 64 : (i * 8) % 64 + 8]
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


def layers(model):
    return [m for m in model.modules() if isinstance(m, TuckerLayer)]


def optimizer_of(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def step(model, optimizer, updater, i, poison=None):
    """One ordinary step; `poison="scaler"` puts inf in every gradient and skips `optimizer.step()`, as an fp16 loss
    scaler does on an overflow; `poison="nan"` puts NaN in every gradient and steps."""
    loss = model(**batch(i))["loss"]
    loss.backward()
    if poison is not None:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("inf") if poison == "scaler" else float("nan"))
    updater.before_step()
    if poison != "scaler":
        optimizer.step()
    updater.after_step()
    optimizer.zero_grad()


def all_finite(model) -> bool:
    return all(
        torch.isfinite(t).all()
        for layer in layers(model)
        for t in [layer.tucker_core["default"], *layer.tucker_bases["default"]]
    )


def test_nonfinite_gradients_at_an_augmentation_skip_it_with_a_warning():
    # augmentation after step 2, then every 3 steps (core_steps=2): steps 2, 5, 8
    model = tucker_model(core_steps=2, augment_start_step=2)
    optimizer = optimizer_of(model)
    updater = TuckerRankUpdater(model, optimizer)
    step(model, optimizer, updater, 0)
    before = tucker_lora.get_ranks(model)
    with pytest.warns(UserWarning, match=r"Optimizer step 2: non-finite basis gradients in \['inp', 'conv'\]"):
        step(model, optimizer, updater, 1, poison="scaler")
    assert tucker_lora.get_ranks(model) == before  # not augmented, not collapsed to r_min
    assert all_finite(model)
    for i in range(2, 8):  # the cycle goes on: the next augmentation (step 5) runs
        step(model, optimizer, updater, i)
    assert all_finite(model)
    assert updater.step == 8 and updater.groups[0].augmented


def test_a_nonfinite_core_at_a_cycle_event_raises_naming_the_layers():
    model = tucker_model(core_steps=2, augment_start_step=2)
    optimizer = optimizer_of(model)
    updater = TuckerRankUpdater(model, optimizer)
    step(model, optimizer, updater, 0)
    with pytest.raises(FloatingPointError, match=r"after optimizer step 2, in \['inp', 'conv'\]"):
        step(model, optimizer, updater, 1, poison="nan")
    # the bases never took the NaN
    assert all(torch.isfinite(b).all() for layer in layers(model) for b in layer.tucker_bases["default"])


def test_huge_finite_values_are_finite_for_the_checks():
    """The checks' Euclidean norms overflow for huge finite values; those tensors are decided by their largest
    magnitude, so only NaN and inf count as non-finite."""
    from tucker_lora.cycle_checks import _finite_flags

    huge = torch.full((4, 4), 1e30)  # ||huge||_2 overflows float32, |huge|_max does not
    assert torch.isinf(torch.linalg.vector_norm(huge))
    nan, inf = torch.ones(3), torch.ones(3)
    nan[1], inf[2] = float("nan"), -float("inf")
    flags = _finite_flags([huge, None, nan, torch.ones(2), inf, huge.double()])
    assert flags == [True, True, False, True, False, True]


def test_an_fp16_base_trains_a_float32_adapter_with_adamw():
    torch.manual_seed(0)
    base = Regressor().half()
    config = tucker_lora.TuckerAdapterConfig(r=2, r_max=4, target_modules=["inp", "conv"], core_steps=2)
    model = get_peft_model(base, config)
    assert all(layer.tucker_core["default"].dtype == torch.float32 for layer in layers(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-8)
    updater = TuckerRankUpdater(model, optimizer)
    for i in range(10):
        rows = batch(i)
        loss = model(x=rows["x"].half(), image=rows["image"].half(), labels=rows["labels"].half())["loss"]
        loss.float().backward()
        updater.before_step()
        optimizer.step()
        updater.after_step()
        optimizer.zero_grad()
    assert all_finite(model)


def loss_backward(model, i=0):
    model(**batch(i))["loss"].backward()


def test_an_optimizer_without_the_cores_is_rejected_naming_them():
    model = tucker_model()
    head_only = torch.optim.AdamW(model.base_model.model.out.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"does not hold these Tucker cores: \['inp.tucker_core.default', 'conv"):
        TuckerRankUpdater(model, head_only)


def test_before_step_twice_is_an_error():
    model = tucker_model()
    updater = TuckerRankUpdater(model, optimizer_of(model))
    loss_backward(model)
    updater.before_step()
    with pytest.raises(RuntimeError, match=r"before_step\(\) was called twice for optimizer step 1\. Call order"):
        updater.before_step()


def test_after_step_twice_is_an_error():
    model = tucker_model()
    optimizer = optimizer_of(model)
    updater = TuckerRankUpdater(model, optimizer)
    step(model, optimizer, updater, 0)
    with pytest.raises(RuntimeError, match=r"after_step\(\) was called twice in a row .* at step 2\. Call order"):
        updater.after_step()


def test_forgotten_before_step_is_an_error():
    model = tucker_model()
    optimizer = optimizer_of(model)
    updater = TuckerRankUpdater(model, optimizer)
    step(model, optimizer, updater, 0)
    loss_backward(model, 1)
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"after_step\(\) without before_step\(\) at optimizer step 2"):
        updater.after_step()


def test_optimizer_step_before_before_step_is_an_error():
    model = tucker_model()
    optimizer = optimizer_of(model)
    updater = TuckerRankUpdater(model, optimizer)
    loss_backward(model)
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) ran before before_step\(\) at optimizer step 1"):
        updater.before_step()


def test_deleting_the_managed_adapter_names_it():
    model = tucker_model()
    optimizer = optimizer_of(model)
    updater = TuckerRankUpdater(model, optimizer)
    model.add_adapter("other", tucker_lora.TuckerAdapterConfig(r=2, target_modules=["inp"]))
    model.set_adapter("other")
    model.delete_adapter("default")
    with pytest.raises(RuntimeError, match=r"Adapter 'default', managed by this TuckerRankUpdater, is no longer"):
        updater.before_step()
