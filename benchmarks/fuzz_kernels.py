"""Differential fuzz of the Triton kernels against the float64 oracle (codegen/reference.py).

    python benchmarks/fuzz_kernels.py --cases 200            # CPU: Triton interpreter
    ROASTFX_TEST_CUDA=1 python benchmarks/fuzz_kernels.py    # a GPU

Each case draws a random view shape, hash tile (powers of two, which the GEMM blocks meet
as 1, 2 or 4 whole tiles or from inside one, and odd sizes that straddle blocks), alignment,
window, hash constants, block config and memory dtype, and checks against float64 autograd
through reference.materialize: the forward GEMM (view read as B or transposed), dX, dMemory
(atomics and the deterministic path, in row chunks), a grouped conv's forward, dX and dMemory (half of
them with the view's rows scaled, as weight norm per kernel tap has them, and that scale's gradient)
(group sizes on and off tile boundaries), an embedding lookup and its gradient, and a mixture of experts'
grouped GEMM (forward, dX, dMemory and its sum of squares; empty groups, rows past the last). Prints one
line per failure and a summary; exits 1 if any case failed. Not a timed benchmark: a check
for changes to the mapping's kernel arithmetic, too slow (minutes) for the test suite.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
from dataclasses import replace

if not os.environ.get("ROASTFX_TEST_CUDA"):
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before roastfx imports them

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from roastfx.codegen import configs, reference  # noqa: E402
from roastfx.codegen.hashing import PRIME, TileHash  # noqa: E402
from roastfx.codegen.triton_conv import (roast_conv_forward, roast_conv_grad_input, roast_conv_grad_memory,  # noqa: E402
                                         roast_conv_row_scaled_grad_memory)
from roastfx.codegen.triton_embedding import gather_rows, scatter_rows_grad  # noqa: E402
from roastfx.codegen.triton_grouped import roast_grouped_grad_memory, roast_grouped_matmul  # noqa: E402
from roastfx.codegen.triton_matmul import roast_grad_memory, roast_matmul  # noqa: E402

DEVICE = "cuda" if os.environ.get("ROASTFX_TEST_CUDA") else "cpu"
SIDES = (1, 2, 4, 8, 16, 32, 64, 3, 5, 12, 24)


def draw_mapping(rng: random.Random, rows: int, cols: int) -> TileHash:
    tk, tn = rng.choice(SIDES), rng.choice(SIDES)
    align = rng.choice([1, 2, 4, 8, 16, 32])
    start = align * rng.randrange(0, 8)
    window = tk * tn + rng.randrange(1, 600)
    # d = P - 65536: element (0, 0)'s sign sum lands where the int32 sign arithmetic's borrow matters
    d = PRIME - 65536 if rng.random() < 0.2 else rng.randrange(PRIME)
    return TileHash(rows, cols, tk, tn, align, start, window, rng.randrange(1, PRIME), rng.randrange(1, PRIME),
                    rng.randrange(PRIME), rng.randrange(1, PRIME), rng.randrange(1, PRIME), d)


def draw_config(rng: random.Random) -> configs.BlockConfig:
    if DEVICE == "cpu":  # the interpreter: one warp, one stage, blocks >= 32
        return configs.BlockConfig(rng.choice([32, 64]), rng.choice([32, 64]), rng.choice([32, 64]), 1, 1)
    return rng.choice([c for c in configs.CANDIDATES if c.min_arch <= configs.cuda_arch(DEVICE)])


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def close(got, want, tol):
    got = got.double().cpu()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    return err <= tol * max(1.0, want.abs().max().item() if want.numel() else 1.0), err


def case_gemm(rng, gen):
    rows, cols, m = rng.randrange(1, 130), rng.randrange(1, 130), rng.randrange(1, 70)
    mapping, view_is_b, cfg = draw_mapping(rng, rows, cols), rng.random() < 0.5, draw_config(rng)
    memory = randn(gen, mapping.window_start + mapping.window_size + rng.randrange(0, 9))
    mem_dtype = rng.choice([torch.float32, torch.float16])
    memory = memory.to(mem_dtype).double()
    x = randn(gen, m, rows if view_is_b else cols)
    want = x @ (reference.materialize(memory, mapping, 0.7) if view_is_b else reference.materialize(memory, mapping, 0.7).t())
    got, _ = roast_matmul(x.float().to(DEVICE), memory.to(DEVICE, mem_dtype), mapping, 0.7, view_is_b, config=cfg)
    ok, err = close(got, want, 1e-4)
    # dMemory for dV = a^T c (the view's rows from a, its columns from c), both reductions
    a, c = randn(gen, m, rows), randn(gen, m, cols)
    leaf = memory.clone().requires_grad_()
    (reference.materialize(leaf, mapping, 0.7) * (a.t() @ c)).sum().backward()
    results = [("forward", ok, err, mapping, cfg, view_is_b)]
    for deterministic in (False, True):
        got = roast_grad_memory(a.float().to(DEVICE), c.float().to(DEVICE), memory.numel(), mapping, 0.7,
                                deterministic, config=cfg)
        ok, err = close(got, leaf.grad, 1e-4)
        results.append((f"dMemory deterministic={deterministic}", ok, err, mapping, cfg, view_is_b))
    return results


def case_conv(rng, gen):
    groups = rng.choice([1, 1, 2, 3])
    cin, cout = groups * rng.randrange(1, 5), groups * rng.randrange(1, 9)
    kernel = (rng.randrange(1, 4), rng.randrange(1, 4))
    stride, padding, dilation = (rng.randrange(1, 3), rng.randrange(1, 3)), (rng.randrange(0, 3),) * 2, (1, rng.randrange(1, 3))
    hw = (rng.randrange(4, 10), rng.randrange(4, 10))
    if any(h + 2 * p < d * (k - 1) + 1 for h, p, d, k in zip(hw, padding, dilation, kernel)):
        return []  # no output pixel
    mapping = draw_mapping(rng, cin // groups * kernel[0] * kernel[1], cout)
    cfg = draw_config(rng)
    scaled = rng.random() < 0.5  # view rows scaled (weight norm inside the reduction)
    memory = randn(gen, mapping.window_start + mapping.window_size)
    x = randn(gen, 2, cin, *hw).requires_grad_()
    md = memory.clone().requires_grad_()
    rows = (randn(gen, mapping.rows).abs() + 0.25).requires_grad_()
    view = reference.materialize(md, mapping, 0.5) * (rows[:, None] if scaled else 1)
    weight = view.t().reshape(cout, cin // groups, *kernel)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    dy = randn(gen, *y.shape)
    y.backward(dy)
    kind, extra = ("row-scaled conv" if scaled else "conv"), groups
    row_scale = rows.detach().float().to(DEVICE) if scaled else None
    out = torch.empty(y.shape, device=DEVICE)
    roast_conv_forward(x.detach().float().to(DEVICE), memory.float().to(DEVICE), mapping, 0.5, out, kernel, stride,
                       padding, dilation, groups=groups, config=cfg, row_scale=row_scale)
    results = [(f"{kind} forward", *close(out, y.detach(), 1e-4), mapping, cfg, extra)]
    dx = torch.full(x.shape, float("nan"), device=DEVICE)
    roast_conv_grad_input(dy.float().to(DEVICE), memory.float().to(DEVICE), mapping, 0.5, dx, kernel, stride, padding,
                          dilation, groups=groups, config=cfg, row_scale=row_scale)
    results.append((f"{kind} dX", *close(dx, x.grad, 1e-4), mapping, cfg, extra))
    if scaled:
        deterministic = rng.random() < 0.5
        dm, drows = roast_conv_row_scaled_grad_memory(x.detach().float().to(DEVICE), dy.float().to(DEVICE),
                                                      memory.float().to(DEVICE), mapping, 0.5, row_scale, kernel,
                                                      stride, padding, dilation, groups=groups,
                                                      deterministic=deterministic, config=cfg)
        results.append((f"{kind} row scale grad", *close(drows, rows.grad, 1e-4), mapping, cfg, extra))
    else:
        dm, _ = roast_conv_grad_memory(x.detach().float().to(DEVICE), dy.float().to(DEVICE), memory.numel(), mapping,
                                       0.5, kernel, stride, padding, dilation, groups=groups, deterministic=False,
                                       config=cfg)
    results.append((f"{kind} dMemory", *close(dm, md.grad, 1e-4), mapping, cfg, extra))
    return results


def case_embedding(rng, gen):
    rows, cols = rng.randrange(1, 300), rng.randrange(1, 100)
    mapping = draw_mapping(rng, rows, cols)
    memory = randn(gen, mapping.window_start + mapping.window_size)
    ids = torch.randint(0, rows, (rng.randrange(1, 5), rng.randrange(1, 40)), generator=gen)
    leaf = memory.clone().requires_grad_()
    want = reference.materialize_rows(leaf, mapping, 1.3, ids)
    grad = randn(gen, *want.shape)
    want.backward(grad)
    got = gather_rows(memory.float().to(DEVICE), mapping, 1.3, ids.to(DEVICE))
    results = [("embedding", *close(got, want.detach(), 1e-5), mapping, None, None)]
    dm = scatter_rows_grad(grad.float().to(DEVICE), memory.numel(), mapping, 1.3, ids.to(DEVICE), deterministic=False)
    results.append(("embedding dMemory", *close(dm, leaf.grad, 1e-4), mapping, None, None))
    return results


def case_grouped(rng, gen):
    """A grouped GEMM (roast_grouped_mm's kernels): 1-6 groups of random sizes (empty ones, rows past the
    last), each group's columns whole tiles; forward or dX (either reading), and dMemory with its sum of
    squares."""
    groups, tn = rng.randrange(1, 7), rng.choice(SIDES)
    width, k, s = tn * rng.randrange(1, 5), rng.randrange(1, 90), rng.randrange(1, 120)
    drawn = draw_mapping(rng, k, groups * width)
    mapping = replace(drawn, tile_cols=tn, window_size=drawn.tile_rows * tn + rng.randrange(1, 600))
    view_is_b, cfg = rng.random() < 0.5, draw_config(rng)
    ends = sorted(rng.randrange(0, s + 1) for _ in range(groups))
    offs = torch.tensor(ends, dtype=torch.int32)
    memory = randn(gen, mapping.window_start + mapping.window_size)
    view = reference.materialize(memory, mapping, 0.6)
    x = randn(gen, s, k if view_is_b else width)
    want, start = torch.zeros(s, width if view_is_b else k, dtype=torch.float64), 0
    for g, end in enumerate(ends):
        block = view[:, g * width:(g + 1) * width]
        want[start:end] = x[start:end] @ (block if view_is_b else block.t())
        start = end
    got = roast_grouped_matmul(x.float().to(DEVICE), memory.float().to(DEVICE), offs.to(DEVICE), mapping, groups,
                               0.6, view_is_b, config=cfg)
    results = [("grouped forward" if view_is_b else "grouped dX", *close(got, want, 1e-4), mapping, cfg, ends)]
    a, c = randn(gen, s, k), randn(gen, s, width)
    grad_view, start = torch.zeros(k, groups * width, dtype=torch.float64), 0
    for g, end in enumerate(ends):
        grad_view[:, g * width:(g + 1) * width] = a[start:end].t() @ c[start:end]
        start = end
    leaf = memory.clone().requires_grad_()
    (reference.materialize(leaf, mapping, 0.6) * grad_view).sum().backward()
    dm, sumsq = roast_grouped_grad_memory(a.float().to(DEVICE), c.float().to(DEVICE), offs.to(DEVICE), memory.numel(),
                                          mapping, groups, 0.6, sumsq=True, config=cfg)
    results.append(("grouped dMemory", *close(dm, leaf.grad, 1e-4), mapping, cfg, ends))
    want_sumsq = grad_view.square().sum().reshape(1)
    results.append(("grouped sum of squares", *close(sumsq.reshape(1), want_sumsq, 1e-4), mapping, cfg, ends))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=200,
                   help="random cases (each of one kind: GEMM, conv, embedding, grouped GEMM)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cases < 1:
        p.error(f"--cases must be >= 1, got {args.cases}")
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    kinds = {"gemm": case_gemm, "conv": case_conv, "embedding": case_embedding, "grouped": case_grouped}
    checks = failures = 0
    kinds_run = collections.Counter()
    start = time.time()
    for i in range(args.cases):
        kind = rng.choice(["gemm", "gemm", "conv", "embedding", "grouped"])
        for name, ok, err, mapping, cfg, extra in kinds[kind](rng, gen):
            checks += 1
            kinds_run["row-scaled conv" if name.startswith("row-scaled") else kind] += 1
            if not ok:
                failures += 1
                print(f"FAIL case {i} {name}: max error {err:.3g}; {mapping}; {cfg}; {extra}", flush=True)
    print(f"{checks} checks in {args.cases} cases on {DEVICE} ({time.time() - start:.0f} s): {failures} failed; "
          f"checks by kind: {dict(sorted(kinds_run.items()))}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
