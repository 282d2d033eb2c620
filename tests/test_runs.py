"""The PyTorch path by runs (codegen/runs.py) against the element-by-element oracle (codegen/reference.py)."""
import pytest
import torch

from roastfx.codegen import reference, runs
from roastfx.codegen.hashing import PRIME, TileHash

# (rows, cols, tile, alignment, window start, window size): tiles wider than the view, one-row chunks, odd tiles
# that divide nothing, alignments that divide the run length or not, windows off the memory's start
LAYOUTS = [
    (37, 45, (8, 16), 4, 0, 500),
    (5, 70, (1, 32), 32, 64, 320),
    (33, 9, (5, 3), 1, 7, 100),
    (16, 16, (16, 16), 16, 0, 256),
    (50, 7, (4, 12), 8, 24, 90),
    (3, 100, (2, 6), 4, 12, 61),
]


def mapping_for(layout, seed):
    rows, cols, tile, align, start, window = layout
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))
    return TileHash(rows, cols, tile[0], tile[1], align, start, window,
                    r(1, PRIME), r(1, PRIME), r(0, PRIME), r(1, PRIME), r(1, PRIME), r(0, PRIME))


@pytest.fixture(params=[256, 0], ids=["view-cache", "no-view-cache"])
def view_cache(request, monkeypatch):
    cache = runs.ViewCache(request.param * 2**20)
    monkeypatch.setattr(runs, "VIEW_CACHE", cache)
    return cache


@pytest.mark.parametrize("layout", LAYOUTS)
def test_view_and_its_gradient_equal_the_oracle(layout, view_cache):
    mapping = mapping_for(layout, seed=sum(layout[:2]))
    size = mapping.window_start + mapping.window_size + 5
    memory = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(runs.gather_view(memory, mapping, 0.37), reference.materialize(memory, mapping, 0.37))
    grad = torch.randn(mapping.rows, mapping.cols, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    leaf = memory.clone().requires_grad_()
    reference.materialize(leaf, mapping, 0.37).backward(grad)
    torch.testing.assert_close(runs.scatter_view_grad(grad, mapping, 0.37, size), leaf.grad, rtol=1e-12, atol=1e-12)
    assert (view_cache.bytes > 0) == (view_cache.max_bytes > 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_and_their_gradient_equal_the_oracle(layout, view_cache):
    mapping = mapping_for(layout, seed=7)
    size = mapping.window_start + mapping.window_size
    memory = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, mapping.rows, (4, 3), generator=torch.Generator().manual_seed(4))
    ids[0, 0] = ids[1, 2]  # a repeated id sums its gradients
    got = runs.gather_rows(memory, mapping, 1.7, ids)
    assert got.shape == (4, 3, mapping.cols)
    assert torch.equal(got, reference.materialize_rows(memory, mapping, 1.7, ids))
    grad = torch.randn(4, 3, mapping.cols, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaf = memory.clone().requires_grad_()
    reference.materialize_rows(leaf, mapping, 1.7, ids).backward(grad)
    torch.testing.assert_close(runs.scatter_rows_grad(grad, ids, mapping, 1.7, size), leaf.grad, rtol=1e-12,
                               atol=1e-12)


def test_signs_near_the_prime_need_no_wider_integers():
    # coordinates near 2**31 and constants near P make u + v - P span nearly all of [-P, P)
    mapping = TileHash(rows=PRIME - 1, cols=40, tile_rows=4, tile_cols=8, alignment=8, window_start=8,
                       window_size=400, a_row=PRIME - 2, a_col=PRIME - 3, b=PRIME - 1, c_row=PRIME - 1,
                       c_col=PRIME - 2, d=PRIME - 1)
    k = torch.tensor([0, 1, PRIME - 2, 2**31 - 100, 12345678])[:, None]
    n = torch.arange(40)[None, :]
    assert torch.equal(runs.signs(mapping, k, n).long(), mapping.sign(k, n))
    memory = torch.randn(420, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.equal(runs.gather_rows(memory, mapping, 1.0, k[:, 0]),
                       reference.materialize_rows(memory, mapping, 1.0, k[:, 0]))


def test_sign_where_the_sum_lands_on_a_multiple_of_65536_below_p():
    # (u + v) mod P is taken as s = u + v - P in int32 and, where s < 0, as s - 1 below bit 31: that "- 1"
    # changes bit 16 only when s's low 16 bits are all zero. d = P - 65536 puts element (0, 0) there
    from dataclasses import replace

    mapping = replace(mapping_for(LAYOUTS[0], seed=4), d=PRIME - 65536)
    k, n = torch.arange(mapping.rows)[:, None], torch.arange(mapping.cols)[None, :]
    assert mapping.sign(torch.tensor(0), torch.tensor(0)) == 1
    assert torch.equal(runs.signs(mapping, k, n).long(), mapping.sign(k, n))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_and_single_precision_views_round_as_the_oracle(dtype):
    mapping = mapping_for(LAYOUTS[0], seed=9)
    memory = torch.randn(520, generator=torch.Generator().manual_seed(7)).to(dtype)
    assert torch.equal(runs.gather_view(memory, mapping, 1.3), reference.materialize(memory, mapping, 1.3))


def test_view_cache_holds_signs_and_run_starts_within_its_budget():
    maps = [mapping_for((37 + i, 29, (4, 8), 8, 0, 4096), seed=i) for i in range(4)]
    sizes = [m.rows * m.cols + m.rows * m.grid[1] * 8 for m in maps]  # int8 signs, int64 run starts
    cache = runs.ViewCache(max_bytes=sizes[1] + sizes[2] + sizes[3] - 1)
    for m in maps:
        sign, starts = cache.get(m)
        k = torch.arange(m.rows)[:, None]
        assert sign.dtype == torch.int8 and torch.equal(sign.long(), m.sign(k, torch.arange(m.cols)[None, :]))
        assert torch.equal(starts, m.index(k, torch.arange(0, m.cols, m.tile_cols)[None, :]))
        assert cache.bytes <= cache.max_bytes
    assert list(cache._entries) == maps[2:]  # the two most recent fit; the oldest went
    assert cache.get(maps[3])[0] is cache.get(maps[3])[0]
    off = runs.ViewCache(0)
    off.get(maps[0])
    assert off.bytes == 0 and not off._entries and not off.holds(maps[0])


def test_view_cache_budget_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("ROASTFX_VIEW_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="ROASTFX_VIEW_CACHE_MB='lots'"):
        runs._cache_budget()
    monkeypatch.setenv("ROASTFX_VIEW_CACHE_MB", "-3")
    with pytest.raises(ValueError, match=">= 0 megabytes"):
        runs._cache_budget()
    monkeypatch.delenv("ROASTFX_VIEW_CACHE_MB")
    monkeypatch.setenv("ROASTFX_INDEX_CACHE_MB", "2")  # the variable's earlier name still sets the budget
    assert runs._cache_budget() == 2 * 2**20
    with pytest.raises(ValueError, match="got -1"):
        runs.ViewCache(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("extra", [5, 4000], ids=["memory-smaller-than-view", "memory-larger-than-view"])
def test_every_way_of_reading_a_view_gives_the_oracle_bits(dtype, extra):
    """gather_view (the scale applied to the memory first where that is the smaller tensor: a sign flip
    commutes with rounding), the eager autograd.Function, the custom op and the torch.func path: the oracle's
    values exactly in every dtype, and their memory gradients equal."""
    from roastfx.codegen import ops

    mapping = mapping_for(LAYOUTS[0], seed=11)
    size = mapping.window_start + mapping.window_size + extra
    assert (size < mapping.rows * mapping.cols) == (extra == 5)
    memory = torch.randn(size, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = reference.materialize(memory, mapping, 0.37)
    grad = torch.randn(mapping.rows, mapping.cols, generator=torch.Generator().manual_seed(4)).to(dtype)
    leaf = memory.clone().requires_grad_()
    reference.materialize(leaf, mapping, 0.37).backward(grad)
    reads = {
        "gather_view": lambda m: runs.gather_view(m, mapping, 0.37),
        "EagerMaterialize": lambda m: ops.EagerMaterialize.apply(m, mapping, 0.37),
        "roastfx::materialize": lambda m: ops.materialize(m, ops.mapping_args(mapping), 0.37),
        "gather_view_differentiable": lambda m: runs.gather_view_differentiable(m, mapping, 0.37),
    }
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for name, read in reads.items():
        x = memory.clone().requires_grad_()
        view = read(x)
        assert view.dtype == dtype and torch.equal(view, want), name
        if name != "gather_view":
            view.backward(grad)
            torch.testing.assert_close(x.grad, leaf.grad, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_projections_by_runs_equal_the_oracle(view_cache):
    """compress's projection and a write's projection, computed by runs, against the per-element oracle, over
    every layout at once (overlapping windows, odd tiles, alignments)."""
    mappings = [mapping_for(layout, seed=11 + i) for i, layout in enumerate(LAYOUTS)]
    size = max(m.window_start + m.window_size for m in mappings) + 3  # a few slots no site lands on
    gen = torch.Generator().manual_seed(4)
    views = [torch.randn(m.rows, m.cols, dtype=torch.float64, generator=gen) for m in mappings]
    scales = [0.1 + 0.2 * i for i in range(len(mappings))]
    torch.testing.assert_close(runs.project(views, mappings, scales, size),
                               reference.project(views, mappings, scales, size), rtol=1e-12, atol=1e-14)
    load = reference.slot_load(mappings, size)
    baseline = torch.randn(size, dtype=torch.float64, generator=gen)
    written = [1, 4]
    args = ([views[i] for i in written], [mappings[i] for i in written], [scales[i] for i in written])
    torch.testing.assert_close(runs.project_write(baseline, load, *args),
                               reference.project_write(baseline, load, *args), rtol=1e-12, atol=1e-14)
