"""Per-site gradient normalization (``compress(..., grad_scaling="site")``).

Each site hands the shared memory a view gradient dV of unit RMS: the memory gets
``scatter(dV / rms(dV))``. Sites whose gradients are orders of magnitude larger (a
classifier head, embeddings behind a LayerNorm) then cannot drown the others in the
slots they share. A zero or non-finite RMS passes the gradient unchanged. No
data-dependent branch, so everything here traces under torch.compile.

Two ways to apply it: ``roastfx::site_grad_norm`` on a materialized view (the eager
module and the compiled fallback), or the fused roast ops' ``grad_norm`` flag, which
divides the op's memory gradient by the RMS of the op's dV. Scattering is linear, so
``scatter(dV) / rms(dV) == scatter(dV / rms(dV))``.
"""
from __future__ import annotations

import inspect
import math

import torch


def site_grad_rms(grad: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """Root mean square of one site's view gradient (float32 0-d tensor; computed in float64, or for a float64
    gradient as peak * rms(grad / peak), so tiny or huge gradients neither underflow nor overflow).

    ``numel``: the whole view's element count when ``grad`` holds only its nonzero part
    (an embedding's looked-up rows); the missing elements count as zeros.
    """
    g = grad.detach()
    n = g.numel() if numel is None else numel
    if g.numel() == 0:
        return g.new_zeros((), dtype=torch.float32)
    if g.dtype != torch.float64:
        # squares of any fp32/bf16/fp16 value neither overflow nor underflow in float64: one reduction
        return (torch.linalg.vector_norm(g, dtype=torch.float64) / math.sqrt(n)).to(torch.float32)
    g = g.to(torch.float32)
    peak = g.abs().amax()
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    return peak * ((g / safe).square().sum() / n).sqrt()


def rms_from_sumsq(sumsq: torch.Tensor, numel: int) -> torch.Tensor:
    """The float32 RMS of a view of ``numel`` elements whose squares sum to ``sumsq`` (float64, so
    squares of any float32 gradient neither overflow nor underflow)."""
    return (sumsq.to(torch.float64) / numel).sqrt().to(torch.float32)


def grad_norm_factor(rms: torch.Tensor) -> torch.Tensor:
    """1 / rms, or 1 where rms is zero or not finite (float32 0-d)."""
    return torch.where((rms > 0) & torch.isfinite(rms), rms, torch.ones_like(rms)).reciprocal()


def normalize(grad: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
    """``grad`` divided by ``rms`` as ``grad_norm_factor`` says, in grad's dtype."""
    return grad * grad_norm_factor(rms).to(grad.dtype)


@torch.library.custom_op("roastfx::site_grad_norm", mutates_args=())
def site_grad_norm(view: torch.Tensor) -> torch.Tensor:
    """Identity forward (a copy: a custom op may not return its input); backward divides the
    view's gradient by its RMS."""
    return view.clone()


@site_grad_norm.register_fake
def _(view):
    return torch.empty_like(view)


def _site_grad_norm_backward(ctx, grad):
    return normalize(grad, site_grad_rms(grad))


site_grad_norm.register_autograd(_site_grad_norm_backward)


class SiteGradNorm(torch.autograd.Function):
    """``site_grad_norm`` as an autograd.Function that torch.func transforms accept (setup_context and a
    generated vmap rule): under vmap each sample's view gradient is divided by its own RMS."""

    generate_vmap_rule = True

    @staticmethod
    def forward(view):
        return view.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return normalize(grad, site_grad_rms(grad))

    @staticmethod
    def jvp(ctx, tangent):
        return tangent  # forward mode: the identity's (the scaling acts on gradients only)


# Function.apply binds a setup_context-style forward's arguments through inspect.signature on every call (about
# 40 us of a tiny model's weight read); a precomputed __signature__ is what inspect returns first
SiteGradNorm.forward.__signature__ = inspect.signature(SiteGradNorm.forward)
