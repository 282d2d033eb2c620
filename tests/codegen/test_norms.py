"""roastfx::slice_sumsq (weight norm's squared per-slice norms, read from the memory) and its gradient, on the
reference path and on the Triton kernels, against float64 formulas over the view built element by element."""
import pytest
import torch

from roastfx.codegen import ops, reference

from test_kernels import random_mapping, randn

# (tile_rows, tile_cols, alignment, window_start) over odd (rows, cols) views: tiles that straddle the block edges,
# one-element tiles, tiles as wide as the view
CASES = [((45, 70), (8, 8, 4, 64)), ((33, 97), (5, 3, 1, 7)), ((64, 40), (1, 40, 8, 0)), ((7, 130), (1, 1, 1, 3))]


# the Triton path's gradient with atomic adds, and deterministic (through the view in torch)
@pytest.mark.parametrize("path,deterministic", [("reference", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("per_column", [True, False])
@pytest.mark.parametrize("shape,tiling", CASES)
def test_slice_sumsq_and_its_gradient_match_float64(path, deterministic, per_column, shape, tiling, device,
                                                     deterministic_mode, monkeypatch):
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    deterministic_mode(deterministic)
    mapping = random_mapping(*shape, *tiling, seed=sum(shape))
    scale = 0.61
    memory = randn(mapping.window_start + mapping.window_size + 3, seed=5, device=device).requires_grad_()
    sums = ops.slice_sumsq(memory, ops.mapping_args(mapping), scale, per_column)
    weights = randn(*sums.shape, seed=9, device=device)
    (sums * weights).sum().backward()

    mem64 = memory.detach().cpu().double().requires_grad_()
    view = reference.materialize(mem64, mapping, scale)  # element by element from the hash formulas
    expected = view.square().sum(0 if per_column else 1)
    (expected * weights.cpu().double()).sum().backward()
    assert sums.dtype == torch.float32 and sums.shape == expected.shape
    torch.testing.assert_close(sums.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(memory.grad.cpu().double(), mem64.grad, rtol=1e-5, atol=1e-5)


def test_slice_sumsq_passes_opcheck():
    mapping = random_mapping(33, 40, 8, 8, 4, 16, seed=2)
    memory = randn(mapping.window_start + mapping.window_size, seed=1, dtype=torch.float64)
    for per_column in (True, False):
        torch.library.opcheck(ops.slice_sumsq, (memory.requires_grad_(), ops.mapping_args(mapping), 0.5, per_column))
