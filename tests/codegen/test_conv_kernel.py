"""The implicit-GEMM conv kernel (triton_conv.py) against F.conv2d in float64 on the reference view."""
import math

import pytest
import torch
import torch.nn.functional as F

from roastfx.codegen import configs, reference
from roastfx.codegen.triton_conv import roast_conv_forward
from test_kernels import random_mapping, random_memory, randn


def conv64(x, memory, mapping, scale, cin, kernel, stride, padding, dilation, bias=None):
    """The float64 reference: the view materialized, W = V^T reshaped, F.conv2d."""
    view = reference.materialize(memory.double(), mapping, scale)
    weight = view.t().reshape(mapping.cols, cin, *kernel)
    return F.conv2d(x.double(), weight, None if bias is None else bias.double(), stride, padding, dilation)


CASES = [  # (batch, cin, cout, (h, w), kernel, stride, padding, dilation)
    (3, 5, 7, (9, 7), (3, 2), (2, 1), (1, 2), (2, 1)),
    (2, 3, 40, (6, 11), (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1: a plain GEMM over pixels
    (1, 4, 33, (5, 5), (3, 3), (3, 2), (4, 3), (1, 1)),  # padding wider than the kernel: all-zero rows
    (2, 7, 9, (12, 10), (5, 3), (1, 2), (2, 0), (1, 3)),
    # whole blocks along the reduction (32 x 3 x 1 = 96) and the channels (64): the loads drop those masks
    # (even_flags), the padding masks stay
    (2, 32, 64, (5, 6), (3, 1), (1, 1), (1, 0), (1, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[4]}-s{c[5]}-p{c[6]}-d{c[7]}")
@pytest.mark.parametrize("tiling", [(5, 3), (8, 16)])
def test_matches_float64_conv(case, tiling, device):
    batch, cin, cout, (h, w), kernel, stride, padding, dilation = case
    mapping = random_mapping(cin * kernel[0] * kernel[1], cout, *tiling, alignment=2, window_start=10, seed=cin)
    memory = random_memory(mapping, seed=cout)
    x = randn(batch, cin, h, w, seed=1, dtype=torch.float64)
    bias = randn(cout, seed=2, dtype=torch.float64)
    want = conv64(x, memory, mapping, 0.4, cin, kernel, stride, padding, dilation, bias)
    out = torch.empty(want.shape, device=device)
    got = roast_conv_forward(x.float().to(device), memory.float().to(device), mapping, 0.4, out, kernel, stride,
                             padding, dilation, bias=bias.float().to(device))
    assert got is out
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


def conv64_groups(x, memory, mapping, scale, groups, kernel, stride, padding, dilation):
    """The float64 reference of a grouped conv: W = V^T reshaped to (out, in/groups, *kernel)."""
    view = reference.materialize(memory.double(), mapping, scale)
    weight = view.t().reshape(mapping.cols, x.shape[1] // groups, *kernel)
    return F.conv2d(x.double(), weight, None, stride, padding, dilation, groups)


@pytest.mark.parametrize("groups,cout", [(3, 12), (6, 6)], ids=["groups3", "depthwise"])
def test_groups_in_one_launch_at_any_strides_and_block(groups, cout, device):
    """Every group in one launch (program axis 1), its view columns from g * out/groups whatever the hash
    tiles (5 columns wide here: groups of 4 and of 1 channel split them); channels_last input and output; a
    block config that splits the hash tiles."""
    cin, kernel = 6, (2, 3)
    mapping = random_mapping(cin // groups * 6, cout, 4, 5, seed=4)
    memory = random_memory(mapping, seed=4)
    x = randn(2, cin, 7, 8, seed=3, dtype=torch.float64)
    want = conv64_groups(x, memory, mapping, 0.7, groups, kernel, (1, 2), (1, 1), (1, 1))
    out = torch.full(want.shape, float("nan"), device=device).to(memory_format=torch.channels_last)
    xs = x.float().to(device).to(memory_format=torch.channels_last)
    cfg = configs.BlockConfig(64, 32, 32, num_warps=4, num_stages=2)
    roast_conv_forward(xs, memory.float().to(device), mapping, 0.7, out, kernel, (1, 2), (1, 1), (1, 1), groups=groups,
                 config=cfg)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-4, atol=1e-4)


def test_half_precision_input(device):
    mapping = random_mapping(4 * 9, 12, 8, 4, seed=5)
    memory = random_memory(mapping, seed=5)
    x = randn(2, 4, 6, 6, seed=6, dtype=torch.float64).bfloat16()
    out = torch.empty(2, 12, 6, 6, device=device, dtype=torch.bfloat16)
    roast_conv_forward(x.to(device), memory.float().to(device), mapping, 0.5, out, (3, 3), (1, 1), (1, 1), (1, 1))
    want = conv64(x, memory.bfloat16(), mapping, 0.5, 4, (3, 3), (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(out.double().cpu(), want, rtol=3e-2, atol=3e-2)


def test_bad_geometry_names_the_values(device):
    mapping = random_mapping(3 * 4, 5, 4, 5, seed=7)
    memory = random_memory(mapping).float().to(device)
    x = torch.zeros(1, 3, 5, 5, device=device)
    with pytest.raises(ValueError, match=r"12x5 weight view does not fit kernel \(1, 3, 3\) \(depth, height, width\) with groups=1"):
        roast_conv_forward(x, memory, mapping, 1.0, torch.empty(1, 5, 3, 3, device=device), (3, 3), (1, 1), (0, 0),
                           (1, 1))
    with pytest.raises(ValueError, match="take 4-D input and output with 2-entry kernel"):
        roast_conv_forward(x[0], memory, mapping, 1.0, torch.empty(1, 5, 4, 4, device=device), (2, 2), (1, 1),
                           (0, 0), (1, 1))


@pytest.mark.parametrize("signature,shapes", [
    # eval batch norm + relu + residual, per-channel (C, 1, 1) statistics
    ("sub:x0|add(x1,1e-05)|rsqrt|mul(v1,v3)|mul:x2|add:x3|add:x4|relu",
     [(9, 1, 1), (9, 1, 1), (9, 1, 1), (9, 1, 1), (2, 9, 4, 7)]),
    # a scalar, a per-column (OW,) vector and a per-image (N, 1, 1, 1) factor
    ("mul:x0|add:x1|silu|mul(v3,x2)|cast:bfloat16", [(), (7,), (2, 1, 1, 1)]),
])
def test_generated_conv_epilogue_matches_float64(signature, shapes, device):
    from roastfx.codegen.epilogue import Epilogue
    from roastfx.codegen.triton_epilogue import roast_conv_epilogue

    cin, cout, kernel, stride, padding, dilation = 5, 9, (3, 2), (2, 1), (1, 1), (1, 2)
    mapping = random_mapping(cin * 6, cout, 5, 3, seed=8)
    memory = random_memory(mapping, seed=8)
    x = randn(2, cin, 7, 7, seed=9, dtype=torch.float64)
    extras = [randn(*(s or (1,)), seed=20 + i, dtype=torch.float64).reshape(s) for i, s in enumerate(shapes)]
    if signature.startswith("sub"):
        extras[1] = extras[1].abs() + 0.5  # a variance
    epi = Epilogue.parse(signature)
    pre = conv64(x, memory, mapping, 0.3, cin, kernel, stride, padding, dilation)
    want = epi.apply(pre, extras)
    out = torch.empty(want.shape, device=device, dtype=want.dtype if want.dtype != torch.float64 else torch.float32)
    roast_conv_epilogue(x.float().to(device), memory.float().to(device), mapping, 0.3, out, kernel, stride, padding,
                        dilation, epi, [e.float().to(device) for e in extras])
    tol = 2e-2 if "bfloat16" in signature else 1e-4
    torch.testing.assert_close(out.double().cpu(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dims", [2, 3])
def test_generated_transposed_conv_epilogue_matches_float64(dims, device):
    """A transposed conv (grouped; its view split by 3-row tiles) + bias + batch norm + relu + residual in one
    generated kernel, against F.conv_transpose in float64."""
    from roastfx.codegen.epilogue import Epilogue
    from roastfx.codegen.triton_epilogue import roast_transposed_conv_epilogue

    cin, cout, groups = 4, 6, 2
    kernel, stride, padding, output_padding, dilation, spatial = (
        ((3, 2), (2, 1), (1, 0), (1, 0), (1, 2), (4, 5)) if dims == 2 else
        ((2, 3, 2), (2, 1, 2), (0, 1, 1), (1, 0, 1), (2, 1, 2), (3, 4, 3)))
    taps = math.prod(kernel)
    mapping = random_mapping(cin, cout // groups * taps, 3, 4, seed=dims)
    memory = random_memory(mapping, seed=dims)
    x = randn(2, cin, *spatial, seed=9, dtype=torch.float64)
    weight = reference.materialize(memory, mapping, 0.5).reshape(cin, cout // groups, *kernel)
    dense = F.conv_transpose2d if dims == 2 else F.conv_transpose3d
    pre = dense(x, weight, None, stride, padding, output_padding, groups, dilation)
    channel = (cout,) + (1,) * dims
    extras = [randn(*channel, seed=20 + i, dtype=torch.float64) for i in range(5)] + \
        [randn(*pre.shape, seed=30, dtype=torch.float64)]
    extras[2] = extras[2].abs() + 0.5  # a variance
    epi = Epilogue.parse("add:x0|sub:x1|add(x2,1e-05)|rsqrt|mul(v2,v4)|mul:x3|add:x4|add:x5|relu")
    want = epi.apply(pre, extras)
    out = torch.full(want.shape, float("nan"), device=device)
    roast_transposed_conv_epilogue(x.float().to(device), memory.float().to(device), mapping, 0.5, out, kernel, stride,
                                   padding, dilation, epi, [e.float().to(device) for e in extras], groups=groups)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-4, atol=1e-4)
