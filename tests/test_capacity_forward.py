"""The adapter forward computes on the capacity-sized tensors, without slicing: exact because everything outside the
active block is zero. These tests check both halves: the output and gradients equal the sliced computation, and the
zeros outside the active block survive every path (init, training with AdamW / SGD weight decay and `train_bases`,
augmentation, truncation, retraction, loading)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import adapted, set_ranks_by_hand, tucker_layers
from tests.test_rank_updater import batch, layers, make
from tests.tolerances import assert_close
from tests.toy_models import CASES
from tucker_lora.rank_updater import TuckerRankUpdater

FORWARD_CASES = [c for c in CASES if c.name in ("mlp", "conv3x3", "conv3x3-stride2-pad2-dil2", "conv3x3-all-modes")]


def sliced_output(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter output computed from the active slices only (the reference the capacity forward must equal)."""
    bases = layer.active_bases(name)
    if x.dim() == 2 or isinstance(layer.get_base_layer(), torch.nn.Linear):
        u_out, u_in = bases
        return ((x @ u_in) @ layer.active_core(name).T) @ u_out.T
    base = layer.get_base_layer()
    h = F.conv2d(x, bases[1].T[:, :, None, None])
    h = F.conv2d(h, layer.spatial_kernel(name), stride=base.stride, padding=base.padding, dilation=base.dilation)
    return F.conv2d(h, bases[0][:, :, None, None])


def outside_active(layer, name: str, tensors: list[torch.Tensor] | None = None) -> float:
    """Largest |entry| outside the active block of the core and the bases (or of core/basis-shaped `tensors`)."""
    if tensors is None:
        tensors = [layer.tucker_core[name], *layer.tucker_bases[name]]
    core, *bases = [t.detach() for t in tensors]
    ranks = layer.active_ranks(name)
    mask = torch.ones_like(core, dtype=torch.bool)
    mask[tuple(slice(0, r) for r in ranks)] = False
    values = [core[mask].abs().max() if mask.any() else core.new_zeros(())]
    values += [b[:, r:].abs().max() if r < b.shape[1] else b.new_zeros(()) for b, r in zip(bases, ranks)]
    return float(torch.stack([v.float() for v in values]).max())


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c.name for c in FORWARD_CASES])
def test_capacity_forward_equals_sliced_forward_with_zero_gradients_outside(case):
    model, inputs = adapted(case, init_weights=False)
    model.double()  # float64: the two orders of summation agree to float64's tolerance
    for index, layer in enumerate(tucker_layers(model)):
        capacities = layer.capacities("default")
        ranks = [max(1, c - 1 - index) if i < 2 else min(2, c) for i, c in enumerate(capacities)]
        set_ranks_by_hand(layer, "default", ranks, seed=index)
        params = [layer.tucker_core["default"], *layer.tucker_bases["default"]]
        base = layer.get_base_layer()
        shape = (4, base.in_features) if isinstance(base, torch.nn.Linear) else (2, base.in_channels, 9, 9)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        grads = []
        for forward in (layer._adapter_output, lambda n, h, layer=layer: sliced_output(layer, n, h)):
            for p in params:
                p.grad = None
            out = forward("default", x)
            (out.sin().sum()).backward()
            grads.append((out.detach(), [p.grad.clone() for p in params]))
        (out_capacity, grads_capacity), (out_sliced, grads_sliced) = grads
        assert_close(out_capacity, out_sliced)
        for g_capacity, g_sliced in zip(grads_capacity, grads_sliced):
            assert_close(g_capacity, g_sliced)
        assert outside_active(layer, "default", grads_capacity) == 0.0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("conv_modes", ["channels", "all"])
def test_zeros_outside_the_active_block_survive_training_and_every_cycle_event(optimizer, conv_modes):
    """Weight decay and momentum keep a zero parameter with zero gradient (and zero moments) at exactly zero, and
    augment / truncate / retract write zeros outside the new block, so the capacity forward stays exact."""
    model, opt = make(
        optimizer=optimizer, conv_modes=conv_modes, init_weights=False, augment_start_step=2, core_steps=2,
        train_bases=True,
    )  # fmt: skip
    updater = TuckerRankUpdater(model, opt)
    seen_ranks = set()
    for step in range(12):
        x, image, target = batch(step)
        ((model(x, image) - target) ** 2).mean().backward()
        for layer in layers(model):
            grads = [layer.tucker_core["default"].grad, *(b.grad for b in layer.tucker_bases["default"])]
            assert outside_active(layer, "default", grads) == 0.0, f"gradient outside the block at step {step}"
        updater.before_step()
        opt.step()
        for layer in layers(model):
            assert outside_active(layer, "default") == 0.0, f"optimizer step {step} wrote outside the block"
        updater.after_step()
        opt.zero_grad()
        for layer in layers(model):
            assert outside_active(layer, "default") == 0.0, f"cycle event after step {step} left entries outside"
            seen_ranks.add(tuple(layer.active_ranks("default")))
            params = [layer.tucker_core["default"], *layer.tucker_bases["default"]]
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                state = [opt.state.get(p, {}).get(key) for p in params]
                if all(s is not None for s in state):
                    assert outside_active(layer, "default", state) == 0.0, f"{key} outside the block, step {step}"
    updater.finalize()
    for layer in layers(model):
        assert outside_active(layer, "default") == 0.0
    assert len(seen_ranks) > 2  # the ranks really changed: augmented and truncated blocks were both exercised


def test_loading_a_state_dict_zeros_entries_outside_the_active_block():
    """A state dict written by hand with values outside the active block: loading zeros them, so the capacity
    forward gives what the active block alone gives."""
    model, inputs = adapted(CASES[0], init_weights=False)
    layer = tucker_layers(model)[0]
    set_ranks_by_hand(layer, "default", [2, 1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = next(k for k in state if k.endswith("tucker_core.default")).removesuffix("tucker_core.default")
    state[prefix + "tucker_core.default"][2:, :] = 5.0
    state[prefix + "tucker_bases.default.1"][:, 1:] = -3.0
    model.load_state_dict(state)
    assert layer.active_ranks("default") == [2, 1]
    assert outside_active(layer, "default") == 0.0
    x = torch.randn(3, layer.get_base_layer().in_features)
    assert_close(layer._adapter_output("default", x), sliced_output(layer, "default", x))
