"""`TuckerAdapterConfig`: every setting of a Tucker adapter, checked when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._peft_internals import ensure_peft_type

CONV_MODES = ("channels", "all")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")


@dataclass
class TuckerAdapterConfig(PeftConfig):
    """
    Configuration of a rank-adaptive Tucker adapter (`PeftType.TUCKER`, parameter prefix `tucker_`).

    Each adapted weight gets `W0 + s * dW` with `dW = core x_1 U_1 x_2 U_2 ...`, orthonormal bases `U_i` and a core
    that starts at zero. Ranks grow by basis augmentation and shrink by truncation with tolerance `tau` while
    training (see `TuckerRankCallback` / `TuckerRankUpdater`).

    Args:
        tau (`float`): relative truncation tolerance in (0, 1): a mode keeps the smallest rank whose discarded
            singular values have norm at most `tau * ||core||_F`.
        r (`int`): initial rank of every adaptive mode.
        r_max (`int`, *optional*): largest rank a mode may keep after truncation; defaults to `2 * r`. Storage is
            allocated once at `min(n_i, 2 * r_max)` columns per basis, so that augmentation never reallocates.
        r_min (`int`): smallest rank a mode may keep (>= 1, so an adapter never dies).
        alpha (`float`): the scaling is `s = alpha / r`, fixed for the life of the adapter (never recomputed when
            ranks change). In the Tucker form a core grows far fewer entries per step under Adam than LoRA's factors
            and wants several times LoRA's scaling; folded (`absorb_core`) with `in_basis_lr_ratio = sqrt(3)`, the
            adapter trains as LoRA does at `alpha` = LoRA's alpha `/ sqrt(3)` (its `V` has unit columns, LoRA's `A`
            rows of norm `1 / sqrt(3)`): 16 / sqrt(3) at r 8 in the GLUE recipe (`docs/training.md`).
        dropout (`float`): dropout on the adapter's input.
        target_modules (`list[str] | str`, *optional*): module names (suffix match) or a regex; defaults exist for
            `deberta-v2` and `bert`.
        exclude_modules (`list[str] | str`, *optional*): modules not to adapt.
        layers_to_transform, layers_pattern: PEFT semantics.
        modules_to_save (`list[str]`, *optional*): modules trained in full and saved (the classifier head for
            `SEQ_CLS`, added by PEFT).
        rank_pattern (`dict`): per-module active ranks, `{module name or regex: int or [r_1, r_2, ...]}`, each in
            `[1, 2 * r_max]`. Written on save with the ranks in use (augmented ones when saved mid-cycle), so that
            loading rebuilds them.
        conv_modes (`str`): `"channels"` (default) adapts the out/in channel modes of a `Conv2d` and keeps the
            spatial modes full; `"all"` adapts the spatial modes too.
        init_weights (`bool`): `True` starts from a zero core (the output equals the base model's); `False` draws a
            random core, for tests.
        core_steps (`int`): optimizer steps on the augmented core between augmentation and truncation. 10: the
            best AdamW error in a sweep from 1 to 100 on a rank-recovery problem, with ten times fewer cycles than 1
            (see `docs/training.md`).
        augment_start_step (`int`): optimizer steps before the first augmentation (the core must move away from
            zero first: a zero core has zero basis gradients). The final error was insensitive from 1 to 30.
        freeze_ranks_after (`int | float`, *optional*): stop adapting ranks after this many optimizer steps (int)
            or this fraction of the run (float in (0, 1]); `None` adapts until the end.
        tau_warmup (`int | float`, *optional*): the truncation tolerance ramps linearly from 0 to `tau` over this
            many optimizer steps (int) or this fraction of the run (float in (0, 1]), so that directions which have
            not had time to learn are not judged against the ones that have; `None` truncates at `tau` throughout.
        param_budget (`int`, *optional*): the most active parameters (core entries and basis columns of every
            adapted layer; `modules_to_save` not included) the adapter may keep after any truncation. Each truncation
            then keeps, over all layers and modes together, the directions that carry the most energy of `s * dW`
            per parameter (see `docs/training.md`). `tau` still applies: the stricter of the two wins, so set a small
            `tau` (e.g. 0.01) to let the budget alone decide. Budgets below the adapter at `r_min` everywhere are
            rejected when `TuckerRankUpdater` is built (that size depends on the model). `None`: no budget.
        budget_ramp (`int | float`, *optional*): reach `param_budget` gradually: over the first `budget_ramp`
            optimizer steps (int) or this fraction of the run (float in (0, 1]), the budget falls from the adapter's
            size at `r_max` everywhere to `param_budget` along AdaLoRA's cubic curve. `None` (default): the full
            budget applies from the first truncation.
        train_bases (`bool`): `True` lets the optimizer step the active basis columns on every step, as LoRA's A and
            B, and makes them orthonormal again (QR, the triangular factor absorbed into the core) before every
            augmentation and truncation; `False` changes the bases only by augmentation and truncation.
        absorb_core (`bool`): with `train_bases`, keeps every matrix adapter (linear layers) folded between cycle
            events, `dW = K V^T` with `K = U C` and the core fixed at the identity, so that the optimizer steps `K`
            and `V` as it steps LoRA's `B` and `A`; each cycle event works on the Tucker form and folds again, and
            `TuckerRankUpdater.finalize()` leaves the Tucker form with orthonormal bases. Convolutions keep the
            Tucker form (their core has kernel modes). See `docs/training.md`.
        in_basis_lr_ratio (`float`): with `absorb_core`, how many times the optimizer's step each folded input
            basis `V` moves: `TuckerRankUpdater` stretches `V`'s step after every `optimizer.step()` (for AdamW,
            the step of a learning rate `lr * in_basis_lr_ratio`). `V` has unit columns where LoRA's initial `A` has
            rows of norm `1 / sqrt(3)` (PEFT's Kaiming-uniform draw), so under Adam `V` turns `sqrt(3)` times slower
            than `A` at the same rate: `sqrt(3)` with `alpha` = LoRA's alpha `/ sqrt(3)` steps `K` and `V` as LoRA
            steps `B` and `A`, and is what the GLUE recipe uses (`docs/training.md`). 1 (default): the optimizer's
            own steps.

    `get_peft_model` (and `add_adapter`) keep their own copy of this config, so that saving, which writes the ranks
    in use into `rank_pattern`, never changes your object: edits to it afterwards do not reach the model; read or
    edit `model.peft_config[adapter_name]` instead.

    Example:
        ```py
        >>> import tucker_lora
        >>> from peft import get_peft_model
        >>> config = tucker_lora.TuckerAdapterConfig(tau=0.1, r=8, task_type="SEQ_CLS")
        >>> model = get_peft_model(base_model, config)
        ```
    """

    tau: float = field(default=0.1, metadata={"help": "Relative truncation tolerance in (0, 1)."})
    r: int = field(default=8, metadata={"help": "Initial rank of every adaptive mode."})
    r_max: int | None = field(default=None, metadata={"help": "Largest rank after truncation; default 2 * r."})
    r_min: int = field(default=1, metadata={"help": "Smallest rank after truncation (>= 1)."})
    alpha: float = field(default=8.0, metadata={"help": "Scaling s = alpha / r, fixed for the adapter's life."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module active ranks."})
    conv_modes: Literal["channels", "all"] = field(default="channels", metadata={"help": "Adaptive conv modes."})
    init_weights: bool = field(default=True, metadata={"help": "Zero core at init (output == base model's)."})
    core_steps: int = field(default=10, metadata={"help": "Core steps between augmentation and truncation."})
    augment_start_step: int = field(default=10, metadata={"help": "Optimizer steps before the first augmentation."})
    freeze_ranks_after: int | float | None = field(
        default=None, metadata={"help": "Freeze ranks after this step (int) or fraction of the run (float)."}
    )

    tau_warmup: int | float | None = field(
        default=None, metadata={"help": "Steps (int) or fraction of the run (float) over which tau ramps up from 0."}
    )
    param_budget: int | None = field(
        default=None, metadata={"help": "Most active adapter parameters after a truncation; None: tau alone."}
    )
    budget_ramp: int | float | None = field(
        default=None, metadata={"help": "Steps (int) or run fraction (float) to reach param_budget; None: at once."}
    )
    train_bases: bool = field(
        default=True, metadata={"help": "The optimizer steps the bases too; re-orthonormalized at cycle events."}
    )
    absorb_core: bool = field(
        default=False, metadata={"help": "Matrix adapters stepped as K = U C and V (core fixed at I) between events."}
    )
    in_basis_lr_ratio: float = field(
        default=1.0, metadata={"help": "absorb_core: each step of V is this many times the optimizer's."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.r_max is None:
            self.r_max = 2 * self.r if isinstance(self.r, int) else self.r
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 < self.tau < 1.0:
            raise ValueError(f"`tau` must be in (0, 1); got {self.tau!r}.")
        _check_int("r", self.r, 1)
        _check_int("r_min", self.r_min, 1)
        _check_int("r_max", self.r_max, 1)
        if self.r_max < self.r:
            raise ValueError(f"`r_max` must be >= `r` ({self.r}); got {self.r_max}.")
        if self.r_min > self.r:
            raise ValueError(f"`r_min` must be <= `r` ({self.r}); got {self.r_min}.")
        _check_positive("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout!r}.")
        if self.conv_modes not in CONV_MODES:
            raise ValueError(f"`conv_modes` must be one of {list(CONV_MODES)}; got {self.conv_modes!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"`init_weights` must be True or False; got {self.init_weights!r}.")
        if not isinstance(self.train_bases, bool):
            raise ValueError(f"`train_bases` must be True or False; got {self.train_bases!r}.")
        if not isinstance(self.absorb_core, bool):
            raise ValueError(f"`absorb_core` must be True or False; got {self.absorb_core!r}.")
        if self.absorb_core and not self.train_bases:
            raise ValueError(
                "`absorb_core=True` needs `train_bases=True`: the folded core is fixed and only the bases learn; got "
                "`train_bases=False`."
            )
        _check_positive("in_basis_lr_ratio", self.in_basis_lr_ratio)
        if self.in_basis_lr_ratio != 1 and not self.absorb_core:
            raise ValueError(
                f"`in_basis_lr_ratio` applies to folded adapters only and needs `absorb_core=True`; got "
                f"in_basis_lr_ratio={self.in_basis_lr_ratio!r} with absorb_core=False."
            )
        _check_int("core_steps", self.core_steps, 1)
        _check_int("augment_start_step", self.augment_start_step, 0)
        freeze = self.freeze_ranks_after
        if isinstance(freeze, float) and not 0.0 < freeze <= 1.0:
            raise ValueError(f"`freeze_ranks_after` as a fraction must be in (0, 1]; got {freeze!r}.")
        if freeze is not None and not isinstance(freeze, float):
            _check_int("freeze_ranks_after", freeze, 0)
        warmup = self.tau_warmup
        if isinstance(warmup, float) and not 0.0 < warmup <= 1.0:
            raise ValueError(f"`tau_warmup` as a fraction must be in (0, 1]; got {warmup!r}.")
        if warmup is not None and not isinstance(warmup, float):
            _check_int("tau_warmup", warmup, 0)
        if self.param_budget is not None:
            _check_int("param_budget", self.param_budget, 1)
        ramp = self.budget_ramp
        if ramp is not None:
            if self.param_budget is None:
                raise ValueError(f"`budget_ramp` needs `param_budget` to be set; got budget_ramp={ramp!r}.")
            if isinstance(ramp, float) and not 0.0 < ramp <= 1.0:
                raise ValueError(f"`budget_ramp` as a fraction must be in (0, 1]; got {ramp!r}.")
            if not isinstance(ramp, float):
                _check_int("budget_ramp", ramp, 0)
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"`rank_pattern` must be a dict of module name -> ranks; got {self.rank_pattern!r}.")
        for key, ranks in self.rank_pattern.items():
            values = ranks if isinstance(ranks, (list, tuple)) else [ranks]
            for value in values:
                # up to 2 * r_max: an adapter saved between augmentation and truncation holds the augmented ranks
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2 * self.r_max:
                    raise ValueError(
                        f"`rank_pattern[{key!r}]` must hold integers in [1, 2 * r_max={2 * self.r_max}]; "
                        f"got {ranks!r}."
                    )
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("`layers_pattern` needs `layers_to_transform` to be set; got layers_to_transform=None.")
