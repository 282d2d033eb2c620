"""Time a mixture of experts' grouped GEMM over ROAST-compressed stacked expert weights.

    python benchmarks/bench_moe.py                 # CUDA: full table, JSON in benchmarks/results/moe-<gpu>-<date>.json
    python benchmarks/bench_moe.py --dry-run       # CPU: tiny shapes in the Triton interpreter, checks wiring only

Each shape is (S rows, K in, N out, E experts): S = tokens x top-k rows sorted by expert (each row's expert drawn
uniformly at random, so the groups are about even), multiplied by their expert's (K, N) weight, as transformers'
``grouped_mm_experts_forward`` does for one projection. Methods:
  dense      torch._grouped_mm over the dense (E, K, N) weights (the bf16 grouped GEMM transformers calls)
  roast      roastfx::roast_grouped_mm: per expert with rows, the fused ROAST GEMM on the expert's column window
             of the grouped site's view (no expert weight built); one host read of the offsets per call
  roast-mat  the same mapping: the whole (K, E*N) view materialized by a kernel, then torch._grouped_mm
and, with the rows in token order (each its own expert, unsorted), as transformers' ``batched_mm`` experts
(meant for few tokens: decoding) compute them:
  dense-picked   torch.bmm(x.unsqueeze(1), W[ids]): one dense (K, N) weight gathered per row (skipped where
                 that gather would exceed 16 GiB)
  roast-picked   roastfx.codegen.ops.roast_picked_mm, what the roast backend makes of that bmm: the rows sorted
                 by expert on the device, one roast_grouped_mm, the rows put back
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import make_mapping, pick_tile  # noqa: E402
from common import (add_common_arguments, parse_common, print_timing_table, run_script,  # noqa: E402
                    time_forward_backward, timer)

MOE_SHAPES = {  # name: (S rows = tokens x top-k, K, N, E)
    "mixtral-down-4096tok": (4096 * 2, 14336, 4096, 8),  # Mixtral 8x7B's w2: 8 experts, top-2
    "qwen3moe-up-2048tok": (2048 * 8, 2048, 1536, 128),  # Qwen3-30B-A3B's gate_up: 128 experts, top-8
    "mixtral-down-32tok": (32 * 2, 14336, 4096, 8),  # decoding 32 sequences
    "qwen3moe-up-32tok": (32 * 8, 2048, 1536, 128),
}
DRY_RUN_SHAPES = {"tiny": (37, 64, 48, 3)}
METHODS = ("dense", "roast", "roast-mat", "dense-picked", "roast-picked")
PICKED_GATHER_LIMIT = 16 * 2**30  # bytes: dense-picked gathers one (K, N) weight per row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, MOE_SHAPES, compression="100")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    args = parse_common(p, argv, DRY_RUN_SHAPES, MOE_SHAPES)
    args.method_list = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in args.method_list):
        p.error(f"unknown method in {args.methods!r}; choose from {METHODS}")
    return args


def run(args, save=lambda rows: None):
    import torch

    from roastfx.codegen import ops
    from roastfx.codegen.hashing import TileHash
    from roastfx.codegen.kernels import roast_materialize
    from roastfx.codegen.reference import materialize as reference_view

    device = "cpu" if args.dry_run else "cuda"
    # the interpreter's kernels and torch's CPU grouped GEMM in float32; a GPU in the chosen dtype
    dtype = torch.float32 if args.dry_run else {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                 "fp32": torch.float32}[args.dtype]
    if args.dry_run:
        os.environ["ROASTFX_KERNELS"] = "triton"
    bench = timer(args.dry_run, args.l2)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, (S, K, N, E) in args.shape_table.items():
        expert = torch.randint(E, (S,), device=device, generator=gen)
        offs = torch.cumsum(torch.bincount(expert, minlength=E), 0).to(torch.int32)
        x = torch.randn(S, K, device=device, dtype=dtype, generator=gen)
        dy = torch.randn(S, N, device=device, dtype=dtype, generator=gen)
        dense_w = (torch.randn(E, K, N, device=device, dtype=dtype, generator=gen) / K**0.5).requires_grad_()
        for factor in args.factors:
            size = max(int(E * K * N / factor), 2)
            tile = pick_tile(size, N)
            mapping = make_mapping(TileHash, K, E * N, size, tile, seed=1)
            args_list = ops.mapping_args(mapping)
            memory = torch.randn(size, device=device, dtype=dtype, generator=gen).requires_grad_()
            scale = 1 / K**0.5

            def materialized(x):
                view = roast_materialize(memory, mapping, scale, dtype)  # (K, E*N)
                return torch._grouped_mm(x, view.reshape(K, E, N).permute(1, 0, 2), offs=offs)

            fns = {
                "dense": lambda x: torch._grouped_mm(x, dense_w, offs=offs),
                "roast": lambda x: ops.roast_grouped_mm(x, memory, offs, args_list, scale, E),
                "roast-mat": materialized,
                "dense-picked": lambda x: torch.bmm(x.unsqueeze(1), dense_w[expert]).squeeze(1),
                "roast-picked": lambda x: ops.roast_picked_mm(x, expert, memory, args_list, scale, E),
            }
            errors = {}
            with torch.no_grad():  # a GPU miscompile must not pass as a fast kernel
                block = TileHash(*ops.column_windows(args_list, E)[0])
                expert0 = reference_view(memory.detach().float(), block, scale)
                first = int(offs[0])  # the grouped methods: expert 0's rows are the first offs[0]
                picked = (expert == 0).nonzero().squeeze(1)  # the picked ones: the rows whose id is 0
                for method, rows0 in (("roast", torch.arange(first, device=device)), ("roast-picked", picked)):
                    if method not in args.method_list or not len(rows0):
                        continue
                    fused = fns[method](x).float()[rows0]
                    expected = x[rows0].float() @ expert0  # against x @ its block of the view (torch indexing)
                    errors[method] = ((fused - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
                    if errors[method] > 2e-2:
                        print(f"WARNING: {name} at {factor:g}x: {method} differs from x @ expert 0's materialized "
                              f"block by {errors[method]:.3g} (relative)", file=sys.stderr)
            for method in args.method_list:
                row = dict(shape=name, S=S, K=K, N=N, experts=E, compression=factor, memory_size=size,
                           tile=list(tile), method=method, fused_vs_reference_rel_err=errors.get(method))
                gathered = S * K * N * x.element_size()
                if method == "dense-picked" and gathered > PICKED_GATHER_LIMIT:
                    rows.append(dict(row, error=f"skipped: W[ids] would gather {gathered / 2**30:.0f} GiB"))
                    continue
                try:
                    fwd, fwd_bwd = time_forward_backward(bench, fns[method], x, dy, args.warmup, args.rep,
                                                         params=(memory, dense_w))
                except (RuntimeError, ValueError) as err:  # one method failing must not lose the others' rows
                    print(f"{name} {method}: {type(err).__name__}: {str(err)[:300]}", file=sys.stderr)
                    rows.append(dict(row, error=f"{type(err).__name__}: {str(err)[:300]}"))
                    continue
                rows.append(dict(
                    row, forward_ms=fwd, forward_backward_ms=fwd_bwd,
                    forward_tflops=2 * S * K * N / fwd / 1e9, forward_backward_tflops=6 * S * K * N / fwd_bwd / 1e9,
                ))
                if not args.dry_run:
                    torch.cuda.synchronize()
            save(rows)
    return rows


def print_table(rows):
    print_timing_table(rows, 24)


def main(argv=None):
    run_script("bench_moe.py", parse_args, run, print_table, argv, prefix="moe-")


if __name__ == "__main__":
    main()
