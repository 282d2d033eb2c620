"""Time the fused ROAST linear kernel against dense and materializing baselines.

    python benchmarks/bench_kernels.py                 # CUDA: full table, JSON in benchmarks/results/
    python benchmarks/bench_kernels.py --dry-run       # CPU: tiny shapes in the Triton interpreter, checks wiring only

Methods, each computing y = x @ W^T for a (out, in) = (N, K) weight:
  dense      F.linear with a dense bf16 weight
  roast      the fused kernel: B tiles read straight from the memory (codegen.kernels.roast_linear)
  roast-mat  the same ROAST mapping, materialized by a kernel, then F.linear
  hashednet  HashedNets style: per-element hash (1x1 tiles), materialize W with a kernel, then F.linear
  eager      the PyTorch reference path: gather W with torch indexing, then F.linear
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

SHAPES = {  # name: (M tokens, K in_features, N out_features)
    "decode-16x8192x8192": (16, 8192, 8192),
    "square-4096": (4096, 4096, 4096),
    "bert-attn-proj": (32 * 128, 768, 768),
    "bert-ffn-up": (32 * 128, 768, 3072),
    "bert-ffn-down": (32 * 128, 3072, 768),
}
DRY_RUN_SHAPES = {"tiny": (33, 64, 48)}
METHODS = ("dense", "roast", "roast-mat", "hashednet", "eager")
TILE_CHOICES = ((64, 64), (32, 64), (16, 64), (8, 64), (4, 64), (1, 64), (1, 32), (1, 8), (1, 1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated names from {list(SHAPES)}")
    p.add_argument("--compression", default="10,100,1000", help="comma-separated compression factors")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--warmup", type=int, default=25, help="warmup time per measurement, ms")
    p.add_argument("--rep", type=int, default=100, help="measurement time per measurement, ms")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for the JSON results")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU in the Triton interpreter; no JSON")
    args = p.parse_args(argv)
    shapes = DRY_RUN_SHAPES if args.dry_run else SHAPES
    names = list(shapes) if args.dry_run else [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in shapes]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {list(shapes)}")
    args.shape_table = {n: shapes[n] for n in names}
    try:
        args.factors = [float(c) for c in args.compression.split(",") if c]
    except ValueError:
        p.error(f"--compression takes numbers, got {args.compression!r}")
    if not args.factors or any(c < 1 for c in args.factors):
        p.error(f"compression factors must be >= 1, got {args.compression!r}")
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


def pick_tile(memory_size):
    """The largest hash tile that leaves the window at least two tile spans."""
    return next(t for t in TILE_CHOICES if 2 * t[0] * t[1] <= memory_size)


def timer(dry_run):
    if dry_run:
        def bench(fn, warmup, rep):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return bench
    import triton.testing

    return lambda fn, warmup, rep: triton.testing.do_bench(fn, warmup=warmup, rep=rep)


def run(args):
    import torch
    import torch.nn.functional as F

    from roastfx.codegen import reference
    from roastfx.codegen.hashing import TileHash
    from roastfx.codegen.kernels import roast_linear, roast_materialize

    device = "cpu" if args.dry_run else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bench = timer(args.dry_run)
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
            dense_w_param = dense_w.clone().requires_grad_()
            fns = {
                "dense": lambda x: F.linear(x, dense_w_param),
                "roast": lambda x: roast_linear(x, memory, roast_map, scale, True),
                "roast-mat": lambda x: x @ roast_materialize(memory, roast_map, scale, dtype),
                "hashednet": lambda x: x @ roast_materialize(memory, hashed_map, scale, dtype),
                "eager": lambda x: x @ reference.materialize(memory, roast_map, scale).to(dtype),
            }
            # a GPU miscompile must not pass as a fast kernel: compare fused against materialize-then-GEMM
            with torch.no_grad():
                fused, unfused = fns["roast"](x).float(), fns["roast-mat"](x).float()
                rel_err = ((fused - unfused).abs().max() / unfused.abs().max().clamp_min(1e-30)).item()
            if rel_err > 2e-2:
                print(f"WARNING: {name} at {factor:g}x: fused kernel differs from materialize-then-GEMM "
                      f"by {rel_err:.3g} (relative)", file=sys.stderr)
            for method in args.method_list:
                fn = fns[method]
                xg = x.clone().requires_grad_()

                def forward():
                    with torch.no_grad():
                        fn(x)

                def forward_backward():
                    fn(xg).backward(dy)

                fwd = bench(forward, args.warmup, args.rep)
                fwd_bwd = bench(forward_backward, args.warmup, args.rep)
                rows.append(dict(
                    shape=name, M=M, K=K, N=N, compression=factor, memory_size=size, tile=list(tile),
                    method=method, fused_vs_materialized_rel_err=rel_err, forward_ms=fwd, forward_backward_ms=fwd_bwd,
                    forward_tflops=2 * M * K * N / fwd / 1e9, forward_backward_tflops=6 * M * K * N / fwd_bwd / 1e9,
                ))
                if not args.dry_run:
                    torch.cuda.synchronize()
    return rows


def print_table(rows):
    header = f"{'shape':<22}{'comp':>7}{'method':>11}{'fwd ms':>10}{'fwd TF/s':>10}{'f+b ms':>10}{'f+b TF/s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:<22}{r['compression']:>6g}x{r['method']:>11}{r['forward_ms']:>10.3f}"
              f"{r['forward_tflops']:>10.1f}{r['forward_backward_ms']:>10.3f}{r['forward_backward_tflops']:>10.1f}")


def environment():
    import torch
    import triton

    return dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), date=datetime.date.today().isoformat(),
    )


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_kernels.py times CUDA kernels and no CUDA device is available; "
                     "use --dry-run to check the script on CPU with the Triton interpreter")
    rows = run(args)
    env = environment()
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  dtype {args.dtype}")
    print_table(rows)
    if not args.dry_run:
        print(f"wrote {write_results(rows, env, args)}")


def write_results(rows, env, args) -> str:
    """benchmarks/results/<gpu>-<date>.json with the environment and every row."""
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    path = os.path.join(args.out, f"{slug}-{env['date']}.json")
    with open(path, "w") as f:
        json.dump(dict(environment=env, dtype=args.dtype, warmup_ms=args.warmup, rep_ms=args.rep, results=rows),
                  f, indent=1)
    return path


if __name__ == "__main__":
    main()
