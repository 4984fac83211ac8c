"""Pure Tucker-tensor maths, no `nn.Module` and no PEFT.

Convention, used everywhere in tucker_lora:

    W = C x_1 U_1 x_2 U_2 ... x_d U_d,   core C: (r_1, ..., r_d),   bases[i]: (n_i, r_i), orthonormal columns.

`unfold(X, i)` moves axis i to the front, then reshapes to `(n_i, -1)`; `fold` is its inverse. A core may have more
modes than there are bases: the trailing modes are then unfactored (the spatial modes of a channel-Tucker conv).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-`mode` unfolding: `(n_mode, prod of the other sizes)`."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `unfold`: `matrix` of shape `(shape[mode], -1)` back to a tensor of `shape`."""
    moved = [shape[mode]] + [s for i, s in enumerate(shape) if i != mode]
    return matrix.reshape(moved).movedim(0, mode)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """`tensor x_mode matrix`: `matrix` is `(m, n_mode)`; the result has size m along `mode`."""
    shape = list(tensor.shape)
    shape[mode] = matrix.shape[0]
    return fold(matrix @ unfold(tensor, mode), mode, shape)


def tucker_to_tensor(core: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor `core x_1 bases[0] x_2 bases[1] ...`; modes past `len(bases)` stay as they are."""
    result = core
    for mode, basis in enumerate(bases):
        result = mode_product(result, basis, mode)
    return result


def random_orthonormal(
    rows: int, cols: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A `(rows, cols)` matrix with orthonormal columns: QR of a Gaussian matrix (`cols <= rows`)."""
    if cols > rows:
        raise ValueError(f"An orthonormal basis needs cols <= rows; got rows={rows}, cols={cols}.")
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # fix the signs so the result does not depend on the QR implementation's sign choice
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.to(dtype)


def orthonormality_error(basis: torch.Tensor) -> float:
    """`max |U^T U - I|` in float64: 0 for a perfectly orthonormal basis."""
    u = basis.detach().to(torch.float64)
    return (u.T @ u - torch.eye(u.shape[1], dtype=torch.float64, device=u.device)).abs().max().item()
