"""Tucker adapter layers for `nn.Linear` and `nn.Conv2d`, stored at a capacity that never changes shape.

See `docs/design.md`: per adapter name, `tucker_core` (the core at capacity), `tucker_bases` (one basis per
adaptive mode, `(n_i, capacity_i)`), `tucker_ranks` (active ranks, a saved buffer) and a fixed `tucker_scaling`.
Everything outside the active block is kept at exactly zero (by every cycle event, and on load), so the forward
computes on the capacity-sized tensors without slicing: the same output, and gradients that are exactly zero outside
the active block (see `docs/design.md`). `delta_weight`, merge and export use the active slices.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ._peft_internals import BufferDict
from .absorbed_core import fold_tensors, folds
from .config import TuckerAdapterConfig
from .tucker_ops import random_orthonormal, tucker_to_tensor

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


class TuckerLayer(BaseTunerLayer):
    """Mixin holding the Tucker adapters of one base layer (see `docs/design.md` for the storage contract)."""

    adapter_layer_names = ("tucker_core", "tucker_bases")
    other_param_names = ("tucker_ranks", "tucker_alpha", "tucker_r_init", "tucker_scaling", "tucker_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.tucker_core = nn.ParameterDict()
        self.tucker_bases = nn.ModuleDict()
        self.tucker_ranks = BufferDict(persistent=True)
        self.tucker_dropout = nn.ModuleDict()
        self.tucker_alpha: dict[str, float] = {}
        self.tucker_r_init: dict[str, int] = {}
        self.tucker_scaling: dict[str, float] = {}
        # Python copy of the ranks so forward never reads a (possibly device) buffer; refreshed on load
        self._ranks_cache: dict[str, list[int]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.register_load_state_dict_post_hook(TuckerLayer._refresh_ranks_cache)
        # PEFT's layers expose the base layer's sizes (a Conv2d's channels)
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, nn.Conv2d):
            self.in_features, self.out_features = base.in_channels, base.out_channels

    # ---- shape of the adapter ---------------------------------------------------------------------------------

    def _mode_sizes(self, conv_modes: str) -> tuple[list[int], list[int]]:
        """Sizes of the adaptive modes and of the unfactored trailing modes of the core."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return [base.out_features, base.in_features], []
        out_channels, in_channels, kh, kw = base.weight.shape
        if conv_modes == "all":
            return [out_channels, in_channels, kh, kw], []
        return [out_channels, in_channels], [kh, kw]

    def update_layer(
        self, adapter_name: str, config: TuckerAdapterConfig, ranks: list[int] | None = None, **kwargs: Any
    ) -> None:
        """Create the adapter `adapter_name` on this layer, at capacity, with the given (or initial) ranks."""
        adaptive, unfactored = self._mode_sizes(config.conv_modes)
        channel_modes = 2
        capacities = [min(n, 2 * config.r_max) if mode < channel_modes else n for mode, n in enumerate(adaptive)]
        if ranks is None:
            ranks = [min(config.r, c) if mode < channel_modes else c for mode, c in enumerate(capacities)]
        if len(ranks) != len(adaptive):
            raise ValueError(
                f"`rank_pattern` for this layer must give {len(adaptive)} ranks (one per adaptive mode); got {ranks}."
            )
        for mode, (rank, capacity) in enumerate(zip(ranks, capacities)):
            if not 1 <= rank <= capacity:
                raise ValueError(
                    f"Rank {rank} of mode {mode} does not fit this layer: it must be in [1, {capacity}] "
                    f"(mode size {adaptive[mode]}, r_max={config.r_max})."
                )

        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else None
        core = torch.zeros(*capacities, *unfactored)
        bases = []
        for rank, n, capacity in zip(ranks, adaptive, capacities):
            basis = torch.zeros(n, capacity)
            basis[:, :rank] = random_orthonormal(n, rank)
            bases.append(nn.Parameter(basis))
        if not config.init_weights:
            block = tuple(slice(0, r) for r in ranks)
            core[block] = torch.randn(core[block].shape) / math.sqrt(max(1, math.prod(ranks)))
        if folds(config, core):
            ranks = fold_tensors(core, bases[0].data, list(ranks))
        self.tucker_core[adapter_name] = nn.Parameter(core)
        self.tucker_bases[adapter_name] = nn.ParameterList(bases)
        self.tucker_ranks[adapter_name] = torch.tensor(ranks, dtype=torch.long)
        self._ranks_cache[adapter_name] = list(ranks)
        self.tucker_alpha[adapter_name] = float(config.alpha)
        self.tucker_r_init[adapter_name] = int(config.r)
        self.tucker_scaling[adapter_name] = float(config.alpha) / config.r
        self.tucker_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # under `low_cpu_mem_usage=True` PEFT registers the adapter on the meta device and assigns its tensors later
        if device is not None and self.tucker_core[adapter_name].device.type != "meta":
            self.tucker_core[adapter_name].data = self.tucker_core[adapter_name].data.to(device)
            self.tucker_bases[adapter_name].to(device)
            self.tucker_ranks[adapter_name] = self.tucker_ranks[adapter_name].to(device)
        self.set_adapter(self.active_adapters)
        # imported here: rank_updater imports this module
        from .rank_updater import watch_rank_updates

        watch_rank_updates(self, adapter_name)

    def cast_adapter_to_base_dtype(self, adapter_name: str) -> None:
        """Core and bases in the base layer's float dtype (PEFT's `autocast_adapter_dtype=False`); ranks stay int."""
        dtype = self.get_base_layer().weight.dtype
        if not dtype.is_floating_point or adapter_name not in self.tucker_core:
            return
        core = self.tucker_core[adapter_name]
        if core.device.type == "meta":
            return
        self.tucker_core[adapter_name] = nn.Parameter(core.data.to(dtype), requires_grad=core.requires_grad)
        bases = self.tucker_bases[adapter_name]
        for i, basis in enumerate(bases):
            bases[i] = nn.Parameter(basis.data.to(dtype), requires_grad=basis.requires_grad)

    # ---- ranks --------------------------------------------------------------------------------------------------

    def active_ranks(self, adapter_name: str) -> list[int]:
        """Active rank of each adaptive mode."""
        return list(self._ranks_cache[adapter_name])

    def set_active_ranks(self, adapter_name: str, ranks: list[int]) -> None:
        """Set the active ranks (buffer and cache); the caller keeps the tensors outside the block at zero."""
        self.tucker_ranks[adapter_name].copy_(torch.tensor(ranks, dtype=torch.long))
        self._ranks_cache[adapter_name] = [int(r) for r in ranks]

    @staticmethod
    def _refresh_ranks_cache(module: TuckerLayer, incompatible_keys: Any) -> None:
        for name, ranks in module.tucker_ranks.items():
            if ranks.device.type == "meta":
                continue
            module._ranks_cache[name] = [int(r) for r in ranks.tolist()]
            module.zero_outside_active(name)

    @torch.no_grad()
    def zero_outside_active(self, adapter_name: str) -> None:
        """Zeros the core and the bases outside the active block: the forward at capacity relies on it. A state dict
        written by this package already holds zeros there; one written by hand may not."""
        if adapter_name not in self.tucker_core:
            return
        ranks = self._ranks_cache[adapter_name]
        core = self.tucker_core[adapter_name]
        if core.device.type == "meta":
            return
        kept = core[tuple(slice(0, r) for r in ranks)].clone()
        core.zero_()
        core[tuple(slice(0, r) for r in ranks)] = kept
        for basis, rank in zip(self.tucker_bases[adapter_name], ranks):
            basis[:, rank:] = 0

    def capacities(self, adapter_name: str) -> list[int]:
        return [basis.shape[1] for basis in self.tucker_bases[adapter_name]]

    def active_core(self, adapter_name: str) -> torch.Tensor:
        block = tuple(slice(0, r) for r in self._ranks_cache[adapter_name])
        return self.tucker_core[adapter_name][block]

    def active_bases(self, adapter_name: str) -> list[torch.Tensor]:
        return [basis[:, :r] for basis, r in zip(self.tucker_bases[adapter_name], self._ranks_cache[adapter_name])]

    def active_parameter_count(self, adapter_name: str, ranks: list[int] | None = None) -> int:
        """Core entries plus basis columns at `ranks` (default: the active ranks)."""
        ranks = self._ranks_cache[adapter_name] if ranks is None else ranks
        core = self.tucker_core[adapter_name]
        sizes = [basis.shape[0] for basis in self.tucker_bases[adapter_name]]
        unfactored = math.prod(core.shape[len(ranks) :])
        return math.prod(ranks) * unfactored + sum(n * r for n, r in zip(sizes, ranks))

    # ---- scaling (diffusers' set_adapters / cross_attention_kwargs scale) ---------------------------------------

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.tucker_core:
            self.tucker_scaling[adapter] = scale * self.tucker_alpha[adapter] / self.tucker_r_init[adapter]

    def scale_layer(self, scale: float) -> None:
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self.tucker_core:
                self.tucker_scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        for adapter in self.active_adapters:
            if adapter not in self.tucker_core:
                continue
            if scale is None:
                self.tucker_scaling[adapter] = self.tucker_alpha[adapter] / self.tucker_r_init[adapter]
            else:
                self.tucker_scaling[adapter] /= scale

    # ---- weights ------------------------------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s * dW` in the base weight's shape and dtype."""
        dense = tucker_to_tensor(self.active_core(adapter_name), self.active_bases(adapter_name))
        weight = self.get_base_layer().weight
        return (self.tucker_scaling[adapter_name] * dense).to(weight.dtype)

    get_delta_weight = delta_weight  # the name PEFT's utilities look for

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.tucker_core:
                continue
            merged = base.weight.data + self.delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapter {name!r} seems to be broken.")
            base.weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.tucker_core:
                base.weight.data -= self.delta_weight(name)

    # ---- forward ------------------------------------------------------------------------------------------------

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.tucker_core:
                continue
            core = self.tucker_core[name]
            h = self._cast_input_dtype(self.tucker_dropout[name](x), core.dtype)
            result = result + self.tucker_scaling[name] * self._adapter_output(name, h)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "tucker." + super().__repr__()


class Linear(nn.Module, TuckerLayer):
    """Tucker adapter on `nn.Linear`: `y = base(x) + s * ((x @ U_in) @ C^T) @ U_out^T`."""

    # nn.Module comes first in the MRO (as in PEFT's layers), so the mixin's forward is named explicitly
    forward = TuckerLayer.forward
    __repr__ = TuckerLayer.__repr__

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TuckerAdapterConfig, **kwargs: Any) -> None:
        super().__init__()
        TuckerLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        # at capacity, no slicing: exact, the entries outside the active block are zero (fewer kernels per step)
        u_out, u_in = self.tucker_bases[adapter_name]
        return ((x @ u_in) @ self.tucker_core[adapter_name].T) @ u_out.T


class Conv2d(nn.Module, TuckerLayer):
    """Channel-Tucker adapter on `nn.Conv2d`: 1x1 conv with `U_in^T`, kxk conv with the core (the layer's stride,
    padding, dilation and padding mode), 1x1 conv with `U_out`."""

    forward = TuckerLayer.forward
    __repr__ = TuckerLayer.__repr__

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TuckerAdapterConfig, **kwargs: Any) -> None:
        super().__init__()
        if base_layer.groups != 1:
            raise ValueError(
                f"Tucker adapters support Conv2d with groups=1 only; got groups={base_layer.groups} "
                f"({base_layer}). Exclude this module with `exclude_modules`."
            )
        TuckerLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def spatial_kernel(self, adapter_name: str, at_capacity: bool = False) -> torch.Tensor:
        """The core as a `(r_out, r_in, kh, kw)` kernel (spatial bases applied when they are adaptive); with
        `at_capacity`, `(cap_out, cap_in, kh, kw)` from the unsliced core and bases (zero outside the active block)."""
        if at_capacity:
            core, bases = self.tucker_core[adapter_name], list(self.tucker_bases[adapter_name])
        else:
            core, bases = self.active_core(adapter_name), self.active_bases(adapter_name)
        if len(bases) == 4:
            core = torch.einsum("abhw,kh,lw->abkl", core, bases[2], bases[3])
        return core

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        # at capacity, no slicing: exact, the entries outside the active block are zero (fewer kernels per step)
        base = self.get_base_layer()
        u_out, u_in = list(self.tucker_bases[adapter_name])[:2]
        h = F.conv2d(x, u_in.T[:, :, None, None])
        kernel = self.spatial_kernel(adapter_name, at_capacity=True)
        if base.padding_mode != "zeros":
            h = F.pad(h, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            h = F.conv2d(h, kernel, stride=base.stride, padding=0, dilation=base.dilation)
        else:
            h = F.conv2d(h, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation)
        return F.conv2d(h, u_out[:, :, None, None])
