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
