"""The batched cycle (`tucker_lora.batched_cycle`) against the per-layer reference (`tucker_lora.rank_ops`): the same
ranks, bit for bit, and the same adapters within the dtype's tolerance, for batches of same-shape layers with
different ranks, several shapes at once, and conv layers with channel modes and with all four modes."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

from tests.tolerances import ORTHONORMALITY_TOL, TOLERANCES
from tucker_lora import TuckerAdapterConfig, TuckerLayer, batched_cycle, optimizer_state, rank_ops
from tucker_lora.rank_updater import TuckerRankUpdater


class Mixed(nn.Module):
    """Five Linear(16, 16) (one batch), a Linear(16, 10) and a 3x3 conv (one layer each)."""

    def __init__(self) -> None:
        super().__init__()
        self.square = nn.ModuleList(nn.Linear(16, 16) for _ in range(5))
        self.wide = nn.Linear(16, 10)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.conv(image).mean(dim=(2, 3)) + x
        for layer in self.square:
            h = torch.tanh(layer(h))
        return self.wide(h)


def mixed_model(conv_modes: str = "channels", dtype: torch.dtype = torch.float64, seed: int = 0, **config):
    torch.manual_seed(seed)
    settings = {"r": 3, "r_max": 4, "tau": 0.2, "init_weights": False, "conv_modes": conv_modes}
    settings.update(config)
    targets = [f"square.{i}" for i in range(5)] + ["wide", "conv"]
    return get_peft_model(Mixed(), TuckerAdapterConfig(target_modules=targets, **settings)).to(dtype)


def tucker_layers(model) -> list[TuckerLayer]:
    return [m for m in model.modules() if isinstance(m, TuckerLayer)]


def randomize(model, seed: int = 1) -> None:
    """Different active ranks per layer (some at capacity), random orthonormal bases and cores in the blocks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, layer in enumerate(tucker_layers(model)):
            caps = layer.capacities("default")
            ranks = [max(1, c - (index + mode) % 3) if mode < 2 else c for mode, c in enumerate(caps)]
            for basis, rank in zip(layer.tucker_bases["default"], ranks):
                q, _ = torch.linalg.qr(torch.randn(basis.shape[0], rank, generator=generator, dtype=torch.float64))
                basis.zero_()
                basis[:, :rank] = q.to(basis.dtype)
            core = layer.tucker_core["default"]
            core.zero_()
            block = tuple(slice(0, r) for r in ranks)
            # decaying singular values, so that tau cuts somewhere inside the block
            values = torch.randn(core[block].shape, generator=generator, dtype=torch.float64)
            for mode, r in enumerate(ranks[:2]):
                scale = torch.logspace(0, -2, r, dtype=torch.float64)
                shape = [1] * values.dim()
                shape[mode] = r
                values = values * scale.reshape(shape)
            core[block] = values.to(core.dtype)
            layer.set_active_ranks("default", ranks)


def dense(layer) -> torch.Tensor:
    return layer.delta_weight("default").double()


def batches_of(model) -> list[batched_cycle.LayerBatch]:
    return batched_cycle.shape_batches([(str(i), m) for i, m in enumerate(tucker_layers(model))], "default")


def assert_storage_contract(layer) -> None:
    ranks = layer.active_ranks("default")
    core = layer.tucker_core["default"]
    mask = torch.ones_like(core, dtype=torch.bool)
    mask[tuple(slice(0, r) for r in ranks)] = False
    assert not core[mask].any()
    for basis, rank in zip(layer.tucker_bases["default"], ranks):
        assert not basis[:, rank:].any()
        u = basis[:, :rank].double()
        assert (u.T @ u - torch.eye(rank, dtype=torch.float64)).abs().max() < ORTHONORMALITY_TOL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("conv_modes", ["channels", "all"])
def test_batched_truncation_gives_the_reference_ranks_and_adapters(dtype, conv_modes):
    model = mixed_model(conv_modes, dtype)
    randomize(model)
    reference = copy.deepcopy(model)
    batches = batches_of(model)
    assert sorted(len(b) for b in batches) == [1, 1, 5]  # grouped by shape: the five squares together
    for tau in (0.05, 0.2, 0.5):
        expected = {}
        for layer in tucker_layers(reference):
            widths = layer.active_ranks("default")
            config = model.peft_config["default"]
            sizes = [b.shape[0] for b in layer.tucker_bases["default"]]
            r_min = [1 if i < 2 else min(1, n) for i, n in enumerate(sizes)]
            r_max = [config.r_max if i < 2 else n for i, n in enumerate(sizes)]
            spectra = rank_ops.truncation_spectra(layer.tucker_core["default"].data, widths)
            expected[id(layer)] = rank_ops.ranks_for_tolerance(spectra, widths, tau, r_min, r_max)
        for batch in batches:
            spectra = batched_cycle.truncation_spectra(batch)
            sizes = [b.shape[0] for b in batch.bases[0]]
            r_min = [1 if i < 2 else min(1, n) for i, n in enumerate(sizes)]
            r_max = [model.peft_config["default"].r_max if i < 2 else n for i, n in enumerate(sizes)]
            ranks = batched_cycle.ranks_for_tolerance(spectra, tau, r_min, r_max)
            ref_layers = [tucker_layers(reference)[tucker_layers(model).index(m)] for m in batch.layers]
            assert ranks == [expected[id(r)] for r in ref_layers], f"tau={tau}"
            # the per-layer view of the batched spectra gives the same ranks through the reference rule
            for index, r in enumerate(ranks):
                view = spectra.layer(index)
                assert rank_ops.ranks_for_tolerance(view, spectra.widths[index], tau, r_min, r_max) == r
    # phase 3 at one tau, against the reference truncate
    tau = 0.2
    tol = TOLERANCES[dtype]
    for layer, ref in zip(tucker_layers(model), tucker_layers(reference)):
        widths = ref.active_ranks("default")
        sizes = [b.shape[0] for b in ref.tucker_bases["default"]]
        r_min = [1 if i < 2 else min(1, n) for i, n in enumerate(sizes)]
        r_max = [4 if i < 2 else n for i, n in enumerate(sizes)]
        ranks, _ = rank_ops.truncate(
            ref.tucker_core["default"].data, [b.data for b in ref.tucker_bases["default"]], widths, tau, r_min, r_max
        )
        ref.set_active_ranks("default", ranks)
    for batch in batches:
        spectra = batched_cycle.truncation_spectra(batch)
        sizes = [b.shape[0] for b in batch.bases[0]]
        r_min = [1 if i < 2 else min(1, n) for i, n in enumerate(sizes)]
        r_max = [4 if i < 2 else n for i, n in enumerate(sizes)]
        ranks = batched_cycle.ranks_for_tolerance(spectra, tau, r_min, r_max)
        assert batched_cycle.apply_truncation(batch, spectra, ranks) is not None
        batched_cycle.set_ranks(batch, ranks)
    for layer, ref in zip(tucker_layers(model), tucker_layers(reference)):
        assert layer.active_ranks("default") == ref.active_ranks("default")
        assert layer.tucker_ranks["default"].tolist() == ref.active_ranks("default")
        torch.testing.assert_close(dense(layer), dense(ref), **tol)
        assert_storage_contract(layer)


@pytest.mark.parametrize("conv_modes", ["channels", "all"])
def test_batched_augmentation_gives_the_reference_widths_and_spans(conv_modes):
    model = mixed_model(conv_modes)
    randomize(model)
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(5)
    grads = {}
    for index, layer in enumerate(tucker_layers(model)):
        bases = layer.tucker_bases["default"]
        grads[index] = [torch.randn(b.shape, generator=generator, dtype=torch.float64) for b in bases]
        if index == 2:
            grads[index][0] = None  # a missing gradient skips that mode
        if index == 3:
            grads[index][1] = torch.zeros_like(grads[index][1])  # a zero gradient too
    layers = tucker_layers(model)
    grew = 0
    for batch in batches_of(model):
        widths = batched_cycle.augment(batch, [grads[layers.index(m)] for m in batch.layers])
        assert widths is not None
        batched_cycle.set_ranks(batch, widths)
    for index, (layer, ref) in enumerate(zip(layers, tucker_layers(reference))):
        ranks = ref.active_ranks("default")
        before = [b[:, :r].clone() for b, r in zip(ref.tucker_bases["default"], ranks)]
        widths = rank_ops.augment(
            ref.tucker_core["default"].data, [b.data for b in ref.tucker_bases["default"]], ranks, grads[index]
        )
        assert layer.active_ranks("default") == widths
        if index in (2, 3):
            assert widths[index - 2] == ranks[index - 2]
        grew += sum(w > r for w, r in zip(widths, ranks))
        for basis, ref_basis, old, r, w in zip(
            layer.tucker_bases["default"], ref.tucker_bases["default"], before, ranks, widths
        ):
            assert torch.equal(basis[:, :r], old)  # the active columns are kept as they are
            # the new directions span the same space (their signs are the eigensolver's choice)
            new, ref_new = basis[:, r:w], ref_basis[:, r:w]
            torch.testing.assert_close(new @ new.T, ref_new @ ref_new.T, **TOLERANCES[torch.float64])
        torch.testing.assert_close(dense(layer), dense(ref), **TOLERANCES[torch.float64])
        assert_storage_contract(layer)
    assert grew >= len(layers)  # most layers gained directions: the comparison covered real work


def test_batched_retraction_equals_the_reference():
    model = mixed_model()
    randomize(model)
    with torch.no_grad():  # bases drifted by optimizer steps: active columns no longer orthonormal
        generator = torch.Generator().manual_seed(3)
        for layer in tucker_layers(model):
            for basis, r in zip(layer.tucker_bases["default"], layer.active_ranks("default")):
                basis[:, :r] += 0.05 * torch.randn(basis.shape[0], r, generator=generator, dtype=basis.dtype)
    reference = copy.deepcopy(model)
    for batch in batches_of(model):
        assert batched_cycle.retract(batch)
    for layer, ref in zip(tucker_layers(model), tucker_layers(reference)):
        expected = dense(ref)
        rank_ops.retract(
            ref.tucker_core["default"].data, [b.data for b in ref.tucker_bases["default"]], ref.active_ranks("default")
        )
        for basis, ref_basis in zip(layer.tucker_bases["default"], ref.tucker_bases["default"]):
            torch.testing.assert_close(basis, ref_basis, **TOLERANCES[torch.float64])
        torch.testing.assert_close(
            layer.tucker_core["default"], ref.tucker_core["default"], **TOLERANCES[torch.float64]
        )
        torch.testing.assert_close(dense(layer), expected, **TOLERANCES[torch.float64])
        assert_storage_contract(layer)


def _force_reference(monkeypatch) -> None:
    """Makes every batched step report a failed factorization, so that the updater runs the per-layer reference."""
    monkeypatch.setattr(batched_cycle, "retract", lambda batch: False)
    monkeypatch.setattr(batched_cycle, "augment", lambda batch, grads, **kw: None)
    monkeypatch.setattr(batched_cycle, "apply_truncation", lambda batch, spectra, ranks: None)


def _train(model, steps: int, monkeypatch=None) -> list[list[list[int]]]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    updater = TuckerRankUpdater(model, optimizer)
    history = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        x = torch.randn(8, 16, generator=generator, dtype=torch.float64)
        image = torch.randn(8, 3, 5, 5, generator=generator, dtype=torch.float64)
        target = torch.sin(2 * x[:, :10])
        ((model(x, image) - target) ** 2).mean().backward()
        updater.before_step()
        optimizer.step()
        updater.after_step()
        optimizer.zero_grad()
        history.append([layer.active_ranks("default") for layer in tucker_layers(model)])
    return history


@pytest.mark.parametrize("train_bases", [True, False])
def test_updater_batched_cycle_follows_the_per_layer_reference(train_bases, monkeypatch):
    """Whole training runs, float64: the batched updater and the per-layer reference take the same ranks at every
    step and end with the same adapters (optimizer-state rotation included)."""
    config = {"augment_start_step": 1, "core_steps": 2, "tau": 0.1, "train_bases": train_bases}
    batched = mixed_model(**config)
    reference = copy.deepcopy(batched)
    ranks_batched = _train(batched, 9)
    _force_reference(monkeypatch)
    ranks_reference = _train(reference, 9)
    assert ranks_batched == ranks_reference
    assert len({tuple(map(tuple, r)) for r in ranks_batched}) > 2  # the ranks moved
    for layer, ref in zip(tucker_layers(batched), tucker_layers(reference)):
        torch.testing.assert_close(dense(layer), dense(ref), atol=1e-8, rtol=1e-6)
        assert_storage_contract(layer)


@pytest.mark.parametrize("cycles", [300, pytest.param(2000, marks=pytest.mark.slow)])
def test_batched_cycle_keeps_bases_orthonormal_over_many_cycles(cycles):
    """float32 storage, capacity equal to the mode size (where augmentation that is not rank-revealing broke
    orthonormality in the prototype), three same-shape layers with different ranks, random gradients of three kinds,
    the batched augmentation and truncation only."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(6, 6) for _ in range(3)))
    config = TuckerAdapterConfig(r=2, r_max=3, target_modules=["0", "1", "2"], init_weights=False)
    layers = tucker_layers(get_peft_model(model, config))
    assert all(layer.capacities("default") == [6, 6] for layer in layers)
    (batch,) = batched_cycle.shape_batches([(str(i), m) for i, m in enumerate(layers)], "default")
    worst, seen = 0.0, set()
    for cycle in range(cycles):
        kind = cycle % 4
        grads = []
        for layer in layers:
            layer_grads = []
            for basis, r in zip(layer.tucker_bases["default"], layer.active_ranks("default")):
                g = torch.randn(basis.shape)
                if kind == 1:  # nearly inside span(U): the projected gradient is tiny
                    g = basis[:, :r].detach() @ torch.randn(r, basis.shape[1]) + 1e-7 * g
                elif kind == 2:  # low rank
                    g = torch.randn(basis.shape[0], 1) @ torch.randn(1, basis.shape[1])
                layer_grads.append(g)
            grads.append(layer_grads)
        widths = batched_cycle.augment(batch, grads)
        assert widths is not None
        batched_cycle.set_ranks(batch, widths)
        with torch.no_grad():
            for layer, w in zip(layers, widths):
                core = layer.tucker_core["default"]
                block = tuple(slice(0, x) for x in w)
                active = core[block] / torch.linalg.vector_norm(core[block]).clamp_min(1e-12)
                core[block] = active + torch.randn(active.shape) * (0.02, 0.3, 1.0)[cycle % 3]
        spectra = batched_cycle.truncation_spectra(batch)
        ranks = batched_cycle.ranks_for_tolerance(spectra, 0.15, 1, 3)
        assert batched_cycle.apply_truncation(batch, spectra, ranks) is not None
        batched_cycle.set_ranks(batch, ranks)
        for layer in layers:
            for basis, r in zip(layer.tucker_bases["default"], layer.active_ranks("default")):
                u = basis[:, :r].detach().double()
                worst = max(worst, float((u.T @ u - torch.eye(r, dtype=torch.float64)).abs().max()))
                assert not basis[:, r:].any()
        seen.add(tuple(map(tuple, ranks)))
    assert worst < ORTHONORMALITY_TOL
    assert len(seen) >= 3  # ranks moved: the test exercised growth and truncation


def test_augmentation_reads_only_the_leading_gradient_columns():
    """The updater keeps only `dL/dU[:, :r]` for augmentation: the batched augmentation gives the same bases, bit for
    bit, from those leading columns as from the gradients at capacity, and the reference too."""
    model = mixed_model()
    randomize(model)
    narrow_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    grads = [
        [torch.randn(b.shape, generator=generator, dtype=torch.float64) for b in layer.tucker_bases["default"]]
        for layer in tucker_layers(model)
    ]
    # each layer's own rank (the stacks then differ in width), as the reference reads them
    narrow = [[g[:, :r].clone() for g, r in zip(gs, layer.active_ranks("default"))]
              for gs, layer in zip(grads, tucker_layers(model))]  # fmt: skip
    for target, layer_grads in ((model, grads), (narrow_model, narrow)):
        layers = tucker_layers(target)
        for batch in batches_of(target):
            widths = batched_cycle.augment(batch, [layer_grads[layers.index(m)] for m in batch.layers])
            batched_cycle.set_ranks(batch, widths)
    for index, (full, cut, ref) in enumerate(zip(*map(tucker_layers, (model, narrow_model, reference)))):
        assert full.active_ranks("default") == cut.active_ranks("default")
        for a, b in zip(full.tucker_bases["default"], cut.tucker_bases["default"]):
            assert torch.equal(a, b)
        ranks = ref.active_ranks("default")
        widths = rank_ops.augment(
            ref.tucker_core["default"].data, [b.data for b in ref.tucker_bases["default"]], ranks, narrow[index]
        )
        assert widths == cut.active_ranks("default")


def test_before_step_keeps_only_the_gradient_columns_the_augmentation_reads():
    model = mixed_model(augment_start_step=1, core_steps=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    updater = TuckerRankUpdater(model, optimizer)
    x, image = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 3, 5, 5, dtype=torch.float64)
    model(x, image).square().mean().backward()
    updater.before_step()  # step 1 ends with an augmentation
    for batch in batches_of(model):
        widest = [max(r[mode] for r in batch.ranks()) for mode in range(batch.n_modes)]
        for layer in batch.layers:
            kept = updater._basis_grads[id(layer)]
            for grad, basis, w, cap in zip(kept, layer.tucker_bases["default"], widest, layer.capacities("default")):
                assert w == min(3, cap)  # every layer starts at r=3: the gradients at capacity (8) are not kept
                assert grad.shape == (basis.shape[0], w)
                assert torch.equal(grad, basis.grad[:, :w])


def _stepped_optimizer(model, steps: int = 3) -> torch.optim.Optimizer:
    """AdamW with non-zero moments in every entry of cores and bases, also outside the active blocks (stale values
    that the batched state updates must zero, as the per-layer ones do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(11)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()
    return optimizer


def _moment_tensors(model, optimizer) -> list[torch.Tensor]:
    out = []
    for layer in tucker_layers(model):
        for param in (layer.tucker_core["default"], *layer.tucker_bases["default"]):
            out += [optimizer.state[param][key] for key in ("exp_avg", "exp_avg_sq")]
    return out


@pytest.mark.parametrize("conv_modes", ["channels", "all"])
def test_batched_optimizer_state_follows_the_cycle_as_the_per_layer_functions(conv_modes):
    """Augmentation then truncation on the active leading blocks only: the moments of cores and bases equal those of
    the per-layer functions (`optimizer_state`, fed the same rotations), and are zero outside the new blocks."""
    models = [mixed_model(conv_modes) for _ in range(2)]  # batched, per-layer: same weights, same optimizer state
    optimizers = [_stepped_optimizer(model) for model in models]
    for model in models:
        randomize(model)  # the weights as the cycle expects them (zero outside the blocks); the moments stay stale
    layers, ref_layers = (tucker_layers(model) for model in models)
    generator = torch.Generator().manual_seed(5)
    grads = [[torch.randn(b.shape, generator=generator, dtype=torch.float64) for b in layer.tucker_bases["default"]]
             for layer in layers]  # fmt: skip
    for batch in batches_of(models[0]):
        ranks = batch.ranks()
        widths = batched_cycle.augment(batch, [grads[layers.index(m)] for m in batch.layers])
        batched_cycle.state_after_augment(optimizers[0], batch, ranks, train_bases=True)
        batched_cycle.set_ranks(batch, widths)
        for layer, r in zip(batch.layers, ranks):
            ref = ref_layers[layers.index(layer)]
            optimizer_state.state_after_augment(optimizers[1], ref.tucker_core["default"], r)
            for basis, rank in zip(ref.tucker_bases["default"], r):
                optimizer_state.basis_state_after_augment(optimizers[1], basis, rank)
    for a, b in zip(*(_moment_tensors(m, o) for m, o in zip(models, optimizers))):
        assert torch.equal(a, b)
    cut = False
    for batch in batches_of(models[0]):
        spectra = batched_cycle.truncation_spectra(batch)
        sizes = [b.shape[0] for b in batch.bases[0]]
        r_max = [4 if i < 2 else n for i, n in enumerate(sizes)]
        ranks = batched_cycle.ranks_for_tolerance(spectra, 0.2, 1, r_max)
        cut |= ranks != spectra.widths
        rotations = batched_cycle.apply_truncation(batch, spectra, ranks)
        assert batched_cycle.state_after_truncate(optimizers[0], batch, rotations, train_bases=True)
        batched_cycle.set_ranks(batch, ranks)
        per_layer = batched_cycle.per_layer_rotations(rotations, spectra.widths, ranks)
        for layer, widths, layer_rotations in zip(batch.layers, spectra.widths, per_layer):
            ref = ref_layers[layers.index(layer)]
            optimizer_state.state_after_truncate(optimizers[1], ref.tucker_core["default"], widths, layer_rotations)
            for basis, width, rotation in zip(ref.tucker_bases["default"], widths, layer_rotations):
                optimizer_state.basis_state_after_truncate(optimizers[1], basis, width, rotation)
    assert cut  # the truncation rotated and cut: the comparison covered real work
    for a, b in zip(*(_moment_tensors(m, o) for m, o in zip(models, optimizers))):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])
    for layer in layers:
        ranks = layer.active_ranks("default")
        for key in ("exp_avg", "exp_avg_sq"):
            core_state = optimizers[0].state[layer.tucker_core["default"]][key]
            assert not core_state[~_block(core_state.shape, ranks)].any()
            for basis, r in zip(layer.tucker_bases["default"], ranks):
                assert not optimizers[0].state[basis][key][:, r:].any()


def _block(shape, ranks) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(slice(0, r) for r in ranks)] = True
    return mask
