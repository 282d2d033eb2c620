"""The implicit-GEMM conv kernels (triton_conv.py) against float64 autograd of F.conv2d/conv3d and the
transposed convs on the reference view: dX from roast_conv_grad_input, the memory gradient from
roast_conv_grad_memory, the transposed conv's forward and input gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from roastfx.codegen import configs, reference
from roastfx.codegen.triton_conv import roast_conv_grad_input, roast_conv_grad_memory
from test_conv_kernel import CASES
from test_kernels import random_mapping, random_memory, randn


def reference_grads(x, memory, mapping, scale, grad, cin, kernel, stride, padding, dilation):
    """(dX, dMemory, sum of dV^2) in float64 by autograd through the materialized view and F.conv2d."""
    x = x.double().requires_grad_()
    memory = memory.double().requires_grad_()
    view = reference.materialize(memory, mapping, scale)
    view.retain_grad()
    weight = view.t().reshape(mapping.cols, cin, *kernel)
    F.conv2d(x, weight, None, stride, padding, dilation).backward(grad.double())
    return x.grad, memory.grad, view.grad.square().sum()  # the view's gradient dV, before the scale


def output_shape(batch, cout, hw, kernel, stride, padding, dilation):
    return (batch, cout, *[(s + 2 * p - d * (k - 1) - 1) // st + 1
                           for s, k, st, p, d in zip(hw, kernel, stride, padding, dilation)])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[4]}-s{c[5]}-p{c[6]}-d{c[7]}")
@pytest.mark.parametrize("tiling", [(5, 3), (8, 16)])
def test_input_gradient_matches_float64_autograd(case, tiling, device):
    batch, cin, cout, hw, kernel, stride, padding, dilation = case
    mapping = random_mapping(cin * kernel[0] * kernel[1], cout, *tiling, alignment=2, window_start=10, seed=cin)
    memory = random_memory(mapping, seed=cout)
    x = randn(batch, cin, *hw, seed=1, dtype=torch.float64)
    grad = randn(*output_shape(batch, cout, hw, kernel, stride, padding, dilation), seed=3, dtype=torch.float64)
    want, _, _ = reference_grads(x, memory, mapping, 0.4, grad, cin, kernel, stride, padding, dilation)
    dx = torch.full(x.shape, float("nan"), device=device)  # every element must be written
    got = roast_conv_grad_input(grad.float().to(device), memory.float().to(device), mapping, 0.4, dx, kernel,
                                  stride, padding, dilation)
    assert got is dx
    torch.testing.assert_close(dx.double().cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[4]}-s{c[5]}-p{c[6]}-d{c[7]}")
def test_memory_gradient_and_its_sum_of_squares_match_float64_autograd(case, deterministic, device):
    batch, cin, cout, hw, kernel, stride, padding, dilation = case
    mapping = random_mapping(cin * kernel[0] * kernel[1], cout, 5, 3, alignment=1, window_start=7, seed=cout)
    memory = random_memory(mapping, seed=cin)
    x = randn(batch, cin, *hw, seed=4, dtype=torch.float64)
    grad = randn(*output_shape(batch, cout, hw, kernel, stride, padding, dilation), seed=5, dtype=torch.float64)
    _, want, want_sumsq = reference_grads(x, memory, mapping, 0.7, grad, cin, kernel, stride, padding, dilation)
    got, sumsq = roast_conv_grad_memory(x.float().to(device), grad.float().to(device), memory.numel(), mapping,
                                          0.7, kernel, stride, padding, dilation, deterministic=deterministic,
                                          sumsq=True)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sumsq.cpu(), want_sumsq, rtol=1e-4, atol=1e-6)
    plain, none = roast_conv_grad_memory(x.float().to(device), grad.float().to(device), memory.numel(), mapping,
                                           0.7, kernel, stride, padding, dilation, deterministic=deterministic)
    assert none is None
    torch.testing.assert_close(plain, got, rtol=1e-6, atol=1e-6)


def reference_group_grads(x, memory, mapping, scale, grad, groups, kernel, stride, padding, dilation):
    """(dX, dMemory) in float64 by autograd of a grouped F.conv2d through the materialized view."""
    x = x.double().requires_grad_()
    memory = memory.double().requires_grad_()
    weight = reference.materialize(memory, mapping, scale).t().reshape(mapping.cols, x.shape[1] // groups, *kernel)
    F.conv2d(x, weight, None, stride, padding, dilation, groups).backward(grad.double())
    return x.grad, memory.grad


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("groups,cout", [(3, 12), (6, 6)], ids=["groups3", "depthwise"])
def test_groups_in_one_launch_at_any_strides_and_block(groups, cout, deterministic, device):
    """All groups in one launch each for dX and dMemory: groups of 4 and of 1 output channel split the
    5-column hash tiles; channels_last input and gradient; a block config that splits the hash tiles."""
    cin, kernel, stride, padding = 6, (2, 3), (2, 1), (1, 2)
    mapping = random_mapping(cin // groups * 6, cout, 4, 5, seed=8)
    memory = random_memory(mapping, seed=8)
    x = randn(2, cin, 9, 8, seed=6, dtype=torch.float64)
    grad = randn(*output_shape(2, cout, (9, 8), kernel, stride, padding, (1, 1)), seed=7, dtype=torch.float64)
    want_dx, want_mem = reference_group_grads(x, memory, mapping, 0.3, grad, groups, kernel, stride, padding, (1, 1))
    cfg = configs.BlockConfig(32, 32, 64, num_warps=4, num_stages=2)
    xs = x.float().to(device).to(memory_format=torch.channels_last)
    gs = grad.float().to(device).to(memory_format=torch.channels_last)
    dx = torch.full(x.shape, float("nan"), device=device).to(memory_format=torch.channels_last)
    roast_conv_grad_input(gs, memory.float().to(device), mapping, 0.3, dx, kernel, stride, padding, (1, 1),
                            groups=groups, config=cfg)
    torch.testing.assert_close(dx.double().cpu(), want_dx, rtol=1e-4, atol=1e-4)
    got, _ = roast_conv_grad_memory(xs, gs, memory.numel(), mapping, 0.3, kernel, stride, padding, (1, 1),
                                      groups=groups, deterministic=deterministic, config=cfg)
    torch.testing.assert_close(got.double().cpu(), want_mem, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cout", [32, 24], ids=["groups-on-tiles", "groups-off-tiles"])
@pytest.mark.parametrize("tiles", [(8, 16), (4, 64), (6, 5)], ids=["two-tiles", "inside-a-tile", "per-element"])
def test_grouped_input_gradient_reads_whole_tiles_only_where_groups_line_up(cout, tiles, device):
    """dX reduces over each group's output channels from g * cout/groups: 16 channels per group start on the
    16- and 64-column hash tiles' boundaries within a 32-deep block, 12 per group do not, and 5-column tiles
    never do; each way the slots are the reference's."""
    groups, cin, kernel, stride, padding = 2, 4, (3, 3), (1, 1), (1, 1)
    mapping = random_mapping(cin // groups * 9, cout, *tiles, alignment=1, window_start=5, seed=cout + tiles[1])
    memory = random_memory(mapping, seed=11)
    x = randn(2, cin, 5, 6, seed=12, dtype=torch.float64)
    grad = randn(*output_shape(2, cout, (5, 6), kernel, stride, padding, (1, 1)), seed=13, dtype=torch.float64)
    want_dx, _ = reference_group_grads(x, memory, mapping, 0.5, grad, groups, kernel, stride, padding, (1, 1))
    dx = torch.full(x.shape, float("nan"), device=device)
    roast_conv_grad_input(grad.float().to(device), memory.float().to(device), mapping, 0.5, dx, kernel, stride,
                          padding, (1, 1), groups=groups, config=configs.BlockConfig(32, 32, 32, 1, 1))
    torch.testing.assert_close(dx.double().cpu(), want_dx, rtol=1e-4, atol=1e-4)


TRANSPOSED = [  # (cin, cout, kernel, stride, padding, output_padding, dilation, spatial, groups, tiles)
    (4, 6, (3, 2), (2, 1), (1, 0), (1, 0), (1, 2), (4, 5), 1, (3, 4)),
    (4, 6, (3, 2), (2, 1), (1, 0), (1, 0), (1, 2), (4, 5), 2, (3, 4)),  # 3-row tiles split groups of 2 rows
    (4, 6, (2, 3, 2), (2, 1, 2), (0, 1, 1), (1, 0, 1), (2, 1, 2), (3, 4, 3), 2, (3, 5)),
]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", TRANSPOSED, ids=["2d", "2d-groups", "3d-groups"])
def test_transposed_view_gives_the_transposed_conv(case, deterministic, device):
    """With ``transposed`` the mapping is a transposed conv's (in, out/groups * kernel size) view: the dX kernel
    is its forward (F.conv_transposeNd), the conv kernel reading V transposed its input gradient, and the
    dMemory kernel, with dY as the conv's input and x as its output gradient, its memory gradient."""
    from roastfx.codegen.triton_conv import roast_conv_forward

    cin, cout, kernel, stride, padding, output_padding, dilation, spatial, groups, tiles = case
    mapping = random_mapping(cin, cout // groups * math.prod(kernel), *tiles, seed=groups)
    memory = random_memory(mapping, seed=5)
    x = randn(2, cin, *spatial, seed=9, dtype=torch.float64).requires_grad_()
    md = memory.clone().requires_grad_()
    weight = reference.materialize(md, mapping, 0.6).reshape(cin, cout // groups, *kernel)
    dense = F.conv_transpose2d if len(kernel) == 2 else F.conv_transpose3d
    y = dense(x, weight, None, stride, padding, output_padding, groups, dilation)
    dy = randn(*y.shape, seed=10, dtype=torch.float64)
    y.backward(dy)
    mem32 = memory.float().to(device)
    out = torch.empty(y.shape, device=device)
    roast_conv_grad_input(x.detach().float().to(device), mem32, mapping, 0.6, out, kernel, stride, padding,
                          dilation, groups=groups, transposed=True)
    torch.testing.assert_close(out.double().cpu(), y.detach(), rtol=1e-4, atol=1e-4)
    dx = torch.empty(x.shape, device=device)
    roast_conv_forward(dy.float().to(device), mem32, mapping, 0.6, dx, kernel, stride, padding, dilation,
                       groups=groups, view_is_b=False)
    torch.testing.assert_close(dx.double().cpu(), x.grad, rtol=1e-4, atol=1e-4)
    dm, _ = roast_conv_grad_memory(dy.float().to(device), x.detach().float().to(device), memory.numel(), mapping,
                                   0.6, kernel, stride, padding, dilation, groups=groups,
                                   deterministic=deterministic, transposed=True)
    torch.testing.assert_close(dm.double().cpu(), md.grad, rtol=1e-4, atol=1e-4)


def test_half_precision(device):
    mapping = random_mapping(4 * 9, 12, 8, 4, seed=9)
    memory = random_memory(mapping, seed=9)
    x = randn(2, 4, 6, 6, seed=10, dtype=torch.float64).bfloat16()
    grad = randn(2, 12, 6, 6, seed=11, dtype=torch.float64).bfloat16()
    want_dx, want_mem, _ = reference_grads(x, memory.bfloat16(), mapping, 0.5, grad, 4, (3, 3), (1, 1), (1, 1),
                                           (1, 1))
    dx = torch.empty(x.shape, device=device, dtype=torch.bfloat16)
    roast_conv_grad_input(grad.to(device), memory.float().to(device), mapping, 0.5, dx, (3, 3), (1, 1), (1, 1),
                            (1, 1))
    torch.testing.assert_close(dx.double().cpu(), want_dx, rtol=3e-2, atol=5e-2)
    got, _ = roast_conv_grad_memory(x.to(device), grad.to(device), memory.numel(), mapping, 0.5, (3, 3), (1, 1),
                                      (1, 1), (1, 1))
    torch.testing.assert_close(got.double().cpu(), want_mem, rtol=3e-2, atol=5e-2)


def test_bad_arguments_name_the_values(device):
    mapping = random_mapping(3 * 4, 5, 4, 5, seed=7)
    memory = random_memory(mapping).float().to(device)
    x = torch.zeros(1, 3, 5, 5, device=device)
    with pytest.raises(ValueError, match=r"output gradient \(torch.float16 on .*\) must match the input"):
        roast_conv_grad_memory(x, torch.zeros(1, 5, 4, 4, device=device, dtype=torch.float16), memory.numel(),
                                 mapping, 1.0, (2, 2), (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match=r"12x5 weight view does not fit kernel \(1, 3, 3\) \(depth, height, width\) with groups=1"):
        roast_conv_grad_input(torch.zeros(1, 5, 3, 3, device=device), memory, mapping, 1.0, x, (3, 3), (1, 1),
                                (0, 0), (1, 1))


def test_the_backward_ops_pass_opcheck(device):
    """roastfx::conv_grad_input / conv_grad_memory / conv_implicit over two groups against autograd of
    F.conv2d with groups=2; opcheck checks their schemas and fake implementations."""
    import roastfx.codegen.conv  # noqa: F401  (registers the ops)
    from roastfx.codegen.ops import mapping_args

    mapping = random_mapping(3 * 4, 10, 4, 3, seed=12)  # groups of 5 columns split the 3-column hash tiles
    memory = random_memory(mapping, seed=12)
    x = randn(2, 6, 7, 6, seed=13, dtype=torch.float64)
    grad = randn(2, 10, 4, 5, seed=14, dtype=torch.float64)
    xd, md = x.clone().requires_grad_(), memory.clone().requires_grad_()
    view = reference.materialize(md, mapping, 0.6)
    view.retain_grad()
    y = F.conv2d(xd, view.t().reshape(10, 3, 2, 2), None, (2, 1), (1, 0), (1, 1), 2)
    y.backward(grad)
    args = (memory.float().to(device), mapping_args(mapping), 0.6)
    geometry = ([2, 2], [2, 1], [1, 0], [1, 1], 2)
    xf, gf = x.float().to(device), grad.float().to(device)
    dx = torch.ops.roastfx.conv_grad_input(gf, *args, list(x.shape), *geometry)
    dm, sumsq = torch.ops.roastfx.conv_grad_memory(xf, gf, *args, *geometry, True)
    out = torch.ops.roastfx.conv_implicit(xf, *args, list(y.shape), *geometry, False)
    torch.testing.assert_close(dx.double().cpu(), xd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dm.double().cpu(), md.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sumsq.cpu(), view.grad.square().sum(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.double().cpu(), y.detach(), rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.roastfx.conv_grad_input.default, (gf, *args, list(x.shape), *geometry))
    torch.library.opcheck(torch.ops.roastfx.conv_grad_memory.default, (xf, gf, *args, *geometry, False))
    torch.library.opcheck(torch.ops.roastfx.conv_implicit.default, (xf, *args, list(y.shape), *geometry, False))


CASES_3D = [  # (batch, cin, cout, (d, h, w), kernel, stride, padding, dilation, groups)
    (2, 4, 6, (5, 6, 4), (3, 2, 2), (2, 1, 1), (1, 0, 1), (2, 2, 1), 2),
    (1, 3, 5, (4, 3, 5), (1, 3, 2), (1, 2, 1), (0, 1, 1), (1, 1, 2), 1),
]


@pytest.mark.parametrize("case", CASES_3D, ids=["grouped", "strided"])
def test_conv3d_forward_input_and_memory_gradients_match_float64(case, device):
    """The same three kernels on 5-D tensors (the 2-D conv is their depth-1 case) against F.conv3d."""
    from roastfx.codegen.triton_conv import roast_conv_forward

    batch, cin, cout, dhw, kernel, stride, padding, dilation, groups = case
    taps = kernel[0] * kernel[1] * kernel[2]
    mapping = random_mapping(cin // groups * taps, cout, 5, 3, seed=cin)  # 3-column tiles split the groups
    memory = random_memory(mapping, seed=cout)
    x = randn(batch, cin, *dhw, seed=1, dtype=torch.float64).requires_grad_()
    md = memory.clone().requires_grad_()
    weight = reference.materialize(md, mapping, 0.4).t().reshape(cout, cin // groups, *kernel)
    bias = randn(cout, seed=2, dtype=torch.float64)
    y = F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    dy = randn(*y.shape, seed=3, dtype=torch.float64)
    y.backward(dy)
    mem32 = memory.float().to(device)
    out = torch.empty(y.shape, device=device)
    roast_conv_forward(x.detach().float().to(device), mem32, mapping, 0.4, out, kernel, stride, padding, dilation,
                       groups=groups, bias=bias.float().to(device))
    torch.testing.assert_close(out.double().cpu(), y.detach(), rtol=1e-4, atol=1e-4)
    dx = torch.empty(x.shape, device=device)
    roast_conv_grad_input(dy.float().to(device), mem32, mapping, 0.4, dx, kernel, stride, padding, dilation,
                          groups=groups)
    torch.testing.assert_close(dx.double().cpu(), x.grad, rtol=1e-4, atol=1e-4)
    for deterministic in (False, True):
        dm, _ = roast_conv_grad_memory(x.detach().float().to(device), dy.float().to(device), memory.numel(), mapping,
                                       0.4, kernel, stride, padding, dilation, groups=groups,
                                       deterministic=deterministic)
        torch.testing.assert_close(dm.double().cpu(), md.grad, rtol=1e-4, atol=1e-4)
