"""Entropic optimal transport between an image's patches and a class's prompts, as FedOTP solves it.

One problem per (image, class) pair: the cost of moving patch m to prompt n is 1 - cos, the kernel is
K = exp(-(1 - cos)/eps), every patch holds mass 1/M. The two variants of the official code
(HongxiaLee/FedOTP, `trainers/GLP_OT.py`, `Sinkhorn` and `entropic_COT_fast`):

- "sinkhorn", balanced: every prompt receives 1/N; the plan's rows sum to 1/M and its columns to 1/N.
- "cot", partial: every prompt receives gamma/N and a patch gives at most 1/M, so each prompt covers the
  fraction gamma of the image it matches best. With gamma = 1 it is balanced OT again.

The loops are the official ones operation for operation (same initial values, same update order, same
stopping rule: the mean change over the WHOLE batch of problems, so one problem's iteration count depends
on the others). The one difference: everything runs in fp32 whatever the input dtype, because the
official fp16 kernel underflows to 0 (and the plan to NaN) at small eps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trip.errors import TripError

__all__ = ["VARIANTS", "partial_sinkhorn", "sinkhorn", "transport_plan"]

VARIANTS = ("cot", "sinkhorn")
# exp(x) is 0 in fp32 below about -103.9; the plan of a problem whose row or column of K is all 0 is NaN.
FP32_EXP_UNDERFLOW = 103.9


def transport_plan(
    sim: Tensor,
    *,
    variant: str = "cot",
    gamma: float = 0.8,
    eps: float = 0.1,
    max_iters: int = 100,
    tol: float = 1e-3,
) -> Tensor:
    """The plan T [problems, M, N] (fp32, no gradient) for cosine similarities sim [problems, M patches, N prompts].

    Raises TripError on bad arguments, and when eps is so small that the kernel underflows and the plan
    is not finite (the official code returns None there and its training step crashes).
    """
    _check_arguments(sim, variant, gamma, eps, max_iters, tol)
    with torch.no_grad():
        kernel, a, b = _kernel_and_marginals(sim.detach().float(), variant, gamma, eps)
        solve = partial_sinkhorn if variant == "cot" else sinkhorn
        plan, _ = solve(kernel, a, b, max_iters=max_iters, tol=tol)
    if not torch.isfinite(plan).all():
        lowest = float(sim.min())
        raise TripError(
            f"the {variant} transport plan is not finite: with eps={eps} the kernel exp(-(1 - cos)/eps) underflows "
            f"to 0 in fp32 once 1 - cos > {FP32_EXP_UNDERFLOW * eps:.3g} (the lowest cos here is {lowest:.3g}); "
            "use a larger eps (FedOTP's default 0.1 keeps every entry above exp(-20))"
        )
    return plan


def sinkhorn(kernel: Tensor, a: Tensor, b: Tensor, *, max_iters: int, tol: float) -> tuple[Tensor, int]:
    """Balanced Sinkhorn on K [P, M, N] with marginals a [P, M], b [P, N]: (plan, iterations run).

    r = a / (K c), c = b / (K^T r) from r = c = 1; stops once the mean |r - r_prev| over the batch < tol.
    """
    kernel_t = kernel.transpose(1, 2).contiguous()
    r, c = torch.ones_like(a), torch.ones_like(b)
    iterations = 0
    while iterations < max_iters:
        iterations += 1
        r_prev = r
        r = a / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        c = b / (kernel_t @ r.unsqueeze(-1)).squeeze(-1)
        if (r - r_prev).abs().mean().item() < tol:
            break
    return r.unsqueeze(-1) * c.unsqueeze(-2) * kernel, iterations


def partial_sinkhorn(kernel: Tensor, a: Tensor, b: Tensor, *, max_iters: int, tol: float) -> tuple[Tensor, int]:
    """FedOTP's "COT" on K [P, M, N]: columns sum to b [P, N], rows at most a [P, M]: (plan, iterations run).

    u = min(a / (K v), 1), v = b / (K^T u) from u = v = 1; stops once the mean |v - v_prev| over the batch < tol.
    The divisions are written as the official code has them (1 / ((K / a) v)), so the rounding is the same.
    """
    kernel_a = (1 / a).unsqueeze(-1) * kernel
    # Contiguous like the official matmul's output, so the matmuls below sum in the same order.
    kernel_b = ((1 / b).unsqueeze(-1) * kernel.transpose(1, 2)).contiguous()
    u, v = torch.ones_like(a), torch.ones_like(b)
    iterations = 0
    while iterations < max_iters:
        iterations += 1
        v_prev = v
        u = torch.clamp(1 / (kernel_a @ v.unsqueeze(-1)).squeeze(-1), max=1.0)
        v = 1 / (kernel_b @ u.unsqueeze(-1)).squeeze(-1)
        if (v - v_prev).abs().mean().item() < tol:
            break
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2), iterations


def _kernel_and_marginals(sim: Tensor, variant: str, gamma: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    problems, patches, prompts = sim.shape
    kernel = torch.exp(-(1.0 - sim) / eps)
    a = torch.full((problems, patches), 1.0 / patches, dtype=sim.dtype, device=sim.device)
    b = torch.full((problems, prompts), 1.0 / prompts, dtype=sim.dtype, device=sim.device)
    if variant == "cot":
        # The official code caps gamma by the patch mass of the whole batch (1 per problem), as here.
        b = b * min(a.sum().item(), gamma)
    return kernel, a, b


def _check_arguments(sim: Tensor, variant: str, gamma: float, eps: float, max_iters: int, tol: float) -> None:
    if variant not in VARIANTS:
        raise TripError(f"unknown optimal transport variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if not 0 < gamma <= 1:
        raise TripError(f"gamma (the mass each prompt receives) must be in (0, 1], got {gamma}")
    if not eps > 0:
        raise TripError(f"eps (the entropic regularisation) must be > 0, got {eps}; FedOTP uses 0.1")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise TripError(f"max_iters must be an integer >= 1, got {max_iters!r}; FedOTP uses 100")
    if not tol >= 0:
        raise TripError(f"tol must be >= 0, got {tol}; FedOTP uses 1e-3")
    if sim.dim() != 3 or 0 in sim.shape or not sim.is_floating_point():
        raise TripError(
            f"sim must be a floating-point tensor [problems, patches, prompts] with no empty dimension, "
            f"got {sim.dtype} of shape {tuple(sim.shape)}"
        )
    if not torch.isfinite(sim).all():
        raise TripError("sim has NaN or infinite values; the cosine similarities must be finite")
