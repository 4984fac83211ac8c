"""`TuckerRankUpdater`: the rank-adaptive cycle of METHOD section 3 around an optimizer step, for any training loop.

Schedule, in optimizer steps, per adapter (`A = max(augment_start_step, 1)`, `c = core_steps`): after the
ordinary step number `A` (counting from 1) every adapted layer augments its bases from the basis gradients of
that step; the next `c` steps update the augmented core with frozen bases (Galerkin); the last of them ends with a
HOSVD truncation. Then the truncated adapter takes one ordinary step and the next cycle augments: a cycle is
`c + 1` optimizer steps, and every batch updates the core, so the cost is one forward and one backward per batch.
The schedule is a function of the step count alone, so a run resumed from any checkpoint continues exactly, and
`finalize()` truncates an adapter that is mid-cycle, so that saved final ranks never include unvetted directions.

With `train_bases=True` (the default) the optimizer steps the active basis columns too, every step, and every cycle
event starts by making the bases orthonormal again (`rank_ops.retract`). With `train_bases=False` the optimizer never
steps a basis: `before_step()` moves the basis gradients aside and sets `.grad = None`.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import batched_cycle
from .absorbed_core import fold, folds, keep_in_bases, scale_in_basis_steps
from .budget import BudgetLayer, allocate_ranks, budget_at_step, layer_energies, parameter_count
from .config import TuckerAdapterConfig
from .cycle_checks import (
    check_after_step,
    check_before_step,
    check_optimizer_holds_cores,
    cores_replaced,
    count_optimizer_steps,
    record_cores,
    skip_nonfinite_event,
)
from .distributed import broadcast_tensors, check_no_parameter_sharding, is_distributed
from .layer import TuckerLayer
from .optimizer_state import basis_state_after_truncate, state_after_truncate, unwrap_optimizer
from .rank_ops import apply_truncation, augment, retract, truncation_spectra

logger = logging.getLogger(__name__)

MODE_NAMES = ("out", "in", "kh", "kw")
# optimizer steps a Tucker adapter may train without any rank update before `watch_rank_updates` warns
MISSING_UPDATER_STEPS = 300
_UPDATED_LAYERS: weakref.WeakSet = weakref.WeakSet()  # layers managed by a TuckerRankUpdater
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> adapter names (watch_rank_updates)
_step_hook = None
_unmanaged_steps = 0
_warned_missing_updater = False


def _unwrap_model(model: nn.Module) -> nn.Module:
    # DistributedDataParallel (and accelerate's prepared model) keep the model in `.module`
    while isinstance(model, nn.parallel.DistributedDataParallel) or (
        not hasattr(model, "peft_config") and isinstance(getattr(model, "module", None), nn.Module)
    ):
        model = model.module
    return model


class _Group:
    """The layers of one adapter name and the schedule its config sets."""

    def __init__(self, name: str, config: TuckerAdapterConfig, layers: list[tuple[str, TuckerLayer]]) -> None:
        self.name, self.config, self.layers = name, config, layers
        self.start = max(int(config.augment_start_step), 1)
        self.core_steps = int(config.core_steps)
        self.settled = {module: layer.active_ranks(name) for module, layer in layers}
        # whether the latest cycle event of this updater was an augmentation; None: none yet (e.g. after a resume)
        self.augmented: bool | None = None
        self.applied_budget: int | None = None  # the parameter budget of this updater's latest truncation

    def ramp_steps(self, total_steps: int | None) -> int | None:
        return self._steps("budget_ramp", total_steps)

    def _steps(self, field: str, total_steps: int | None) -> int | None:
        """A schedule setting (`freeze_ranks_after`, `tau_warmup`, `budget_ramp`) in optimizer steps."""
        value = getattr(self.config, field)
        if value is None:
            return None
        if isinstance(value, float):
            if total_steps is None or total_steps <= 0:
                raise ValueError(
                    f"`{field}={value}` is a fraction of the run; pass `total_steps` to TuckerRankUpdater "
                    "(TuckerRankCallback takes it from the Trainer)."
                )
            return math.ceil(value * total_steps)
        return int(value)

    def freeze_step(self, total_steps: int | None) -> int | None:
        return self._steps("freeze_ranks_after", total_steps)

    def tau(self, n: int, total_steps: int | None) -> float:
        """The truncation tolerance at the end of optimizer step `n`: `tau`, ramped from 0 over `tau_warmup`."""
        warmup = self._steps("tau_warmup", total_steps)
        if not warmup:
            return self.config.tau
        return self.config.tau * min(1.0, n / warmup)

    def action(self, n: int, total_steps: int | None) -> str | None:
        """What ends optimizer step `n` (counted from 1): "augment", "truncate" or nothing."""
        if n < self.start:
            return None
        offset = (n - self.start) % (self.core_steps + 1)
        freeze = self.freeze_step(total_steps)
        cycle_start = n - offset
        if freeze is not None and cycle_start >= freeze:
            return None
        return "augment" if offset == 0 else "truncate" if offset == self.core_steps else None

    def last_truncation(self, n: int, total_steps: int | None) -> int | None:
        """The latest step `<= n` that the schedule ends with a truncation; `None` before the first."""
        period, first = self.core_steps + 1, self.start + self.core_steps
        if n < first:
            return None
        last = n - (n - first) % period
        freeze = self.freeze_step(total_steps)
        if freeze is not None and last - self.core_steps >= freeze:  # that cycle never started: the one before
            if freeze <= self.start:
                return None
            last = self.start + (freeze - 1 - self.start) // period * period + self.core_steps
        return last

    def mid_cycle(self, n: int, total_steps: int | None) -> bool:
        """Whether the adapter is augmented and not yet truncated after `n` completed steps."""
        if n < self.start:
            return False
        offset = (n - self.start) % (self.core_steps + 1)
        freeze = self.freeze_step(total_steps)
        return offset != self.core_steps and not (freeze is not None and n - offset >= freeze)


class TuckerRankUpdater:
    """
    Runs the rank-adaptive cycle (augment, `core_steps` Galerkin steps, truncate) of every Tucker adapter of a model.

    The cycle settings (`tau`, `r_min`, `r_max`, `core_steps`, `augment_start_step`, `freeze_ranks_after`,
    `param_budget`, `budget_ramp`) are read from `model.peft_config[adapter_name]`; with a `param_budget`, every
    truncation allocates the ranks over all layers of the adapter (`tucker_lora.budget`). Call `before_step()`
    between `backward()` (and gradient clipping) and `optimizer.step()`, `after_step()` right after
    `optimizer.step()`, once per optimizer step (not per micro-batch), and `finalize()` at the end of training.
    Under DDP (`torch.distributed` initialized with several processes), every cycle ends with the adapter tensors,
    ranks and the cores' optimizer state of process 0 broadcast to all.

    Args:
        model (`nn.Module`): a `PeftModel`, or a model with Tucker adapters added (`add_adapter`), possibly wrapped in
            `DistributedDataParallel`.
        optimizer (`torch.optim.Optimizer`, *optional*): the optimizer that steps the cores (or a wrapper with
            `.optimizer`); its state follows every cycle. `None` leaves optimizer state alone.
        adapter_names (`str` or `list[str]`, *optional*): the adapters to update; defaults to every Tucker adapter
            whose cores are trainable.
        total_steps (`int`, *optional*): the number of optimizer steps of the run, needed when `freeze_ranks_after`
            or `budget_ramp` is a fraction.

    Raises:
        `ValueError`: among others, when a `param_budget` is below the smallest feasible budget (every mode of every
            adapted layer at `r_min`), naming it.

    Example:

    ```python
    updater = TuckerRankUpdater(model, optimizer)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        updater.before_step()
        optimizer.step()
        updater.after_step()
        optimizer.zero_grad()
    updater.finalize()
    ```

    With Accelerate and gradient accumulation, call `before_step()`/`after_step()` only where
    `accelerator.sync_gradients` is true (around the real `optimizer.step()`), once per optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        adapter_names: str | list[str] | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.model = _unwrap_model(model)
        check_no_parameter_sharding(self.model)
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.total_steps = total_steps
        self.step = 0
        self.truncations = 0  # truncations done by this updater: the settled ranks (`metrics()`) change only there
        self._basis_grads: dict[int, list[torch.Tensor | None]] = {}
        self._in_bases: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # V before the step
        self.groups = self._find_groups(adapter_names)
        for group in self.groups:
            # a fraction without total_steps fails here, not mid-training
            group.freeze_step(total_steps), group.tau(1, total_steps), group.ramp_steps(total_steps)
            self._check_budget(group)
            for _, layer in group.layers:
                _UPDATED_LAYERS.add(layer)
        check_optimizer_holds_cores(self)
        count_optimizer_steps(self)
        record_cores(self)

    def _find_groups(self, adapter_names: str | list[str] | None) -> list[_Group]:
        configs = getattr(self.model, "peft_config", None)
        if not isinstance(configs, dict) or not configs:
            raise ValueError(
                f"TuckerRankUpdater needs a model with Tucker adapters (`get_peft_model` or `add_adapter` with a "
                f"TuckerAdapterConfig); {type(self.model).__name__} has no `peft_config`."
            )
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = adapter_names or [n for n, c in configs.items() if isinstance(c, TuckerAdapterConfig)]
        layers = [(name, m) for name, m in self.model.named_modules() if isinstance(m, TuckerLayer)]
        groups = []
        for name in names:
            config = configs.get(name)
            if not isinstance(config, TuckerAdapterConfig):
                raise ValueError(f"adapter {name!r} is not a Tucker adapter; Tucker adapters: {list(configs)}")
            owned = [
                (module.removeprefix("base_model.model."), layer)
                for module, layer in layers
                if name in layer.tucker_core and (adapter_names or layer.tucker_core[name].requires_grad)
            ]
            if owned:
                groups.append(_Group(name, config, owned))
        if not groups:
            raise ValueError(f"no trainable Tucker adapter found in the model (adapters: {list(configs)})")
        return groups

    # ---- the hooks around optimizer.step() ----------------------------------------------------------------------

    def before_step(self) -> None:
        """Keeps the basis gradients for augmentation when this step ends with one, and with `in_basis_lr_ratio` a
        copy of every folded input basis (`after_step()` stretches its step). Without `train_bases`, sets `.grad =
        None` on every basis, so that the optimizer neither updates nor decays the bases."""
        check_before_step(self)
        n = self.step + 1
        for group in self.groups:
            keep = group.action(n, self.total_steps) == "augment"
            bases = [b for _, layer in group.layers for b in layer.tucker_bases[group.name]]
            grads = [b.grad for b in bases if b.grad is not None]
            if keep:
                # copies (the optimizer step below must not see them change), and only of the columns the batched
                # augmentation reads, `dL/dU[:, :r]` up to the largest rank of the layer's shape batch
                for batch in batched_cycle.shape_batches(group.layers, group.name):
                    for layer, kept in zip(batch.layers, batched_cycle.kept_gradients(batch)):
                        self._basis_grads[id(layer)] = kept
            if group.config.absorb_core:  # validated: implies train_bases
                folded = [layer for _, layer in group.layers if folds(group.config, layer.tucker_core[group.name])]
                for layer in folded:
                    layer.tucker_core[group.name].grad = None  # folded: the core stays I, K = U C and V learn
                self._in_bases[group.name] = keep_in_bases(folded, group.name, group.config.in_basis_lr_ratio)
            if not group.config.train_bases:
                for basis in bases:
                    basis.grad = None
            else:
                for grad in grads:
                    # a non-finite step would reach the bases; the core's raises at the next cycle event
                    torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def after_step(self) -> None:
        """Ends optimizer step `self.step + 1`: augments or truncates as the schedule says, then syncs processes."""
        check_after_step(self)
        n = self.step + 1
        for group in self.groups:
            # first the step itself (`in_basis_lr_ratio`), then the cycle event that ends it
            scale_in_basis_steps(self._in_bases.pop(group.name, []), group.config.in_basis_lr_ratio)
            action = group.action(n, self.total_steps)
            if action is not None and skip_nonfinite_event(self, group, action, n):
                continue
            if action == "augment":
                self._augment(group)
            elif action == "truncate":
                self._truncate(group)
        self._basis_grads.clear()
        self.step = n
        record_cores(self)

    def finalize(self) -> None:
        """Truncates every adapter that is mid-cycle, so that the final ranks hold only vetted directions; with
        `train_bases`, makes the bases of the others orthonormal again."""
        for group in self.groups:
            mid_cycle = (
                group.augmented if group.augmented is not None else group.mid_cycle(self.step, self.total_steps)
            )
            if cores_replaced(self, group):
                continue  # a checkpoint loaded after the last step (load_best_model_at_end) is kept as saved
            if mid_cycle:
                self._truncate(group, finalizing=True)
            elif group.config.train_bases:
                self._retract(group)
                self._sync(group)

    # ---- the cycle ----------------------------------------------------------------------------------------------

    def _bounds(self, group: _Group, layer: TuckerLayer) -> tuple[list[int], list[int]]:
        sizes = [basis.shape[0] for basis in layer.tucker_bases[group.name]]
        config = group.config
        r_min = [config.r_min if i < 2 else min(config.r_min, n) for i, n in enumerate(sizes)]
        r_max = [config.r_max if i < 2 else n for i, n in enumerate(sizes)]
        return r_min, r_max

    @torch.no_grad()
    def _retract(self, group: _Group) -> None:
        """Orthonormal bases again after the optimizer stepped them (`train_bases`); `dW` unchanged. The optimizer
        state is kept as it is: the triangular factors are close to the identity after a few steps."""
        for batch in batched_cycle.shape_batches(group.layers, group.name):
            if not batched_cycle.retract(batch):
                for layer, core, bases, ranks in zip(batch.layers, batch.cores, batch.bases, batch.ranks()):
                    retract(core.data, [b.data for b in bases], ranks)

    @torch.no_grad()
    def _augment(self, group: _Group) -> None:
        if group.config.train_bases:
            self._retract(group)
        for batch in batched_cycle.shape_batches(group.layers, group.name):
            ranks = batch.ranks()
            grads = [self._basis_grads.get(id(layer), [None] * batch.n_modes) for layer in batch.layers]
            widths = batched_cycle.augment(batch, grads)
            if widths is None:  # a batched factorization failed: the per-layer reference, with its QR fallback
                widths = [
                    augment(core.data, [b.data for b in bases], r, g)
                    for core, bases, r, g in zip(batch.cores, batch.bases, ranks, grads)
                ]
            if self.optimizer is not None:
                batched_cycle.state_after_augment(self.optimizer, batch, ranks, group.config.train_bases)
            batched_cycle.set_ranks(batch, widths)
            self._fold(group, batch)
        self._sync(group)
        group.augmented = True

    @torch.no_grad()
    def _truncate(self, group: _Group, finalizing: bool = False) -> None:
        """HOSVD truncation of every layer in three phases: the spectra of all layers (batched per shape), the new
        ranks of all layers (on the host: the tolerance rule, then the budget over all layers), then the truncation
        itself (batched per shape). `finalizing`: the adapter stays in the Tucker form (`absorb_core` folds it
        otherwise)."""
        if group.config.train_bases:
            self._retract(group)
        batches = batched_cycle.shape_batches(group.layers, group.name)
        spectra = [batched_cycle.truncation_spectra(batch) for batch in batches]
        ranks = self._choose_ranks(group, batches, spectra)
        if group.config.param_budget is not None:
            ranks = self._fit_budget(group, batches, spectra, ranks)
        for batch, batch_spectra, batch_ranks in zip(batches, spectra, ranks):
            self._apply_truncation(group, batch, batch_spectra, batch_ranks)
            batched_cycle.set_ranks(batch, batch_ranks)
            if not finalizing:
                self._fold(group, batch)
        self._sync(group)
        group.augmented = False
        for module, layer in group.layers:
            group.settled[module] = layer.active_ranks(group.name)
        self.truncations += 1

    # ---- the parameter budget ----------------------------------------------------------------------------------

    def _layer_sizes(self, group: _Group, layer: TuckerLayer) -> tuple[list[int], int]:
        """`n_i` per adaptive mode and the product of the core's unfactored trailing sizes."""
        bases, core = layer.tucker_bases[group.name], layer.tucker_core[group.name]
        return [basis.shape[0] for basis in bases], math.prod(core.shape[len(bases) :])

    def _count_at_bound(self, group: _Group, bound: str) -> int:
        """Active parameters of `group` with every mode at `r_min` (`bound="r_min"`) or at `r_max` within the
        capacity (`"r_max"`)."""
        total = 0
        for _, layer in group.layers:
            ranks = self._bounds(group, layer)[0 if bound == "r_min" else 1]
            ranks = [min(r, c) for r, c in zip(ranks, layer.capacities(group.name))]
            total += parameter_count(ranks, *self._layer_sizes(group, layer))
        return total

    def _check_budget(self, group: _Group) -> None:
        budget = group.config.param_budget
        if budget is None:
            return
        smallest = self._count_at_bound(group, "r_min")
        if budget < smallest:
            raise ValueError(
                f"`param_budget` of adapter {group.name!r} must be >= {smallest}, the smallest feasible budget (every "
                f"mode of its {len(group.layers)} adapted layers at r_min={group.config.r_min}); got {budget}"
            )

    def budget(self, group: _Group, step: int) -> int | None:
        """The parameter budget of `group` in force at optimizer step `step` (`None` without one)."""
        if group.config.param_budget is None:
            return None
        ceiling = self._count_at_bound(group, "r_max")
        return budget_at_step(group.config.param_budget, ceiling, step, group.ramp_steps(self.total_steps))

    def _settled_budget(self, group: _Group) -> int | None:
        """The budget that the settled ranks were cut to: this updater's latest truncation's, else (after a resume,
        or before any truncation) the schedule's at its latest truncation step."""
        if group.applied_budget is not None:
            return group.applied_budget
        return self.budget(group, group.last_truncation(self.step, self.total_steps) or 0)

    def _fit_budget(
        self,
        group: _Group,
        batches: list[batched_cycle.LayerBatch],
        spectra: list[batched_cycle.BatchSpectra],
        ranks: list[list[list[int]]],
    ) -> list[list[list[int]]]:
        """The tolerance rule's ranks of every layer lowered to fit the budget, over all layers (batch by batch, in
        a fixed order, so every process decides the same)."""
        # the step this truncation ends (in finalize, one past the last step: the ramp is over or nearly)
        budget = self.budget(group, self.step + 1)
        group.applied_budget = budget
        layers = [
            BudgetLayer(
                layer_energies(batch_spectra.layer(index)),
                *self._layer_sizes(group, layer),
                self._bounds(group, layer)[0],
                batch_ranks[index],
            )
            for batch, batch_spectra, batch_ranks in zip(batches, spectra, ranks)
            for index, layer in enumerate(batch.layers)
        ]
        flat = iter(allocate_ranks(layers, budget))
        return [[next(flat) for _ in batch.layers] for batch in batches]

    def _choose_ranks(
        self, group: _Group, batches: list[batched_cycle.LayerBatch], spectra: list[batched_cycle.BatchSpectra]
    ) -> list[list[list[int]]]:
        """Phase 2 of a truncation, on the host: the new ranks of every layer of every batch (the tolerance rule)."""
        tau = group.tau(self.step + 1, self.total_steps)
        out = []
        for batch, batch_spectra in zip(batches, spectra):
            r_min, r_max = self._bounds(group, batch.layers[0])
            out.append(batched_cycle.ranks_for_tolerance(batch_spectra, tau, r_min, r_max))
        return out

    def _apply_truncation(
        self,
        group: _Group,
        batch: batched_cycle.LayerBatch,
        spectra: batched_cycle.BatchSpectra,
        ranks: list[list[int]],
    ) -> None:
        """Phase 3 for one batch, with the optimizer state following; the per-layer reference where a batched
        factorization fails."""
        train_bases = group.config.train_bases
        # a folded K = U C pairs its columns with the in-mode's: its state follows the in-mode's rotation
        basis_modes = [1, 1] if folds(group.config, batch.cores[0]) else list(range(batch.n_modes))
        padded = batched_cycle.apply_truncation(batch, spectra, ranks)
        if padded is None:
            rotations = []
            for index, (core, bases) in enumerate(zip(batch.cores, batch.bases)):
                widths = spectra.widths[index]
                layer_spectra = truncation_spectra(core.data, widths)
                rotations.append(
                    apply_truncation(core.data, [b.data for b in bases], widths, layer_spectra, ranks[index])
                )
        if self.optimizer is None:
            return
        if padded is not None:
            if batched_cycle.state_after_truncate(self.optimizer, batch, padded, train_bases, basis_modes):
                return
            rotations = batched_cycle.per_layer_rotations(padded, spectra.widths, ranks)
        for core, bases, widths, layer_rotations in zip(batch.cores, batch.bases, spectra.widths, rotations):
            state_after_truncate(self.optimizer, core, widths, layer_rotations)
            if train_bases:
                for basis, mode in zip(bases, basis_modes):
                    basis_state_after_truncate(self.optimizer, basis, widths[mode], layer_rotations[mode])

    def _fold(self, group: _Group, batch: batched_cycle.LayerBatch) -> None:
        """With `absorb_core`, folds the matrix cores of `batch` into their output bases (`absorbed_core`); the
        optimizer state of `K` keeps its columns (new ones start at zero, like the bases')."""
        if folds(group.config, batch.cores[0]):
            fold(batch)

    def _sync(self, group: _Group) -> None:
        if not is_distributed():
            return
        tensors = []
        for _, layer in group.layers:
            core = layer.tucker_core[group.name]
            tensors += [core.data, *(b.data for b in layer.tucker_bases[group.name]), layer.tucker_ranks[group.name]]
            if self.optimizer is not None:
                for param in (core, *layer.tucker_bases[group.name]):
                    state = self.optimizer.state.get(param, {})
                    tensors += [v for k, v in sorted(state.items()) if torch.is_tensor(v) and v.shape == param.shape]
        broadcast_tensors(tensors)
        for _, layer in group.layers:
            layer.set_active_ranks(group.name, layer.tucker_ranks[group.name].tolist())

    # ---- what to show -------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Settled ranks (those after the latest truncation) per module and mode, and the active adapter parameters.

        Keys: `tucker_rank/<module>/<mode>` (mode `out`, `in`, and `kh`, `kw` for fully adapted convs),
        `tucker_active_params` (core entries + basis columns at the settled ranks, summed over adapters) and, when
        every adapter has a `param_budget`, `tucker_param_budget` (the budgets of their latest truncations, summed).
        """
        metrics: dict[str, float] = {}
        active = 0
        for group in self.groups:
            prefix = "" if len(self.groups) == 1 else f"{group.name}/"
            for module, layer in group.layers:
                ranks = group.settled[module]
                for mode, rank in enumerate(ranks):
                    metrics[f"tucker_rank/{prefix}{module}/{MODE_NAMES[mode]}"] = rank
                active += layer.active_parameter_count(group.name, ranks)
        metrics["tucker_active_params"] = active
        budgets = [self._settled_budget(group) for group in self.groups]
        if all(b is not None for b in budgets):
            metrics["tucker_param_budget"] = sum(budgets)
        return metrics


def watch_rank_updates(layer: TuckerLayer, adapter_name: str) -> None:
    """Warns once if Tucker cores take `MISSING_UPDATER_STEPS` optimizer steps while no `TuckerRankUpdater` manages
    their layers: under `Trainer`, forgetting `TuckerRankCallback` silently trains fixed ranks and lets the optimizer
    step the bases. Steps are counted by a global optimizer step hook: a step counts when an unmanaged watched core
    has a gradient (so it was just stepped)."""
    global _step_hook
    _WATCHED.setdefault(layer, set()).add(adapter_name)
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_unmanaged_step)


def _count_unmanaged_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _unmanaged_steps, _warned_missing_updater
    if _warned_missing_updater:
        return
    stepped = any(
        name in layer.tucker_core and layer.tucker_core[name].grad is not None
        for layer, names in list(_WATCHED.items())
        if layer not in _UPDATED_LAYERS
        for name in names
    )
    if not stepped:
        return
    _unmanaged_steps += 1
    if _unmanaged_steps >= MISSING_UPDATER_STEPS:
        _warned_missing_updater = True
        warnings.warn(
            f"Tucker adapters have trained for {_unmanaged_steps} optimizer steps without any rank update: their "
            "ranks never change and the optimizer steps their bases. Pass `callbacks=[TuckerRankCallback()]` to the "
            "Trainer, or call TuckerRankUpdater's before_step()/after_step() around optimizer.step().",
            stacklevel=3,
        )
