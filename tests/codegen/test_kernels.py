"""The Triton kernels against the PyTorch reference path (codegen/reference.py), in float64."""
import random
from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl

from roastfx.codegen import configs, reference
from roastfx.codegen.hashing import PRIME, TileHash
from roastfx.codegen.kernels import (
    apply_activation, roast_embedding, roast_embedding_bag, roast_linear, roast_materialize,
)
from roastfx.codegen.triton_embedding import gather_rows
from roastfx.codegen.triton_hashing import _mod, offset_magic
from roastfx.codegen.triton_materialize import materialize
from roastfx.codegen.triton_matmul import roast_grad_memory, roast_grad_memory_sumsq, roast_matmul

# (tile_rows, tile_cols, alignment, window_start): tiles that divide no block, straddle blocks, are one row or column
TILINGS = [(8, 16, 4, 64), (5, 3, 1, 7), (1, 32, 32, 0), (7, 1, 2, 30)]


def random_mapping(rows, cols, tile_rows, tile_cols, alignment=1, window_start=0, window_size=None, seed=0):
    rng = random.Random(seed)
    span = tile_rows * tile_cols
    return TileHash(
        rows=rows, cols=cols, tile_rows=tile_rows, tile_cols=tile_cols, alignment=alignment,
        window_start=window_start, window_size=window_size or span + rng.randrange(50, 400),
        a_row=rng.randrange(1, PRIME), a_col=rng.randrange(1, PRIME), b=rng.randrange(PRIME),
        c_row=rng.randrange(1, PRIME), c_col=rng.randrange(1, PRIME), d=rng.randrange(PRIME),
    )


def random_memory(mapping, seed=0, extra=13):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(mapping.window_start + mapping.window_size + extra, generator=gen, dtype=torch.float64)


def reference_linear(x, memory, mapping, scale, transposed_view, bias=None, activation=None, residual=None):
    view = reference.materialize(memory, mapping, scale)
    z = x @ (view if transposed_view else view.t())
    if bias is not None:
        z = z + bias
    y = apply_activation(z, activation)
    return y + residual if residual is not None else y


def randn(*shape, seed, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)


# -- the mapping inside a kernel -------------------------------------------------------------
@pytest.mark.parametrize("tiling", TILINGS + [(3, 40, 8, 16)])
def test_materialize_kernel_reads_exactly_the_reference_slots(tiling, device):
    mapping = random_mapping(45, 70, *tiling, seed=hash(tiling) % 1000)
    memory = random_memory(mapping).float().to(device)
    got = materialize(memory, mapping, 0.37)
    want = reference.materialize(memory, mapping, 0.37)
    assert torch.equal(got, want)


def test_gather_handles_ids_beyond_int32_products(device):
    # ids near 2**31 make every hash product need int64
    mapping = random_mapping(PRIME - 1, 40, 4, 8, alignment=8, window_start=8, seed=3)
    memory = random_memory(mapping).float().to(device)
    ids = torch.tensor([[0, PRIME - 2, 2**31 - 100], [12345678, 5, PRIME - 3]], device=device)
    got = gather_rows(memory, mapping, 1.5, ids)
    assert got.shape == (2, 3, 40)
    assert torch.equal(got, reference.materialize_rows(memory, mapping, 1.5, ids))


def test_results_do_not_depend_on_block_sizes(device):
    mapping = random_mapping(45, 70, 5, 3, seed=4)
    memory = random_memory(mapping).float().to(device)
    x = randn(37, 45, seed=1, device=device)
    small, _ = roast_matmul(x, memory, mapping, 0.5, True, config=configs.BlockConfig(32, 32, 32, 1, 1))
    large, _ = roast_matmul(x, memory, mapping, 0.5, True, config=configs.BlockConfig(64, 32, 64, 1, 1))
    torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-5)


# the GEMM main loop computes a tile's start once per free index when its B blocks hold whole hash tiles along
# the reduction (1, 2 or 4 of them) or lie inside one; other tilings hash each element. With 32-row blocks:
BLOCK_TILINGS = [
    (32, 32, 32, 0),   # one tile per block, either way
    (16, 32, 16, 48),  # two tiles along a view-rows reduction, one along a view-columns one
    (8, 64, 8, 8),     # four tiles / inside one (64 columns, 32-column blocks)
    (64, 16, 4, 20),   # inside one tile (64 rows) / two tiles
    (2, 4, 1, 3),      # 16 and 8 tiles per block: hashed per element
    (24, 8, 8, 16),    # 24 divides no 32-row block, nor does 32 divide 24: per element
]


def test_block_split_says_how_blocks_meet_the_tiles_along_the_reduction():
    from roastfx.codegen.triton_hashing import block_split

    def split(tile_rows, tile_cols, view_is_b, block_r, step=0):
        return block_split(random_mapping(500, 500, tile_rows, tile_cols), view_is_b, block_r, step)

    assert split(32, 8, True, 32) == 1 and split(16, 8, True, 64) == 4 and split(8, 16, False, 32) == 2
    assert split(8, 8, True, 64) == -1  # 8 tiles per block: more starts than a block computes once
    assert split(64, 8, True, 32) == 0 and split(8, 128, False, 64) == 0  # inside one tile
    assert split(24, 8, True, 32) == -1 and split(8, 24, False, 32) == -1  # neither divides the other
    # a grouped conv's dX: group g's reduction starts at g * step
    assert split(16, 8, True, 32, step=48) == 2 and split(16, 8, True, 32, step=40) == -1
    assert split(64, 8, True, 32, step=96) == 0 and split(64, 8, True, 32, step=80) == -1


@pytest.mark.parametrize("tiling", BLOCK_TILINGS)
@pytest.mark.parametrize("view_is_b", [True, False])
@pytest.mark.parametrize("memory_dtype", [torch.float32, torch.float16])
def test_gemm_blocks_read_the_reference_slots_and_signs(tiling, view_is_b, memory_dtype, device):
    # x = identity: the product is the B operand itself, every element one slot read once and signed, so a
    # wrong slot or sign shows as a wrong element (fp32 products of one nonzero term are exact)
    rows, cols = 96, 80
    mapping = random_mapping(rows, cols, *tiling, window_size=tiling[0] * tiling[1] + 211, seed=sum(tiling))
    memory = random_memory(mapping, seed=5).to(memory_dtype).float()
    R = rows if view_is_b else cols
    eye = torch.eye(R, dtype=torch.float32, device=device)
    got, _ = roast_matmul(eye, memory.to(device, memory_dtype), mapping, 1.0, view_is_b,
                          config=configs.BlockConfig(32, 32, 32, 1, 1))
    view = reference.materialize(memory, mapping, 1.0)
    assert torch.equal(got.cpu(), view if view_is_b else view.t())


# -- forward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("transposed_view", [True, False])
def test_linear_forward_matches_reference(tiling, transposed_view, device):
    K, N = 45, 70
    rows, cols = (K, N) if transposed_view else (N, K)
    mapping = random_mapping(rows, cols, *tiling, seed=7)
    memory = random_memory(mapping, seed=1)
    x = randn(37, K, seed=2, dtype=torch.float64)
    got = roast_linear(x.float().to(device), memory.float().to(device), mapping, 0.3, transposed_view)
    want = reference_linear(x, memory, mapping, 0.3, transposed_view)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [0.3, 60.0])  # 60: pre-activations far into both tails
@pytest.mark.parametrize("activation", [None, "relu", "gelu_tanh", "silu"])
def test_linear_epilogue_matches_reference(activation, scale, device):
    mapping = random_mapping(45, 70, 8, 16, alignment=4, window_start=64, seed=11)
    memory = random_memory(mapping, seed=2)
    x = randn(2, 3, 45, seed=3, dtype=torch.float64)  # leading dims are flattened
    bias = randn(70, seed=4, dtype=torch.float64)
    residual = randn(3, 70, seed=5, dtype=torch.float64)  # broadcasts over the first dim
    args = dict(bias=bias, activation=activation, residual=residual)
    got = roast_linear(x.float().to(device), memory.float().to(device), mapping, scale, True,
                       **{k: (v.float().to(device) if torch.is_tensor(v) else v) for k, v in args.items()})
    want = reference_linear(x, memory, mapping, scale, True, **args)
    assert got.shape == (2, 3, 70)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision_inputs_accumulate_in_fp32(dtype, device):
    mapping = random_mapping(64, 40, 8, 16, seed=12)
    memory = random_memory(mapping, seed=3)
    x = randn(33, 64, seed=6, dtype=torch.float64)
    got = roast_linear(x.to(device, dtype), memory.float().to(device), mapping, 0.1, True, activation="silu")
    assert got.dtype == dtype
    want = reference_linear(x.to(dtype).double(), memory.to(dtype).double(), mapping, 0.1, True, activation="silu")
    torch.testing.assert_close(got.double().cpu(), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("split_k", [2, 3, 40])  # 40: more splits than the reduction has blocks
@pytest.mark.parametrize("view_is_b,tiling", [(True, (16, 8, 4, 8)), (False, (5, 3, 1, 7)), (True, (64, 32, 32, 0))])
def test_split_k_matches_reference_with_every_epilogue_part(split_k, view_is_b, tiling, device):
    # each output block's reduction shared by split_k programs, partial sums added after, then bias,
    # pre-activation, activation and residual as the fused kernel applies them
    K, N = 131, 70  # 131: 5 blocks of 32, the last one partly past the end
    rows, cols = (K, N) if view_is_b else (N, K)
    mapping = random_mapping(rows, cols, *tiling, seed=17)
    memory = random_memory(mapping, seed=18)
    x, bias, residual = randn(19, K, seed=19, dtype=torch.float64), randn(N, seed=20, dtype=torch.float64), \
        randn(19, N, seed=21, dtype=torch.float64)
    got, pre = roast_matmul(x.float().to(device), memory.float().to(device), mapping, 0.4, view_is_b,
                            bias.float().to(device), "gelu_tanh", residual.float().to(device), store_pre=True,
                            config=configs.BlockConfig(32, 32, 32, 1, 1), split_k=split_k)
    want = reference_linear(x, memory, mapping, 0.4, view_is_b, bias, "gelu_tanh", residual)
    want_pre = reference_linear(x, memory, mapping, 0.4, view_is_b, bias)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pre.double().cpu(), want_pre, rtol=1e-4, atol=1e-4)


def test_split_reduction_splits_only_thin_launches(monkeypatch):
    from roastfx.codegen.triton_matmul import split_reduction

    cfg = configs.BlockConfig(32, 64, 64)
    assert split_reduction(16, 8192, 8192, cfg, "cpu") == (1, 8192)  # off CUDA: none unless asked
    assert split_reduction(16, 8192, 8192, cfg, "cpu", split_k=4) == (4, 2048)
    assert split_reduction(16, 100, 130, cfg, "cpu", split_k=4) == (3, 64)  # 3 blocks: at most 3 splits
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        split_reduction(16, 100, 130, cfg, "cpu", split_k=0)
    monkeypatch.setenv("ROASTFX_SPLIT_K", "2")
    assert split_reduction(16, 8192, 8192, cfg, "cpu") == (2, 4096)
    monkeypatch.setenv("ROASTFX_SPLIT_K", "many")
    with pytest.raises(ValueError, match="ROASTFX_SPLIT_K='many'"):
        split_reduction(16, 8192, 8192, cfg, "cpu")
    monkeypatch.delenv("ROASTFX_SPLIT_K")
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "multiprocessors", lambda device: 132)
    # a decode step on an H100: 128 programs for 132 SMs, so 3 splits of 43 blocks (2 programs per SM)
    assert split_reduction(16, 8192, 8192, cfg, "cuda") == (3, 43 * 64)
    assert split_reduction(4096, 4096, 4096, cfg, "cuda") == (1, 4096)  # 8,192 programs: none
    assert split_reduction(16, 768, 256, cfg, "cuda") == (1, 256)  # 4 blocks: too few to split


# -- backward --------------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("transposed_view,activation,tiling", [
    (True, "gelu_tanh", (8, 16, 4, 64)),
    (False, None, (5, 3, 1, 7)),
    (True, "relu", (1, 32, 32, 0)),
])
def test_linear_gradients_match_reference(deterministic, transposed_view, activation, tiling, device,
                                          deterministic_mode):
    K, N = 45, 70
    rows, cols = (K, N) if transposed_view else (N, K)
    mapping = random_mapping(rows, cols, *tiling, seed=21)
    memory = random_memory(mapping, seed=4)
    x, bias, residual = randn(37, K, seed=7), randn(N, seed=8), randn(37, N, seed=9)
    grad_y = randn(37, N, seed=10)

    deterministic_mode(deterministic)
    leaves = [t.detach().float().to(device).clone().requires_grad_() for t in (x, memory, bias, residual)]
    roast_linear(leaves[0], leaves[1], mapping, 0.3, transposed_view, leaves[2], activation, leaves[3]).backward(
        grad_y.to(device))
    deterministic_mode(False)
    ref = [t.detach().double().clone().requires_grad_() for t in (x, memory, bias, residual)]
    reference_linear(ref[0], ref[1], mapping, 0.3, transposed_view, ref[2], activation, ref[3]).backward(grad_y.double())

    for name, got, want in zip(["x", "memory", "bias", "residual"], leaves, ref):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("tiling", [(32, 32), (8, 16), (5, 3)])
def test_signs_where_the_sum_lands_on_a_multiple_of_65536_below_p(tiling, device):
    # the kernels take (u + v) mod P as s = u + v - P in int32 and its bits below 31 as those of s - 1 where
    # s < 0: the "- 1" changes bit 16 only when s's low 16 bits are all zero, once in 65,536 random elements.
    # d = P - 65536 puts element (0, 0) there (u = v - d = 0, s = -65536)
    mapping = replace(random_mapping(40, 48, *tiling, window_size=tiling[0] * tiling[1] + 100, seed=3),
                      d=PRIME - 65536)
    memory = random_memory(mapping, seed=9).float()
    view = reference.materialize(memory.double(), mapping, 1.0)
    assert mapping.sign(torch.tensor(0), torch.tensor(0)) == 1  # bit 16 of P - 65536 = 0x7ffeffff is 0
    for view_is_b in (True, False):
        eye = torch.eye(40 if view_is_b else 48, device=device)
        got, _ = roast_matmul(eye, memory.to(device), mapping, 1.0, view_is_b, config=configs.BlockConfig(32, 32, 32, 1, 1))
        assert torch.equal(got.double().cpu(), view if view_is_b else view.t())
    ids = torch.tensor([0, 5, 0], device=device)
    assert torch.equal(gather_rows(memory.to(device), mapping, 1.0, ids).double().cpu(), view[[0, 5, 0]])
    assert torch.equal(materialize(memory.to(device), mapping, 1.0).double().cpu(), view)


@triton.jit
def _mod_kernel(h_ptr, out_ptr, n, offset_range, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, _mod(h, offset_range, offset_magic(offset_range)), mask=mask)


@pytest.mark.parametrize("offset_range", [1, 2, 3, 7, 64, 65, 1 << 20, (1 << 20) + 1, 123456789, (1 << 30) + 1,
                                          PRIME - 1, PRIME])
def test_tile_start_reduction_without_division_equals_the_remainder(offset_range, device):
    # the GEMM main loop reduces a tile's hash mod offset_range by a high multiply and a shift (offset_magic);
    # every hash is below P: the extremes, multiples of d and their neighbours, random ones
    gen = torch.Generator().manual_seed(offset_range % 1000)
    d = offset_range
    h = torch.cat([torch.arange(0, 300), PRIME - 1 - torch.arange(0, 300),
                   torch.arange(1, 200) * d, torch.arange(1, 200) * d - 1, torch.arange(1, 200) * d + 1,
                   torch.randint(0, PRIME, (4000,), generator=gen)])
    h = h[(h >= 0) & (h < PRIME)].to(torch.int32)
    out = torch.empty_like(h)
    _mod_kernel[(triton.cdiv(h.numel(), 1024),)](h.to(device), out.to(device) if device != "cpu" else out,
                                                 h.numel(), d, BLOCK=1024)
    if device != "cpu":
        out = out.cpu()
    assert torch.equal(out.long(), h.long() % d)


@pytest.mark.parametrize("offset_range", [1, 2, 256, 257])
def test_gemm_reads_the_reference_slots_at_degenerate_and_power_of_two_offset_ranges(offset_range, device):
    # offset_range 1: every tile starts at the window's start (the window holds one tile); powers of two and
    # their neighbours: the reduction's shift at its edges
    for view_is_b, tiling in ((True, (16, 32, 16, 48)), (False, (8, 64, 8, 8))):
        mapping = random_mapping(96, 64, *tiling[:2], alignment=1, window_start=tiling[3],
                                 window_size=tiling[0] * tiling[1] + offset_range - 1, seed=offset_range)
        assert mapping.offset_range == offset_range
        memory = random_memory(mapping, seed=7).float()
        eye = torch.eye(96 if view_is_b else 64, device=device)
        got, _ = roast_matmul(eye, memory.to(device), mapping, 1.0, view_is_b,
                              config=configs.BlockConfig(32, 32, 32, 1, 1))
        view = reference.materialize(memory.double(), mapping, 1.0)
        assert torch.equal(got.double().cpu(), view if view_is_b else view.t())


@pytest.mark.parametrize("tiling", BLOCK_TILINGS)
@pytest.mark.parametrize("deterministic,chunk_elements", [(False, 1 << 24), (True, 1 << 24), (True, 2000)])
def test_memory_gradient_blocks_send_each_element_to_its_slot(tiling, deterministic, chunk_elements, device,
                                                             monkeypatch):
    # dMemory for dV = a^T c at each block/tile relation, atomics and the deterministic path in one or in
    # 32-row chunks (2000 elements), against autograd through the float64 oracle
    monkeypatch.setattr("roastfx.codegen.triton_matmul.DETERMINISTIC_CHUNK_ELEMENTS", chunk_elements)
    rows, cols = 96, 80
    mapping = random_mapping(rows, cols, *tiling, window_size=tiling[0] * tiling[1] + 211, seed=sum(tiling))
    memory = random_memory(mapping, seed=6)
    a, c = randn(37, rows, seed=13, dtype=torch.float64), randn(37, cols, seed=14, dtype=torch.float64)
    got = roast_grad_memory(a.float().to(device), c.float().to(device), memory.numel(), mapping, 0.6, deterministic,
                            config=configs.BlockConfig(32, 32, 32, 1, 1))
    leaf = memory.clone().requires_grad_()
    (reference.materialize(leaf, mapping, 0.6) * (a.t() @ c)).sum().backward()
    torch.testing.assert_close(got.double().cpu(), leaf.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 2000])  # 2000: one 32-row chunk at a time
def test_deterministic_memory_gradient_is_reproducible_and_equals_atomic(chunk_elements, device, monkeypatch):
    monkeypatch.setattr("roastfx.codegen.triton_matmul.DETERMINISTIC_CHUNK_ELEMENTS", chunk_elements)
    mapping = random_mapping(45, 70, 4, 4, window_size=40, seed=5)  # small window: many collisions per slot
    a, c = randn(37, 45, seed=11, device=device), randn(37, 70, seed=12, device=device)
    first = roast_grad_memory(a, c, 60, mapping, 0.7, deterministic=True)
    second = roast_grad_memory(a, c, 60, mapping, 0.7, deterministic=True)
    atomic = roast_grad_memory(a, c, 60, mapping, 0.7, deterministic=False)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, atomic, rtol=1e-5, atol=1e-5)
    assert first[mapping.window_start + mapping.window_size:].abs().sum() == 0


@pytest.mark.parametrize("deterministic,chunk_elements", [(False, 1 << 24), (True, 1 << 24), (True, 2000)])
@pytest.mark.parametrize("tiling", [(5, 3, 1, 7), (8, 16, 4, 64)])
def test_grad_memory_sum_of_squares_matches_torch(deterministic, chunk_elements, tiling, device, monkeypatch):
    """grad_scaling="site": the kernel's sum of dV^2 (per-program partials, over every chunk) equals
    torch's on the explicit dV = a^T c, and the memory gradient is roast_grad_memory's."""
    monkeypatch.setattr("roastfx.codegen.triton_matmul.DETERMINISTIC_CHUNK_ELEMENTS", chunk_elements)
    mapping = random_mapping(45, 70, *tiling, seed=6)
    a, c = randn(37, 45, seed=13, device=device), randn(37, 70, seed=14, device=device) * 1e3
    size = mapping.window_start + mapping.window_size
    grad, sumsq = roast_grad_memory_sumsq(a, c, size, mapping, 0.7, deterministic=deterministic)
    want = (a.double().t() @ c.double()).square().sum()
    assert sumsq.dtype == torch.float64 and sumsq.shape == ()
    torch.testing.assert_close(sumsq.cpu(), want.cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, roast_grad_memory(a, c, size, mapping, 0.7, deterministic=deterministic))
    empty = roast_grad_memory_sumsq(a[:0], c[:0], size, mapping, 0.7, deterministic=deterministic)[1]
    assert float(empty) == 0


# -- embeddings and materialize --------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
def test_embedding_and_its_gradient_match_reference(deterministic, device, deterministic_mode):
    mapping = random_mapping(50, 40, 1, 8, alignment=8, window_start=16, seed=31)
    memory = random_memory(mapping, seed=5)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    grad_out = randn(3, 7, 40, seed=13)

    deterministic_mode(deterministic)
    mem = memory.float().to(device).requires_grad_()
    out = roast_embedding(ids.to(device), mem, mapping, 0.2)
    out.backward(grad_out.to(device))
    deterministic_mode(False)
    ref_mem = memory.clone().requires_grad_()
    want = reference.materialize_rows(ref_mem, mapping, 0.2, ids)
    want.backward(grad_out.double())

    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mem.grad.double().cpu(), ref_mem.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_with_offsets_matches_reference(mode, device):
    mapping = random_mapping(40, 24, 3, 5, seed=34)
    memory = random_memory(mapping, seed=11)
    ids = torch.randint(0, 40, (11,), generator=torch.Generator().manual_seed(2))
    offsets = torch.tensor([0, 3, 3, 7])  # the second bag is empty
    weights = randn(11, seed=22, dtype=torch.float64) if mode == "sum" else None
    mem = memory.float().to(device).requires_grad_()
    got = roast_embedding_bag(ids.to(device), mem, mapping, 0.9, mode, offsets=offsets.to(device),
                              per_sample_weights=weights.float().to(device) if weights is not None else None)
    ref_mem = memory.clone().requires_grad_()
    want = torch.nn.functional.embedding_bag(ids, reference.materialize(ref_mem, mapping, 0.9), offsets,
                                             mode=mode, per_sample_weights=weights)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(mem.grad.double().cpu(), ref_mem.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_matches_reference(mode, device):
    mapping = random_mapping(40, 24, 3, 5, seed=32)
    memory = random_memory(mapping, seed=6)
    ids = torch.randint(0, 40, (5, 4), generator=torch.Generator().manual_seed(1))
    got = roast_embedding_bag(ids.to(device), memory.float().to(device), mapping, 0.9, mode)
    view = reference.materialize(memory, mapping, 0.9)
    want = torch.nn.functional.embedding_bag(ids, view, mode=mode)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_materialize_gradient_reaches_memory(device):
    mapping = random_mapping(33, 35, 8, 16, alignment=4, window_start=4, seed=33)
    memory = random_memory(mapping, seed=7)
    grad_view = randn(33, 35, seed=14)
    mem = memory.float().to(device).requires_grad_()
    roast_materialize(mem, mapping, 0.4).backward(grad_view.to(device))
    ref_mem = memory.clone().requires_grad_()
    reference.materialize(ref_mem, mapping, 0.4).backward(grad_view.double())
    torch.testing.assert_close(mem.grad.double().cpu(), ref_mem.grad, rtol=1e-5, atol=1e-5)


# -- errors and configs ----------------------------------------------------------------------
def test_errors_name_the_bad_value(device):
    mapping = random_mapping(45, 70, 8, 16, seed=1)
    memory = random_memory(mapping).float().to(device)
    x = torch.zeros(4, 45, device=device)
    with pytest.raises(ValueError, match="'tanh'"):
        roast_linear(x, memory, mapping, 1.0, True, activation="tanh")
    with pytest.raises(ValueError, match="44 features"):
        roast_linear(x[:, :44], memory, mapping, 1.0, True)
    with pytest.raises(TypeError, match="float64"):
        roast_linear(x.double(), memory, mapping, 1.0, True)
    with pytest.raises(IndexError, match=r"\[0, 45\)"):
        roast_embedding(torch.tensor([3, 45], device=device), memory, mapping, 1.0)


def test_a_memory_beyond_32_bit_slots_is_refused_before_any_launch():
    from roastfx.codegen.triton_hashing import hash_args

    mapping = replace(random_mapping(4, 4, 2, 2, seed=1), window_start=2**31 - 64, window_size=64)
    assert hash_args(mapping)  # its last slot, 2**31 - 1, is the last one a kernel can address
    with pytest.raises(ValueError, match="last memory slot is 2147483648 is beyond the Triton kernels' 32-bit"):
        hash_args(replace(mapping, window_size=65))


def test_configs_are_pruned_by_shared_memory():
    everything = configs.candidates(10**9)
    assert everything == [c for c in configs.CANDIDATES if not c.min_arch]  # no architecture: none of sm_90's
    assert configs.candidates(10**9, arch=90) == list(configs.CANDIDATES)
    from roastfx.profiles import PROFILES
    assert any(c.min_arch == 90 for c in configs.candidates(PROFILES["h100"], 2))
    assert not any(c.min_arch for c in configs.candidates(PROFILES["a100"], 2) + configs.candidates(10**9, arch=89))
    assert all(min(c.block_m, c.block_n, c.block_k) >= configs.MIN_BLOCK for c in everything)
    fitting = configs.candidates(48 * 1024, element_size=2)
    assert fitting and all(c.shared_memory(2) <= 48 * 1024 for c in fitting)
    assert len(fitting) < len(everything)
    with pytest.raises(ValueError, match="1000 bytes"):
        configs.candidates(1000)


def test_bf16_gradients_reach_x_and_a_bf16_memory(device):
    mapping = random_mapping(45, 70, 8, 16, alignment=4, window_start=64, seed=41)
    memory = random_memory(mapping, seed=8).bfloat16()
    x, grad_y = randn(37, 45, seed=15).bfloat16(), randn(37, 70, seed=16).bfloat16()
    x_k, mem_k = x.to(device).clone().requires_grad_(), memory.to(device).clone().requires_grad_()
    y = roast_linear(x_k, mem_k, mapping, 0.3, True, activation="relu")
    y.backward(grad_y.to(device))
    assert y.dtype == x_k.grad.dtype == mem_k.grad.dtype == torch.bfloat16
    x_r, mem_r = x.double().requires_grad_(), memory.double().requires_grad_()
    reference_linear(x_r, mem_r, mapping, 0.3, True, activation="relu").backward(grad_y.double())
    torch.testing.assert_close(x_k.grad.double().cpu(), x_r.grad, rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(mem_k.grad.double().cpu(), mem_r.grad, rtol=3e-2, atol=2e-1)


def test_kernels_are_dumped_when_asked(device, tmp_path, monkeypatch):
    monkeypatch.setenv("ROASTFX_DUMP_KERNELS", str(tmp_path))
    monkeypatch.setattr("roastfx.codegen.triton_hashing._dumped", set())
    mapping = random_mapping(33, 40, 4, 8, seed=2)
    materialize(random_memory(mapping).float().to(device), mapping, 1.0)
    assert any(p.name.startswith("materialize_kernel") for p in tmp_path.iterdir())


# -- torch.library registration ----------------------------------------------------------------
def test_ops_pass_opcheck(device):
    from roastfx.codegen.kernels import mapping_to_list

    mapping = random_mapping(45, 40, 5, 3, seed=51)
    memory = random_memory(mapping).float().to(device).requires_grad_()
    x = randn(2, 3, 45, seed=17, device=device).requires_grad_()
    bias = randn(40, seed=18, device=device).requires_grad_()
    m = mapping_to_list(mapping)
    torch.library.opcheck(torch.ops.roastfx.linear.default, (x, memory, bias, None, m, 0.5, True, "silu", True))
    grad_z = randn(6, 40, seed=23, device=device)
    # the gradient ops have no derivative of their own (no double backward)
    torch.library.opcheck(torch.ops.roastfx.linear_grad_input.default, (grad_z, memory.detach(), m, 0.5, True))
    torch.library.opcheck(torch.ops.roastfx.linear_grad_memory.default,
                          (x.detach().reshape(6, 45), grad_z, memory.detach(), m, 0.5, True))
    torch.library.opcheck(torch.ops.roastfx.linear_grad_memory_sumsq.default,
                          (x.detach().reshape(6, 45), grad_z, memory.detach(), m, 0.5, True))
    ids = torch.randint(0, 45, (4, 3), device=device)
    torch.library.opcheck(torch.ops.roastfx.gather_rows.default, (memory, ids, m, 0.5, None))
    torch.library.opcheck(torch.ops.roastfx.gather_rows.default, (memory, None, m, 0.5, None))


def test_linear_compiles_with_aot_autograd(device):
    mapping = random_mapping(45, 40, 8, 16, seed=52)
    memory = random_memory(mapping, seed=9).float().to(device).requires_grad_()
    x = randn(6, 45, seed=19, device=device)

    def step(x, memory):
        return roast_linear(x, memory, mapping, 0.5, True, activation="gelu_tanh").square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, memory), memory)[0]
    want = torch.autograd.grad(step(x, memory), memory)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pick_chooses_a_fitting_config_for_every_shape(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    limit = 100 * 1024
    for m, n, k in [(16, 8192, 8192), (4096, 4096, 4096), (4096, 768, 3072), (1, 1, 1)]:
        cfg = configs.pick(m, n, k, limit, element_size=2)
        assert cfg in configs.candidates(limit, element_size=2)


def test_strided_and_empty_inputs(device):
    mapping = random_mapping(45, 70, 8, 16, seed=61)
    memory = random_memory(mapping, seed=10)
    x = randn(45, 37, seed=20, dtype=torch.float64).t()  # non-contiguous (37, 45)
    residual = randn(70, 37, seed=21, dtype=torch.float64).t()
    got = roast_linear(x.float().to(device), memory.float().to(device), mapping, 0.3, True,
                       residual=residual.float().to(device))
    want = reference_linear(x, memory, mapping, 0.3, True, residual=residual)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)

    mem = memory.float().to(device).requires_grad_()
    empty = torch.zeros(0, 45, device=device, requires_grad=True)
    y = roast_linear(empty, mem, mapping, 0.3, True, activation="relu")
    assert y.shape == (0, 70)
    y.sum().backward()
    assert empty.grad.shape == (0, 45) and mem.grad.abs().sum() == 0
