"""The mapping: documented formulas, determinism, independence from blocks and batch size."""
import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch

import roastfx
from roastfx.codegen.hashing import TileHash
from roastfx.codegen.reference import materialize
from helpers import MLP, Mixed, dense_weight_from_docs, materialize_from_docs, mixed_inputs


def random_hash(gen, rows, cols, tile, align, window_start, window_size):
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))
    return TileHash(rows, cols, tile[0], tile[1], align, window_start, window_size,
                    r(1, 2**31 - 1), r(1, 2**31 - 1), r(0, 2**31 - 1), r(1, 2**31 - 1), r(1, 2**31 - 1), r(0, 2**31 - 1))


@pytest.mark.parametrize("rows,cols,tile,align,start,window", [
    (37, 45, (8, 16), 4, 0, 500), (5, 70, (1, 32), 32, 64, 320), (33, 9, (5, 3), 1, 7, 100), (16, 16, (16, 16), 16, 0, 256),
])
def test_reference_matches_documented_formulas(rows, cols, tile, align, start, window):
    gen = torch.Generator().manual_seed(rows * cols)
    mapping = random_hash(gen, rows, cols, tile, align, start, window)
    memory = torch.randn(start + window + 3, generator=gen, dtype=torch.float64)
    got = materialize(memory, mapping, 0.37)
    assert torch.equal(got, materialize_from_docs(memory, mapping.to_dict(), 0.37))


def test_tiles_are_contiguous_aligned_runs_inside_their_window():
    gen = torch.Generator().manual_seed(3)
    m = random_hash(gen, 70, 90, (8, 16), 16, 32, 1000)
    index, _ = m.full_index()
    for i in range(m.grid[0]):
        for j in range(m.grid[1]):
            tile = index[i * 8:(i + 1) * 8, j * 16:(j + 1) * 16]
            start = int(tile[0, 0])
            assert start % 16 == 0 and 32 <= start and start + 8 * 16 <= 32 + 1000
            rr = torch.arange(tile.shape[0])[:, None] * 16 + torch.arange(tile.shape[1])[None, :]
            assert torch.equal(tile - start, rr)


@pytest.mark.parametrize("block", [(32, 32), (64, 32), (7, 13), (128, 128)])
def test_mapping_is_independent_of_kernel_block_size(block):
    gen = torch.Generator().manual_seed(5)
    m = random_hash(gen, 100, 75, (8, 16), 4, 0, 3000)
    full_index, full_sign = m.full_index()
    for k0 in range(0, m.rows, block[0]):
        for n0 in range(0, m.cols, block[1]):
            k = torch.arange(k0, min(k0 + block[0], m.rows))[:, None]
            n = torch.arange(n0, min(n0 + block[1], m.cols))[None, :]
            idx, sign = m.index_and_sign(k, n)
            assert torch.equal(idx, full_index[k0:k0 + block[0], n0:n0 + block[1]])
            assert torch.equal(sign, full_sign[k0:k0 + block[0], n0:n0 + block[1]])


def test_signs_are_balanced_and_offsets_spread():
    gen = torch.Generator().manual_seed(9)
    m = random_hash(gen, 512, 512, (1, 1), 1, 0, 4096)
    index, sign = m.full_index()
    assert abs(float(sign.double().mean())) < 0.02
    load = torch.bincount(index.reshape(-1), minlength=4096).double()
    assert load.std() / load.mean() < 0.2  # Poisson(64) spread is 0.125


def test_plan_independent_of_batch_size():
    a, b = Mixed(), Mixed()
    b.load_state_dict(a.state_dict())
    roastfx.compress(a, "4x", example_inputs=mixed_inputs(batch=2, seq=5))
    roastfx.compress(b, "4x", example_inputs=mixed_inputs(batch=7, seq=11))
    assert roastfx.roast_state(a).plan.to_json() == roastfx.roast_state(b).plan.to_json()


PLAN_DIGEST = textwrap.dedent("""
    import hashlib, torch, roastfx
    torch.manual_seed(int(__import__("sys").argv[1]))
    from helpers import MLP
    m = roastfx.compress(MLP(), "30x", seed=11, target="h100")
    plan = roastfx.roast_state(m).plan
    print(hashlib.sha256(repr((plan.memory_size, [s.mapping for s in plan.sites])).encode()).hexdigest())
""")


def test_mapping_identical_across_processes():
    """Same seed and model shapes -> bit-identical mapping, whatever the global RNG and hash seed
    (the scales follow the weights, which differ here on purpose)."""
    import os

    digests = set()
    for global_seed, hashseed in [(0, "1"), (123, "999")]:
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run([sys.executable, "-c", PLAN_DIGEST, str(global_seed)], capture_output=True, text=True,
                             env=env, cwd=os.path.dirname(__file__), check=True)
        digests.add(out.stdout.strip().splitlines()[-1])
    torch.manual_seed(42)
    here = roastfx.compress(MLP(), "30x", seed=11, target="h100")
    plan = roastfx.roast_state(here).plan
    digests.add(hashlib.sha256(repr((plan.memory_size, [s.mapping for s in plan.sites])).encode()).hexdigest())
    assert len(digests) == 1


def test_compress_does_not_touch_global_rng():
    model = MLP()
    state = torch.get_rng_state()
    roastfx.compress(model, "10x", init="random")
    assert torch.equal(torch.get_rng_state(), state)


def test_different_seeds_give_different_mappings():
    a = roastfx.compress(MLP(), "10x", seed=1)
    b = roastfx.compress(MLP(), "10x", seed=2)
    ma, mb = roastfx.roast_state(a).plan.sites[0].mapping, roastfx.roast_state(b).plan.sites[0].mapping
    assert not torch.equal(ma.full_index()[0], mb.full_index()[0])


def test_weights_equal_independent_materializer():
    model = Mixed()
    roastfx.compress(model, "3x", example_inputs=mixed_inputs(), init="random")
    state = roastfx.roast_state(model)
    for site in state.plan.sites:
        module_path, _, attr = site.bindings[0].rpartition(".")
        module = model.get_submodule(module_path)
        expected = dense_weight_from_docs(state.memory, site)
        assert torch.allclose(getattr(module, attr).double(), expected, rtol=1e-6, atol=1e-7), site.name


def test_mapping_crosses_op_boundaries_as_its_fields_in_order():
    gen = torch.Generator().manual_seed(4)
    m = random_hash(gen, 37, 45, (8, 16), 4, 0, 500)
    values = m.to_list()
    assert values == [m.rows, m.cols, m.tile_rows, m.tile_cols, m.alignment, m.window_start, m.window_size,
                      m.a_row, m.a_col, m.b, m.c_row, m.c_col, m.d]
    assert TileHash(*values) == m and all(type(v) is int for v in values)
