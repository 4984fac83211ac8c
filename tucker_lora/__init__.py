"""tucker_lora: rank-adaptive, geometry-aware Tucker adapters for Hugging Face PEFT.

Importing this package registers the PEFT type `TUCKER` (parameter prefix `tucker_`).
"""

from typing import Any

from ._peft_internals import register_tucker_method
from .config import TuckerAdapterConfig
from .counting import count_parameters, get_ranks
from .export import export_lora
from .layer import TuckerLayer
from .model import TuckerModel
from .plotting import plot_ranks
from .rank_updater import TuckerRankUpdater

register_tucker_method(TuckerAdapterConfig, TuckerModel)

__version__ = "0.1.0"

__all__ = [
    "TuckerAdapterConfig",
    "TuckerLayer",
    "TuckerModel",
    "TuckerRankCallback",
    "TuckerRankUpdater",
    "count_parameters",
    "export_lora",
    "get_ranks",
    "plot_ranks",
]


def __getattr__(name: str) -> Any:
    # the callback is the only module that imports transformers' Trainer machinery: load it on first use
    if name == "TuckerRankCallback":
        from .callback import TuckerRankCallback

        return TuckerRankCallback
    raise AttributeError(f"module 'tucker_lora' has no attribute {name!r}")
