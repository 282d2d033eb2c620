"""The conv kernels with a per-row scale of the B view (weight norm per kernel tap or per input channel):
forward, dX, and the memory and row-scale gradients, against torch.autograd in float64 through the
reference view (W = (V * row_scale[:, None])^T reshaped, F.conv2d / conv3d)."""
import pytest
import torch
import torch.nn.functional as F

from roastfx.codegen import reference
from roastfx.codegen.triton_conv import (roast_conv_forward, roast_conv_grad_input,
                                         roast_conv_row_scaled_grad_memory)
from test_kernels import random_mapping, random_memory, randn


CASES = [  # (batch, cin, cout, groups, spatial, kernel, stride, padding, dilation, tiling)
    (2, 6, 9, 3, (1, 13), (1, 5), (1, 1), (0, 2), (1, 1), (5, 3)),  # a grouped conv1d (lifted), odd sizes
    (3, 5, 7, 1, (9, 7), (3, 2), (2, 1), (1, 2), (2, 1), (8, 16)),
    (2, 4, 8, 2, (1, 40), (1, 7), (1, 2), (0, 3), (1, 2), (4, 5)),  # strided: dX skips taps by phase
    (1, 3, 5, 1, (4, 5, 4), (2, 3, 2), (1, 2, 1), (1, 1, 0), (1, 1, 2), (5, 3)),  # conv3d
]


def _reference(x, memory, mapping, scale, row_scale, groups, kernel, stride, padding, dilation):
    """Float64 leaves and the float64 conv through the reference view, for torch.autograd."""
    x, memory, row_scale = (t.detach().double().requires_grad_() for t in (x, memory, row_scale))
    view = reference.materialize(memory, mapping, scale) * row_scale[:, None]
    weight = view.t().reshape(mapping.cols, x.shape[1] // groups, *kernel)
    conv = F.conv3d if len(kernel) == 3 else F.conv2d
    return (x, memory, row_scale), conv(x, weight, None, stride, padding, dilation, groups)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"g{c[3]}-k{c[5]}-s{c[6]}")
def test_forward_and_gradients_match_float64_autograd(case, device):
    batch, cin, cout, groups, spatial, kernel, stride, padding, dilation, tiling = case
    taps = 1
    for k in kernel:
        taps *= k
    mapping = random_mapping(cin // groups * taps, cout, *tiling, alignment=2, window_start=8, seed=cin + cout)
    memory = random_memory(mapping, seed=cout)
    x = randn(batch, cin, *spatial, seed=1, dtype=torch.float64)
    row_scale = randn(mapping.rows, seed=2, dtype=torch.float64).abs() + 0.25
    leaves, want = _reference(x, memory, mapping, 0.6, row_scale, groups, kernel, stride, padding, dilation)
    grad = randn(*want.shape, seed=3, dtype=torch.float64)
    want_x, want_memory, want_rows = torch.autograd.grad(want, leaves, grad)

    xd, md, rd, gd = (t.float().to(device) for t in (x, memory, row_scale, grad))
    out = torch.empty(want.shape, device=device)
    roast_conv_forward(xd, md, mapping, 0.6, out, kernel, stride, padding, dilation, groups=groups, row_scale=rd)
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=1e-4, atol=1e-4)

    dx = torch.full(x.shape, float("nan"), device=device)
    roast_conv_grad_input(gd, md, mapping, 0.6, dx, kernel, stride, padding, dilation, groups=groups, row_scale=rd)
    torch.testing.assert_close(dx.double().cpu(), want_x, rtol=1e-4, atol=1e-4)

    for deterministic in (False, True):
        got_memory, got_rows = roast_conv_row_scaled_grad_memory(xd, gd, md, mapping, 0.6, rd, kernel, stride,
                                                                 padding, dilation, groups=groups,
                                                                 deterministic=deterministic)
        torch.testing.assert_close(got_memory.double().cpu(), want_memory, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_rows.double().cpu(), want_rows, rtol=1e-4, atol=1e-4)


def test_half_precision_input_rounds_the_scaled_weight(device):
    """bf16 input: the kernel rounds V * row_scale to bf16, as a dense bf16 weight would be."""
    mapping = random_mapping(4 * 9, 12, 8, 4, seed=5)
    memory = random_memory(mapping, seed=5)
    x = randn(2, 4, 6, 6, seed=6, dtype=torch.float64).bfloat16()
    row_scale = randn(mapping.rows, seed=7, dtype=torch.float64).abs() + 0.5
    _, want = _reference(x, memory, mapping, 0.5, row_scale, 1, (3, 3), (1, 1), (1, 1), (1, 1))
    out = torch.empty(2, 12, 6, 6, device=device, dtype=torch.bfloat16)
    roast_conv_forward(x.to(device), memory.float().to(device), mapping, 0.5, out, (3, 3), (1, 1), (1, 1), (1, 1),
                       row_scale=row_scale.float().to(device))
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=3e-2, atol=3e-2)


def test_bad_row_scale_names_what_is_accepted(device):
    mapping = random_mapping(3 * 4, 5, 4, 5, seed=8)
    memory = random_memory(mapping).float().to(device)
    x = torch.zeros(1, 3, 5, 5, device=device)
    out = torch.empty(1, 5, 4, 4, device=device)
    for bad in (torch.ones(11, device=device), torch.ones(12, device=device, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"row_scale must be a contiguous float32 \(12,\) tensor"):
            roast_conv_forward(x, memory, mapping, 1.0, out, (2, 2), (1, 1), (0, 0), (1, 1), row_scale=bad)


def test_op_reference_backward_passes_gradcheck(monkeypatch):
    """roastfx::roast_conv_row_scaled on the reference path (ROASTFX_KERNELS=reference), float64: its
    backward (dense conv gradients, then the row sums and the scatter) against finite differences, for x,
    the memory, the row scale and the bias; an unbatched conv1d input included."""
    from roastfx.codegen.ops import mapping_args

    monkeypatch.setenv("ROASTFX_KERNELS", "reference")
    mapping = random_mapping(2 * 3, 4, 2, 3, seed=9)
    memory = random_memory(mapping, seed=9).requires_grad_()
    packed = mapping_args(mapping)
    rows = (randn(mapping.rows, seed=10, dtype=torch.float64).abs() + 0.5).requires_grad_()
    bias = randn(4, seed=11, dtype=torch.float64).requires_grad_()
    for x in (randn(2, 4, 7, seed=12, dtype=torch.float64), randn(4, 7, seed=13, dtype=torch.float64)):
        x.requires_grad_()

        def conv(x, memory, rows, bias):
            return torch.ops.roastfx.roast_conv_row_scaled(x, memory, packed, 0.7, rows, bias, [3], [2], [1], [1], 2)

        assert torch.autograd.gradcheck(conv, (x, memory, rows, bias))


def test_row_scaled_ops_pass_opcheck(device, monkeypatch):
    """roastfx::roast_conv_row_scaled (with autograd; on the reference path, whose schema, fake and autograd
    registration the Triton path shares) and its Triton backward ops conv_grad_input(row_scale=) /
    conv_row_scaled_grad_memory: opcheck checks their schemas and fake implementations; their values are the
    float64 tests' above."""
    from roastfx.codegen.ops import mapping_args

    monkeypatch.setenv("ROASTFX_KERNELS", "reference")
    mapping = random_mapping(3 * 4, 10, 4, 3, seed=12)
    args = (random_memory(mapping, seed=12).float().to(device).requires_grad_(), mapping_args(mapping), 0.6)
    rows = (randn(mapping.rows, seed=13, device=device).abs() + 0.5).requires_grad_()
    x = randn(2, 6, 7, 6, seed=14, device=device).requires_grad_()
    bias = randn(10, seed=15, device=device).requires_grad_()
    geometry = ([2, 2], [2, 1], [1, 0], [1, 1], 2)
    torch.library.opcheck(torch.ops.roastfx.roast_conv_row_scaled.default, (x, *args, rows, bias, *geometry))
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    grad = randn(2, 10, 4, 5, seed=16, device=device)
    site = (args[0].detach(), *args[1:])
    torch.library.opcheck(torch.ops.roastfx.conv_grad_input.default,
                          (grad, *site, list(x.shape), *geometry, False, rows.detach()))
    torch.library.opcheck(torch.ops.roastfx.conv_row_scaled_grad_memory.default,
                          (x.detach(), grad, *site, rows.detach(), *geometry))
