"""tucker_lora: rank-adaptive, geometry-aware Tucker adapters for Hugging Face PEFT.

Importing this package registers the PEFT type `TUCKER` (parameter prefix `tucker_`).
"""

from ._peft_internals import register_tucker_method
from .config import TuckerAdapterConfig
from .counting import count_parameters, get_ranks
from .export import export_lora
from .layer import TuckerLayer
from .model import TuckerModel

register_tucker_method(TuckerAdapterConfig, TuckerModel)

__version__ = "0.1.0"

__all__ = [
    "TuckerAdapterConfig",
    "TuckerLayer",
    "TuckerModel",
    "count_parameters",
    "export_lora",
    "get_ranks",
]
