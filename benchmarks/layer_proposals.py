"""Candidate forwards for `tucker_lora.layer.Linear`, measured by `forward_backward.py --proposals`.

Local copies for measurement only: the package's layer is not changed here. Each function has the signature of
`TuckerLayer.forward` and is installed on the instances of one model (`install`), so that the same run can time the
package's forward and the candidates against PEFT LoRA. `check_equal` verifies that a candidate gives the package's
output and gradients.

* `fold`: `y = base(x) + (x @ U_in) @ (s * U_out C)^T` on the active slices: the core and the scaling are applied to
  the small `(out, r_in)` weight instead of the `(tokens, r)` activations, which removes one activation matmul and
  the activation-sized scaling multiply (and their backward kernels).
* `capacity`: the package's arithmetic on the full-capacity tensors, without slicing. Exact because everything outside
  the active block is kept at zero (docs/design.md): the output is the same and so are the gradients, whose entries
  outside the active block come out exactly zero. Removes 4 slices per layer and, in backward, their
  `SliceBackward` (a zero-filled capacity tensor plus a copy for each). Costs adapter matmuls of width `capacity`
  (2 * r_max = 32 here) instead of the active rank.
* `capacity_fold`: both.
* `capacity_fused`: `capacity` as one `torch.autograd.Function` with a hand-written backward (the same 3 + 6
  matmuls, the scaling applied to the `(tokens, capacity)` intermediate): one autograd node per layer instead of
  about eight, which is what a launch-bound GPU step pays for.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PROPOSALS = ("fold", "capacity", "capacity_fold", "capacity_fused")


def _adapter_fold(layer, name: str, h: torch.Tensor, capacity: bool) -> torch.Tensor:
    if capacity:
        u_out, u_in = layer.tucker_bases[name]
        core = layer.tucker_core[name]
    else:
        u_out, u_in = layer.active_bases(name)
        core = layer.active_core(name)
    weight = u_out @ (layer.tucker_scaling[name] * core)  # (out, r_in): s * U_out C
    return F.linear(F.linear(h, u_in.T), weight)


def _adapter_capacity(layer, name: str, h: torch.Tensor) -> torch.Tensor:
    u_out, u_in = layer.tucker_bases[name]
    return layer.tucker_scaling[name] * (((h @ u_in) @ layer.tucker_core[name].T) @ u_out.T)


class _TuckerLinearFunction(torch.autograd.Function):
    """`y = s * ((x @ U_in) @ C^T) @ U_out^T` over the full-capacity tensors, with its backward written out."""

    @staticmethod
    def forward(ctx, x, u_in, core, u_out, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        h1 = x2 @ u_in  # (tokens, cap_in)
        h2 = (h1 @ core.T).mul_(scaling)  # (tokens, cap_out)
        ctx.save_for_backward(x2, h1, h2, u_in, core, u_out)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return (h2 @ u_out.T).reshape(*x.shape[:-1], u_out.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, h1, h2, u_in, core, u_out = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_in, need_core, need_out = ctx.needs_input_grad[:4]
        g_out = g.T @ h2 if need_out else None
        g_h2 = (g @ u_out).mul_(ctx.scaling)
        g_core = g_h2.T @ h1 if need_core else None
        g_h1 = g_h2 @ core
        g_in = x2.T @ g_h1 if need_in else None
        g_x = (g_h1 @ u_in.T).reshape(ctx.x_shape) if need_x else None
        return g_x, g_in, g_core, g_out, None


def _make_forward(kind: str):
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return type(self).forward(self, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.tucker_core:
                continue
            h = self._cast_input_dtype(self.tucker_dropout[name](x), self.tucker_core[name].dtype)
            if kind == "capacity":
                result = result + _adapter_capacity(self, name, h)
            elif kind == "capacity_fused":
                u_out, u_in = self.tucker_bases[name]
                core, scaling = self.tucker_core[name], self.tucker_scaling[name]
                result = result + _TuckerLinearFunction.apply(h, u_in, core, u_out, scaling)
            else:
                result = result + _adapter_fold(self, name, h, capacity=kind == "capacity_fold")
        return result.to(result_dtype)

    return forward


def install(model: nn.Module, kind: str) -> int:
    """Replaces the forward of every Tucker `Linear` of `model` (instance attribute); returns how many."""
    from tucker_lora.layer import Linear

    if kind not in PROPOSALS:
        raise ValueError(f"unknown proposal {kind!r}; known: {PROPOSALS}")
    forward = _make_forward(kind)
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


def check_equal(kind: str, seed: int = 0) -> dict:
    """Output and gradients of a candidate against the package's forward, on one random Tucker Linear (float64)."""
    from tucker_lora import TuckerAdapterConfig
    from tucker_lora.layer import Linear

    torch.manual_seed(seed)
    base = nn.Linear(48, 40).double()
    config = TuckerAdapterConfig(r=4, r_max=8, init_weights=False, target_modules=["x"])
    layer = Linear(base, "default", config).double()
    layer.set_active_ranks("default", [3, 4])
    with torch.no_grad():  # keep the storage contract: zero outside the active block
        layer.tucker_core["default"][3:] = 0
        layer.tucker_core["default"][:, 4:] = 0
        layer.tucker_bases["default"][0][:, 3:] = 0
        layer.tucker_bases["default"][1][:, 4:] = 0
    x = torch.randn(2, 5, 48, dtype=torch.float64, requires_grad=True)
    params = [layer.tucker_core["default"], *layer.tucker_bases["default"]]

    def run():
        for p in [*params, x]:
            p.grad = None
        out = layer(x)
        (out**2).sum().backward()
        return out.detach(), [p.grad.clone() for p in [*params, x]]

    ref_out, ref_grads = run()
    layer.forward = types.MethodType(_make_forward(kind), layer)
    out, grads = run()
    return {
        "max_abs_output_diff": float((out - ref_out).abs().max()),
        "max_abs_grad_diff": max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads)),
        "max_abs_grad_outside_active_block": max(
            float(grads[0][3:].abs().max()),
            float(grads[0][:, 4:].abs().max()),
            float(grads[1][:, 3:].abs().max()),
            float(grads[2][:, 4:].abs().max()),
        ),
    }


if __name__ == "__main__":
    for kind in PROPOSALS:
        print(kind, check_equal(kind))
