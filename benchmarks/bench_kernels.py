"""Time the fused ROAST linear kernel against dense and materializing baselines.

    python benchmarks/bench_kernels.py                 # CUDA: full table, JSON in benchmarks/results/
    python benchmarks/bench_kernels.py --dry-run       # CPU: tiny shapes in the Triton interpreter, checks wiring only

Methods, each computing y = x @ W^T for a (out, in) = (N, K) weight:
  dense      F.linear with a dense bf16 weight
  roast      the fused kernel: B tiles read straight from the memory (codegen.kernels.roast_linear), its
             reduction split over several programs where the output alone gives the GPU fewer programs than SMs
  roast-1    the same, never split (ROASTFX_SPLIT_K=1): beside roast at the small-batch shape
  roast-mat  the same ROAST mapping, materialized by a kernel, then F.linear
  hashednet  HashedNets style: per-element hash (1x1 tiles), materialize W with a kernel, then F.linear
  eager      the PyTorch reference path: gather W with torch indexing, then F.linear
  dense+gelu F.linear with a bias, then F.gelu(approximate="tanh")
  roast+gelu the same in one kernel: the fused GEMM with a generated bias + gelu_tanh epilogue
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_common_arguments, parse_common, print_timing_table, run_script,  # noqa: E402
                    time_forward_backward, timer)

DRY_RUN_SHAPES = {"tiny": (33, 64, 48)}
METHODS = ("dense", "roast", "roast-1", "roast-mat", "hashednet", "eager", "dense+gelu", "roast+gelu")
TILE_CHOICES = ((64, 64), (32, 64), (16, 64), (8, 64), (4, 64), (1, 64), (1, 32), (1, 8), (1, 1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    args = parse_common(p, argv, DRY_RUN_SHAPES)
    args.method_list = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in args.method_list):
        p.error(f"unknown method in {args.methods!r}; choose from {METHODS}")
    return args


def make_mapping(TileHash, rows, cols, memory_size, tile, seed):
    import random

    rng = random.Random(seed)
    P = 2**31 - 1
    return TileHash(
        rows=rows, cols=cols, tile_rows=tile[0], tile_cols=tile[1], alignment=1 if tile == (1, 1) else 8,
        window_start=0, window_size=memory_size,
        a_row=rng.randrange(1, P), a_col=rng.randrange(1, P), b=rng.randrange(P),
        c_row=rng.randrange(1, P), c_col=rng.randrange(1, P), d=rng.randrange(P),
    )


def pick_tile(memory_size, width=None):
    """The largest hash tile that leaves the window at least two tile spans (and, with ``width``, whose
    columns divide it: a grouped view's experts, each whole tiles)."""
    return next(t for t in TILE_CHOICES if 2 * t[0] * t[1] <= memory_size and (width is None or width % t[1] == 0))


def run(args, save=lambda rows: None):
    import torch
    import torch.nn.functional as F

    from roastfx.codegen import configs, reference, triton_matmul
    from roastfx.codegen.hashing import TileHash
    from roastfx.codegen.epilogue_op import roast_linear_epilogue
    from roastfx.codegen.kernels import roast_linear, roast_materialize

    device = "cpu" if args.dry_run else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bench = timer(args.dry_run, args.l2)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, (M, K, N) in args.shape_table.items():
        x = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
        dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
        dense_w = (torch.randn(N, K, device=device, dtype=dtype, generator=gen) / K**0.5)
        for factor in args.factors:
            size = max(int(K * N / factor), 2)
            tile = pick_tile(size)
            roast_map = make_mapping(TileHash, K, N, size, tile, seed=1)  # view = W^T (nn.Linear)
            hashed_map = make_mapping(TileHash, K, N, size, (1, 1), seed=2)
            memory = (torch.randn(size, device=device, dtype=dtype, generator=gen)).requires_grad_()
            scale = 1 / K**0.5
            # the forward's block config, as the kernel picks it without autotuning (benchmarks/sweep_configs.py
            # times every candidate)
            cfg = configs.INTERPRETER_CONFIG if args.dry_run else configs.pick(
                M, N, K, configs.shared_memory_limit(x.device), x.element_size(),
                triton_matmul.block_tile(roast_map, True), memory.element_size(), arch=configs.cuda_arch(x.device))
            forward_config = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
            dense_w_param = dense_w.clone().requires_grad_()
            bias = torch.zeros(N, device=device, dtype=dtype, requires_grad=True)
            fns = {
                "dense": lambda x: F.linear(x, dense_w_param),
                "roast": lambda x: roast_linear(x, memory, roast_map, scale, True),
                "roast-1": lambda x: roast_linear(x, memory, roast_map, scale, True),  # timed with ROASTFX_SPLIT_K=1
                "roast-mat": lambda x: x @ roast_materialize(memory, roast_map, scale, dtype),
                "hashednet": lambda x: x @ roast_materialize(memory, hashed_map, scale, dtype),
                "eager": lambda x: x @ reference.materialize(memory, roast_map, scale).to(dtype),
                "dense+gelu": lambda x: F.gelu(F.linear(x, dense_w_param, bias), approximate="tanh"),
                # the view is (K, N) = W^T: x @ V, as roast_linear(..., True) reads it
                "roast+gelu": lambda x: roast_linear_epilogue(x, memory, roast_map, scale, "add:x0|gelu_tanh", [bias]),
            }
            # a GPU miscompile must not pass as a fast kernel: compare fused against materialize-then-GEMM
            with torch.no_grad():
                fused, unfused = fns["roast"](x).float(), fns["roast-mat"](x).float()
                rel_err = ((fused - unfused).abs().max() / unfused.abs().max().clamp_min(1e-30)).item()
            if rel_err > 2e-2:
                print(f"WARNING: {name} at {factor:g}x: fused kernel differs from materialize-then-GEMM "
                      f"by {rel_err:.3g} (relative)", file=sys.stderr)
            for method in args.method_list:
                os.environ["ROASTFX_SPLIT_K"] = "1" if method == "roast-1" else "auto"
                fwd, fwd_bwd = time_forward_backward(bench, fns[method], x, dy, args.warmup, args.rep,
                                                     params=(memory, dense_w_param, bias))
                os.environ.pop("ROASTFX_SPLIT_K")
                rows.append(dict(
                    shape=name, M=M, K=K, N=N, compression=factor, memory_size=size, memory_dtype=str(memory.dtype),
                    tile=list(tile), roast_forward_config=forward_config,
                    method=method, fused_vs_materialized_rel_err=rel_err, forward_ms=fwd, forward_backward_ms=fwd_bwd,
                    forward_tflops=2 * M * K * N / fwd / 1e9, forward_backward_tflops=6 * M * K * N / fwd_bwd / 1e9,
                ))
                if not args.dry_run:
                    torch.cuda.synchronize()
            save(rows)
    return rows


def print_table(rows):
    print_timing_table(rows, 22)


def main(argv=None):
    run_script("bench_kernels.py", parse_args, run, print_table, argv, prefix="")


if __name__ == "__main__":
    main()
