"""roastfx::roast_grouped_mm (a mixture of experts' grouped GEMM over a grouped site) against float64 formulas,
on the reference path and on the Triton kernels (one fused GEMM per group)."""
import pytest
import torch

from roastfx.codegen import ops, reference
from roastfx.codegen.ops import roast_grouped_mm

from test_kernels import random_mapping, randn

# (tile_rows, tile_cols, alignment, window_start) over a (K=40, 3 x N=24) view: columns that divide N (each group
# whole tiles: the fused path), and 5 that do not (tiles straddle groups: the op gathers the view instead)
TILINGS = [(8, 8, 4, 64), (5, 3, 1, 7), (1, 24, 8, 0), (7, 5, 2, 30)]
K, N, GROUPS = 40, 24, 3


def _case(tiling, seed, transpose_view, dtype=torch.float32, device="cpu"):
    tr, tc, align, start = tiling
    mapping = random_mapping(K, GROUPS * N, tr, tc, align, start, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn(mapping.window_start + mapping.window_size + 5, generator=gen).to(device)
    # 37 rows: group 0 has 10, group 1 none, group 2 has 19, the last 8 belong to no group
    offs = torch.tensor([10, 10, 29], dtype=torch.int32, device=device)
    x = randn(37, K if not transpose_view else N, seed=seed + 1, dtype=dtype, device=device)
    return mapping, memory, offs, x


def _reference(x, memory, offs, mapping, scale, transpose_view, width=N):
    """float64: out[rows of g] = x[rows] @ B_g (B_g^T), B_g the view's g-th block of ``width`` columns; other
    rows 0."""
    view = reference.materialize(memory, mapping, scale)
    out = x.new_zeros(x.shape[0], mapping.rows if transpose_view else width)
    start = 0
    for g, end in enumerate(offs.tolist()):
        block = view[:, g * width:(g + 1) * width]
        out[start:end] = x[start:end] @ (block.t() if transpose_view else block)
        start = end
    return out


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("transpose_view", [False, True])
# every tiling, and the site's gradient scaling with whole tiles per group and with tiles straddling groups
@pytest.mark.parametrize("tiling,grad_norm", [(t, False) for t in TILINGS] + [(TILINGS[0], True), (TILINGS[1], True)])
def test_grouped_mm_and_its_gradients_match_float64(path, transpose_view, tiling, grad_norm, device, monkeypatch):
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    mapping, memory, offs, x = _case(tiling, 3, transpose_view, device=device)
    scale = 0.37
    windows = ops.column_windows(ops.mapping_args(mapping), GROUPS)
    assert (windows is not None) == (N % tiling[1] == 0)
    x = x.requires_grad_()
    memory = memory.requires_grad_()
    out = roast_grouped_mm(x, memory, offs, ops.mapping_args(mapping), scale, GROUPS, transpose_view, grad_norm)
    weights = randn(*out.shape, seed=11, device=device)
    (out * weights).sum().backward()

    x64 = x.detach().double().requires_grad_()
    mem64 = memory.detach().double().requires_grad_()
    ref = _reference(x64, mem64, offs, mapping, scale, transpose_view)
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert out[29:].abs().max() == 0  # rows past offs[-1]: no group
    (ref * weights.double()).sum().backward()
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    expected = mem64.grad
    if grad_norm:  # the memory gets the site's whole view gradient divided by its RMS
        grad_view = _view_grad(x64.detach(), offs, weights.double(), transpose_view)
        rms = grad_view.square().mean().sqrt()
        mem = mem64.detach().requires_grad_()
        (reference.materialize(mem, mapping, scale) * (grad_view / rms)).sum().backward()
        expected = mem.grad
    assert torch.allclose(memory.grad.double(), expected, atol=1e-3, rtol=1e-4)


def _view_grad(x, offs, grad_out, transpose_view):
    """dL/dV (K, groups * N) of out = grouped x @ B_g (B_g^T) for dL/dout = grad_out."""
    grad_view = x.new_zeros(K, GROUPS * N)
    start = 0
    for g, end in enumerate(offs.tolist()):
        xs, gs = x[start:end], grad_out[start:end]
        grad_view[:, g * N:(g + 1) * N] = gs.t() @ xs if transpose_view else xs.t() @ gs
        start = end
    return grad_view


def test_grouped_mm_refuses_bad_offs_naming_them(device):
    mapping, memory, offs, x = _case(TILINGS[0], 5, False, device=device)
    args = (memory, None, ops.mapping_args(mapping), 1.0, GROUPS)
    for bad, words in [(offs.float(), "integer"), (offs[:2], "3 cumulative group ends"),
                       (torch.tensor([10, 4, 29], dtype=torch.int32, device=device), "must not decrease")]:
        call = (x, args[0], bad, *args[2:])
        with pytest.raises(ValueError, match=words):
            roast_grouped_mm(*call)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_grouped_mm_passes_opcheck(path, device, monkeypatch):
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    mapping, memory, offs, x = _case(TILINGS[0], 7, False, device=device)
    torch.library.opcheck(torch.ops.roastfx.roast_grouped_mm.default,
                          (x.requires_grad_(), memory.requires_grad_(), offs, ops.mapping_args(mapping), 0.5, GROUPS),
                          {"transpose_view": False, "grad_norm": False},
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("transpose_view", [False, True])
def test_grouped_kernels_over_many_groups_of_several_row_blocks(deterministic, transpose_view, device, monkeypatch,
                                                                deterministic_mode):
    """5 groups of 40, 0, 65, 35 and 1 rows (several row blocks each, one launch for all), 9 rows past the last;
    forward, dX and dMemory (atomics in one launch, or deterministic per group) against float64."""
    from roastfx.codegen import triton_grouped

    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    deterministic_mode(deterministic)
    groups, k, n = 5, 48, 32
    mapping = random_mapping(k, groups * n, 8, 16, 4, 16, seed=21)
    gen = torch.Generator().manual_seed(21)
    memory = torch.randn(mapping.window_start + mapping.window_size + 3, generator=gen).to(device).requires_grad_()
    offs = torch.tensor([40, 40, 105, 140, 141], dtype=torch.int32, device=device)
    x = randn(150, n if transpose_view else k, seed=22, device=device).requires_grad_()
    launches = []
    original = triton_grouped.roast_grouped_matmul
    monkeypatch.setattr(triton_grouped, "roast_grouped_matmul", lambda *a, **kw: launches.append(1) or original(*a, **kw))
    out = roast_grouped_mm(x, memory, offs, ops.mapping_args(mapping), 0.5, groups, transpose_view)
    weights = randn(*out.shape, seed=23, device=device)
    (out * weights).sum().backward()
    assert len(launches) == 2  # forward and dX: one grouped launch each

    x64, mem64 = x.detach().double().requires_grad_(), memory.detach().double().requires_grad_()
    ref = _reference(x64, mem64, offs, mapping, 0.5, transpose_view, width=n)
    (ref * weights.double()).sum().backward()
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(memory.grad.double(), mem64.grad, atol=1e-3, rtol=1e-4)
