"""Time the fused ROAST forward at every block config, with what each compiled kernel occupies.

    python benchmarks/sweep_configs.py                   # CUDA: square-4096 and decode-16x8192x8192 at 100x
    python benchmarks/sweep_configs.py --dry-run         # CPU: a tiny shape in the Triton interpreter, wiring only

For each candidate block config the device offers (configs.candidates: those whose tiles fit its shared
memory and hold whole hash tiles), one row: the forward GEMM's time (never split: split_k=1) beside dense
F.linear in the same run, and the compiled kernel's registers per thread, shared memory and spills, with
how many of its blocks fit on one SM at once (the tightest of registers, shared memory and threads). Where
the main loop rewrites the B tile in registers and waits for the MMA (docs/kernels.md), a second resident
block is what can overlap one block's register pass with the other's MMA: this table says whether that
shows in time, and which config the heuristic (configs.pick, marked "*") should prefer. The memory is in the
activations' dtype unless --memory-dtype says otherwise. JSON: benchmarks/results/sweep-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPES, add_common_arguments, parse_common, run_script, timer  # noqa: E402

DRY_RUN_SHAPES = {"tiny": (33, 64, 96)}
DEFAULT_SHAPES = "square-4096,decode-16x8192x8192"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, compression="100")
    p.set_defaults(shapes=DEFAULT_SHAPES)
    p.add_argument("--memory-dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="the memory's dtype (default: the activations')")
    return parse_common(p, argv, DRY_RUN_SHAPES, SHAPES)


def blocks_per_sm(registers: int | None, shared_bytes: int | None, num_warps: int, props) -> int | None:
    """How many blocks of a compiled kernel one SM holds at once: the tightest of its register file (registers
    allocated per warp in units of 256), its shared memory (1 KiB per block reserved by the driver) and 2,048
    threads; None where the kernel's figures are unknown."""
    if registers is None or shared_bytes is None:
        return None
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = regs_per_sm // max(per_warp * num_warps, 1)
    by_smem = smem_per_sm // (shared_bytes + 1024)
    return max(0, min(by_regs, by_smem, 2048 // (32 * num_warps), 32))


def run(args, save=lambda rows: None):
    import torch
    import torch.nn.functional as F

    from roastfx.codegen import configs, triton_matmul
    from roastfx.codegen.hashing import TileHash

    from bench_kernels import make_mapping, pick_tile

    device = "cpu" if args.dry_run else "cuda"
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = names[args.dtype]
    memory_dtype = names[args.memory_dtype] if args.memory_dtype else dtype
    bench = timer(args.dry_run, args.l2)
    props = None if args.dry_run else torch.cuda.get_device_properties(0)
    gen = torch.Generator(device=device).manual_seed(0)
    launched = []
    real_dump = triton_matmul.maybe_dump

    def record(kernel, compiled):  # the compiled kernel of each launch: its registers and shared memory
        launched.append(compiled)
        real_dump(kernel, compiled)

    triton_matmul.maybe_dump = record
    rows = []
    try:
        for name, (M, K, N) in args.shape_table.items():
            x = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
            dense_w = torch.randn(N, K, device=device, dtype=dtype, generator=gen) / K**0.5
            dense_ms = bench(lambda: F.linear(x, dense_w), args.warmup, args.rep)
            for factor in args.factors:
                size = max(int(K * N / factor), 2)
                tile = pick_tile(size)
                mapping = make_mapping(TileHash, K, N, size, tile, seed=1)  # view = W^T, as nn.Linear's
                memory = torch.randn(size, device=device, dtype=memory_dtype, generator=gen)
                scale = 1 / K**0.5
                block_tile = triton_matmul.block_tile(mapping, True)
                if args.dry_run:
                    options = [configs.INTERPRETER_CONFIG]
                    heuristic = configs.INTERPRETER_CONFIG
                else:
                    limit, arch = configs.shared_memory_limit(x.device), configs.cuda_arch(x.device)
                    options = configs.candidates(limit, x.element_size(), block_tile, memory.element_size(),
                                                 arch=arch)
                    heuristic = configs.pick(M, N, K, limit, x.element_size(), block_tile, memory.element_size(),
                                             arch=arch)
                for cfg in options:
                    def fwd(cfg=cfg):
                        with torch.no_grad():
                            triton_matmul.roast_matmul(x, memory, mapping, scale, True, config=cfg, split_k=1)
                    launched.clear()
                    try:
                        fwd()  # compiles; a config the device refuses is a row with its error
                        ms, error = bench(fwd, args.warmup, args.rep), None
                    except Exception as err:  # noqa: BLE001 - OutOfResources and the like: recorded, not fatal
                        ms, error = None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    compiled = launched[-1] if launched else None
                    registers = getattr(compiled, "n_regs", None)
                    spills = getattr(compiled, "n_spills", None)
                    metadata = getattr(compiled, "metadata", None)
                    shared = getattr(metadata, "shared", None)
                    rows.append(dict(
                        shape=name, M=M, K=K, N=N, compression=factor, memory_size=size, tile=list(tile),
                        memory_dtype=str(memory.dtype).removeprefix("torch."),
                        config=f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}",
                        heuristic=cfg == heuristic, registers=registers, shared_bytes=shared, spills=spills,
                        blocks_per_sm=None if props is None else blocks_per_sm(registers, shared, cfg.num_warps,
                                                                               props),
                        forward_ms=ms, dense_ms=dense_ms, error=error,
                        forward_tflops=None if ms is None else 2 * M * K * N / ms / 1e9,
                        vs_dense=None if ms is None else dense_ms / ms,
                    ))
                    save(rows)
    finally:
        triton_matmul.maybe_dump = real_dump
    return rows


def print_table(rows):
    header = (f"{'shape':<22}{'comp':>6}{'config':>22}{'regs':>6}{'smem KB':>9}{'blk/SM':>8}"
              f"{'fwd ms':>10}{'TF/s':>8}{'x dense':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        mark = "*" if r["heuristic"] else " "
        smem = None if r["shared_bytes"] is None else r["shared_bytes"] / 1024
        line = (f"{r['shape']:<22}{r['compression']:>5g}x{mark + r['config']:>22}{fmt(r['registers'], 'd'):>6}"
                f"{fmt(smem, '.0f'):>9}{fmt(r['blocks_per_sm'], 'd'):>8}{fmt(r['forward_ms'], '.3f'):>10}"
                f"{fmt(r['forward_tflops'], '.1f'):>8}{fmt(r['vs_dense'], '.2f'):>9}")
        print(line + (f"  {r['error']}" if r["error"] else ""))
    print("* the config configs.pick chooses without timing; x dense: dense F.linear's time / this config's")


def main(argv=None):
    run_script("sweep_configs.py", parse_args, run, print_table, argv, prefix="sweep-")


if __name__ == "__main__":
    main()
