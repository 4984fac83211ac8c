"""Comparison tolerances by dtype, used by every numerical test."""

import torch

TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tol)


# orthonormality of an active basis, max |U^T U - I|, after any number of rank cycles (METHOD section 9 item 5)
ORTHONORMALITY_TOL = 1e-5


def tol(dtype: torch.dtype) -> dict:
    """`atol`/`rtol` keyword arguments for `torch.testing.assert_close` at `dtype`."""
    return dict(TOLERANCES[dtype])


# rounding errors of a float sum of n terms grow like eps * sqrt(n) (random-walk model, as observed); the factor
# covers unlucky summation orders, which depend on the thread count (OpenMP splits reductions differently) and on
# the CPU's kernels: at 8 the float32 UNet's rounding, one thread, used 0.253 of the tolerance on one machine, more
# than the quarter `test_export_tolerance_covers_the_float32_rounding_of_the_network` allows
REDUCTION_SAFETY = 10.0


def reduction_tol(dtype: torch.dtype, reduction_size: int, scale: float = 1.0) -> dict:
    """`atol`/`rtol` for outputs of magnitude about `scale` that accumulate about `reduction_size` rounded products.

    For a network, `reduction_size` is the sum of the fan-ins along it (see `tests.helpers.reduction_size`): each
    layer adds its own rounding, and the errors add up like a random walk over every term.
    """
    err = REDUCTION_SAFETY * torch.finfo(dtype).eps * reduction_size**0.5
    return {"atol": err * scale, "rtol": err}


def assert_close_after_reduction(actual: torch.Tensor, expected: torch.Tensor, reduction_size: int) -> None:
    """`assert_close` with the tolerance of `reduction_tol` at the expected values' dtype and magnitude."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, **reduction_tol(expected.dtype, reduction_size, max(scale, 1e-30)))
