"""Compile every ROAST kernel for a GPU target without the GPU, and check its resources.

    python benchmarks/compile_check.py --target h100           # all kernels, dtypes, block configs
    python benchmarks/compile_check.py --target a100 --quick   # bf16, two configs per GEMM kernel

Each launch a real run would make (forward GEMM with each block config (fp32 at torch's
default "highest" precision: the FMA configs), its fixed
epilogue, dX, a split-K forward, dMemory with atomics / deterministic / with the sum of squares, generated
epilogues including a graph-shaped one and a 0-dim float64 operand, the implicit-GEMM
conv alone, with a batch norm + residual + relu epilogue, and its dX and dMemory, each with
every conv config (configs.CONV_CANDIDATES, FMA_CONV_CANDIDATES), a transposed conv with a
batch-norm epilogue, a grouped conv3d's three kernels, a grouped conv1d's three with its view rows scaled
(weight norm per kernel tap), a mixture of experts' grouped GEMM (forward, dX,
dMemory), embedding gather and scatter
and BERT's summed embeddings as a gather epilogue, materialize; and, as the reference for the forward's
main loop, a plain dense Triton GEMM at each 16-bit block config) is compiled by Triton and ptxas for the
target's CUDA architecture (codegen/aot.py), on CPU tensors, nothing run. The table gives, per launch: the shared
memory the compiled kernel asks for against the target's limit per block, the estimate
configs.py prunes candidates with, registers per thread, spill bytes, and the PTX's
tensor-core instructions ("mma") and asynchronous global-to-shared copies ("cp.async"). It fails (exit 1)
when a launch does not compile, or when a bf16/fp16 GEMM has no tensor-core instruction
(wgmma on sm_90, mma.sync on sm_80/sm_89) in its PTX. It lists the block configs configs.candidates() keeps whose
compiled kernel does not fit the target's shared memory: the device refuses those at launch
and configs.run_fitting falls back to the next config, so they cost a compile, not a crash.
JSON: benchmarks/results/compile-<target>-triton<version>-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

M, K, N = 200, 384, 512  # tokens, in, out: odd M, every block config has whole tiles of K and N
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    from roastfx.profiles import PROFILES

    gpus = [name for name, p in PROFILES.items() if p.kind == "gpu"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="h100", help=f"a GPU profile: {', '.join(gpus)}")
    p.add_argument("--quick", action="store_true", help="bf16 only, two block configs per GEMM kernel")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for the JSON results")
    p.add_argument("--no-json", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if args.target not in gpus:
        p.error(f"--target {args.target!r}: compile checks are for GPU profiles, one of {', '.join(gpus)}")
    args.profile = PROFILES[args.target]
    return args


def mapping(rows, cols, tile=(32, 64)):
    from roastfx.codegen.hashing import TileHash

    return TileHash(rows=rows, cols=cols, tile_rows=tile[0], tile_cols=tile[1], alignment=32, window_start=64,
                    window_size=8192, a_row=1234577, a_col=7654321, b=99, c_row=31337, c_col=4242, d=17)


def fma_dot(dname: str) -> bool:
    """An fp32 dot the kernels run in full precision on FMA units (configs.FMA_CANDIDATES), as
    triton_matmul.dot_precision decides from torch's matmul precision."""
    import torch

    from roastfx.codegen.triton_matmul import dot_precision

    return dname == "fp32" and dot_precision(torch.float32) == "ieee"


_DENSE = []


def dense_reference_kernel():
    """A plain dense Triton GEMM (C = A @ B, both in memory as given, masked edges, tl.dot), defined on first
    use: after run() has unset TRITON_INTERPRET. Compiled beside the ROAST forward at each block config, it
    is the reference for the main loop's instruction count: what the hashing and the signs add. Like the
    ROAST kernels (triton_matmul.even_flags) it drops the masks along K and N where the blocks are whole."""
    if not _DENSE:
        import triton
        import triton.language as tl

        @triton.jit
        def dense_reference_gemm(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                 stride_cm, stride_cn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, EVEN_R: tl.constexpr, EVEN_N: tl.constexpr):
            offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            mask_n = offs_n < N
            if EVEN_N:
                mask_n = tl.full((BLOCK_N,), True, tl.int1)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                mask_k = k < K
                if EVEN_R:
                    mask_k = tl.full((BLOCK_K,), True, tl.int1)
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                            mask=(offs_m[:, None] < M) & mask_k[None, :], other=0.0)
                b = tl.load(b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
            tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                     acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

        _DENSE.append(dense_reference_gemm)
    return _DENSE[0]


def dense_launch(a, b, cfg):
    import torch

    from roastfx.codegen.triton_matmul import even_flags

    c = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    grid = (-(-a.shape[0] // cfg.block_m), -(-b.shape[1] // cfg.block_n))
    dense_reference_kernel()[grid](a, b, c, a.shape[0], b.shape[1], a.shape[1], *a.stride(), *b.stride(),
                                   *c.stride(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                   **even_flags(b.shape[1], a.shape[1], cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def launches(quick: bool, arch: int = 90):
    """(name, variant, dtype, config or None, B operand's element size, call) for each launch to compile:
    the forward GEMMs read B from the memory (fp32 unless said), dMemory reads two activations."""
    out = []
    for dname in (["bf16"] if quick else list(DTYPES)):
        out += _launches_for(dname, quick, arch)  # one scope per dtype: the lambdas bind that dtype's tensors
    return out


def _launches_for(dname: str, quick: bool, arch: int):
    import torch

    from roastfx.codegen import (configs, triton_conv, triton_embedding, triton_epilogue, triton_grouped,
                                 triton_materialize, triton_matmul, triton_norms)
    from roastfx.codegen.epilogue import Epilogue

    site, head = mapping(K, N), mapping(N, K)  # head: a (N, K) view read transposed (x @ V^T)
    if fma_dot(dname):  # a full-precision fp32 dot runs on FMA units, with its own configs
        gemm_configs, default = configs.FMA_CANDIDATES, configs.FMA_CANDIDATES[0]
    else:
        gemm_configs = [c for c in configs.CANDIDATES if c.min_arch <= arch]  # what the target is offered
        gemm_configs = gemm_configs[:2] if quick else gemm_configs
        default = configs.BlockConfig(64, 64, 64, num_warps=4, num_stages=3)
    out = []
    dtype = getattr(torch, DTYPES[dname])
    size = torch.empty((), dtype=dtype).element_size()
    x, dy = torch.zeros(M, K, dtype=dtype), torch.zeros(M, N, dtype=dtype)
    memory = torch.zeros(site.window_start + site.window_size, dtype=torch.float32)
    bias, residual = torch.zeros(N, dtype=dtype), torch.zeros(M, N, dtype=dtype)
    weight = torch.zeros(K, N, dtype=dtype)
    for cfg in gemm_configs:
        out.append(("roast_matmul", "forward", dname, cfg, 4,
                    lambda cfg=cfg: triton_matmul.roast_matmul(x, memory, site, 0.5, True, config=cfg)))
        if dname != "fp32":
            out.append(("dense_reference_gemm", "dense x @ W (reference)", dname, cfg, size,
                        lambda cfg=cfg: dense_launch(x, weight, cfg)))
        out.append(("roast_grad_memory", "atomic", dname, cfg, size,
                    lambda cfg=cfg: triton_matmul.roast_grad_memory(x, dy, memory.numel(), site, 0.5, False,
                                                                   config=cfg)))
    out += [
        ("roast_matmul", "bias+gelu_tanh+residual+store_pre", dname, default, 4,
         lambda: triton_matmul.roast_matmul(x, memory, site, 0.5, True, bias=bias, activation="gelu_tanh",
                                            residual=residual, store_pre=True, config=default)),
        ("roast_matmul", f"memory {dname}", dname, default, size,
         lambda: triton_matmul.roast_matmul(x, memory.to(dtype), site, 0.5, True, config=default)),
        ("roast_matmul", "dX = dY @ V^T", dname, default, 4,
         lambda: triton_matmul.roast_matmul(dy, memory, site, 0.5, False, config=default)),
        ("roast_matmul", "split-K, 3 splits", dname, default, 4,
         lambda: triton_matmul.roast_matmul(x[:16], memory, site, 0.5, True, config=default, split_k=3)),
        ("roast_matmul", "x @ V^T (tied head)", dname, default, 4,
         lambda: triton_matmul.roast_matmul(x, memory, head, 0.5, False, config=default)),
        ("roast_grad_memory", "deterministic", dname, default, size,
         lambda: triton_matmul.roast_grad_memory(x, dy, memory.numel(), site, 0.5, True, config=default)),
        ("roast_grad_memory", "sum of squares", dname, default, size,
         lambda: triton_matmul.roast_grad_memory_sumsq(x, dy, memory.numel(), site, 0.5, False, config=default)),
    ]
    epilogues = [
        ("add:x0|gelu_tanh|mul:0.5|add:x1|cast:bfloat16", [bias, residual]),
        # GPT-2's bias + gelu_new, as fuse_epilogue writes it
        ("add:x0|mul:0.5|mul(v1,v1)|mul(v3,v1)|mul:0.044715|add(v1,v5)|mul:0.7978845608028654|tanh|add:1.0"
         "|mul(v2,v9)", [bias]),
        # a symbolic float (dynamic=True) enters as a 0-dim float64 tensor
        ("mul:x0|silu|mul(v2,x1)|erf", [torch.zeros((), dtype=torch.float64), residual]),
    ]
    for signature, extras in epilogues:
        epi = Epilogue.parse(signature)
        out.append(("roast_linear_epilogue", signature, dname, default, 4,
                    lambda epi=epi, extras=extras: triton_epilogue.roast_matmul_epilogue(
                        x, memory, site, 0.5, True, epi, extras, config=default)))
    # ResNet-style 3x3 conv, 32 -> 64 channels, as implicit GEMMs (reduction 32 * 9 = 288 = site rows): the
    # forward alone and with ResNet's eval batch norm + residual + relu (as fuse_epilogue writes it), dX over
    # the input's pixels and dMemory over the output's, each with every conv config
    conv_site = mapping(32 * 9, 64)
    image, grad_image = torch.zeros(2, 32, 14, 14, dtype=dtype), torch.zeros(2, 64, 14, 14, dtype=dtype)
    channel = torch.ones(64, 1, 1, dtype=torch.float32)
    bn = Epilogue.parse("sub:x0|add(x1,1e-05)|rsqrt|mul(v1,v3)|mul:x2|add:x3|add:x4|relu")
    conv_configs = configs.FMA_CONV_CANDIDATES if fma_dot(dname) else configs.CONV_CANDIDATES
    for cfg in conv_configs[:1] if quick else conv_configs:
        out += [
            ("roast_conv", "implicit GEMM 3x3 + bias", dname, cfg, 4,
             lambda cfg=cfg: triton_conv.roast_conv_forward(
                 image, memory, conv_site, 0.5, torch.empty_like(grad_image), (3, 3), (1, 1), (1, 1), (1, 1),
                 bias=torch.zeros(64, dtype=dtype), config=cfg)),
            ("roast_conv_epilogue", "3x3 + batch norm + residual + relu", dname, cfg, 4,
             lambda cfg=cfg: triton_epilogue.roast_conv_epilogue(
                 image, memory, conv_site, 0.5, torch.empty_like(grad_image), (3, 3), (1, 1), (1, 1), (1, 1), bn,
                 [channel] * 4 + [torch.zeros_like(grad_image)], config=cfg)),
            ("roast_conv_grad_input", "3x3 dX", dname, cfg, 4,
             lambda cfg=cfg: triton_conv.roast_conv_grad_input(
                 grad_image, memory, conv_site, 0.5, torch.empty_like(image), (3, 3), (1, 1), (1, 1), (1, 1),
                 config=cfg)),
            ("roast_conv_grad_memory", "3x3 dMemory", dname, cfg, size,
             lambda cfg=cfg: triton_conv.roast_conv_grad_memory(
                 image, grad_image, memory.numel(), conv_site, 0.5, (3, 3), (1, 1), (1, 1), (1, 1),
                 deterministic=False, config=cfg)),
        ]
    # a U-Net decoder's 2x2 stride-2 transposed conv, 64 -> 32 channels, + bias + eval batch norm + relu
    up_site, up_bn = mapping(64, 32 * 4), Epilogue.parse("add:x0|sub:x1|add(x2,1e-05)|rsqrt|mul(v2,v4)|mul:x3|add:x4|relu")
    up_channel = torch.ones(32, 1, 1, dtype=torch.float32)
    out.append(("roast_transposed_conv_epilogue", "2x2 s2 + bias + batch norm + relu", dname, conv_configs[0], 4,
                lambda: triton_epilogue.roast_transposed_conv_epilogue(
                    grad_image, memory, up_site, 0.5, torch.empty(2, 32, 28, 28, dtype=dtype), (2, 2), (2, 2), (0, 0),
                    (1, 1), up_bn, [up_channel] * 5, config=conv_configs[0])))
    # a 3x3x3 conv3d, 16 -> 64 channels, groups=2 (video models): the same kernels with a depth
    volume, grad_volume = torch.zeros(2, 16, 6, 8, 8, dtype=dtype), torch.zeros(2, 64, 6, 8, 8, dtype=dtype)
    site3d, geometry3d = mapping(8 * 27, 64), ((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    out += [
        ("roast_conv", "conv3d 3x3x3 groups=2 + bias", dname, conv_configs[0], 4,
         lambda: triton_conv.roast_conv_forward(volume, memory, site3d, 0.5, torch.empty_like(grad_volume),
                                                *geometry3d, groups=2, bias=torch.zeros(64, dtype=dtype),
                                                config=conv_configs[0])),
        ("roast_conv_grad_input", "conv3d dX", dname, conv_configs[0], 4,
         lambda: triton_conv.roast_conv_grad_input(grad_volume, memory, site3d, 0.5, torch.empty_like(volume),
                                                   *geometry3d, groups=2, config=conv_configs[0])),
        ("roast_conv_grad_memory", "conv3d dMemory", dname, conv_configs[0], size,
         lambda: triton_conv.roast_conv_grad_memory(volume, grad_volume, memory.numel(), site3d, 0.5, *geometry3d,
                                                    groups=2, deterministic=False, config=conv_configs[0])),
    ]
    # Wav2Vec2's positional conv: a grouped conv1d (as height 1) under weight norm per kernel tap, each B row
    # scaled by its tap's factor as it is read (roast_conv_row_scaled): forward, dX, dMemory + the scale's grad
    wave, grad_wave = torch.zeros(2, 64, 1, 50, dtype=dtype), torch.zeros(2, 64, 1, 51, dtype=dtype)
    site_pos, geometry_pos = mapping(16 * 16, 64), ((1, 16), (1, 1), (0, 8), (1, 1))
    taps = torch.ones(16 * 16, dtype=torch.float32)
    out += [
        ("roast_conv", "conv1d k16 groups=4, rows scaled", dname, conv_configs[0], 4,
         lambda: triton_conv.roast_conv_forward(wave, memory, site_pos, 0.5, torch.empty_like(grad_wave),
                                                *geometry_pos, groups=4, bias=torch.zeros(64, dtype=dtype),
                                                config=conv_configs[0], row_scale=taps)),
        ("roast_conv_grad_input", "conv1d dX, rows scaled", dname, conv_configs[0], 4,
         lambda: triton_conv.roast_conv_grad_input(grad_wave, memory, site_pos, 0.5, torch.empty_like(wave),
                                                   *geometry_pos, groups=4, config=conv_configs[0], row_scale=taps)),
        ("roast_conv_grad_memory", "conv1d dMemory + row scale grad", dname, conv_configs[0], size,
         lambda: triton_conv.roast_conv_row_scaled_grad_memory(wave, grad_wave, memory, site_pos, 0.5, taps,
                                                               *geometry_pos, groups=4, deterministic=False,
                                                               config=conv_configs[0])),
    ]
    # a mixture of experts' grouped GEMM over a grouped site: 4 experts of 128 columns, one launch for all
    grouped, offs = mapping(K, 4 * 128), torch.tensor([50, 100, 150, M], dtype=torch.int32)
    out += [
        ("roast_grouped_matmul", "4 experts, forward", dname, default, 4,
         lambda: triton_grouped.roast_grouped_matmul(x, memory, offs, grouped, 4, 0.5, True, config=default)),
        ("roast_grouped_matmul", "4 experts, dX", dname, default, 4,
         lambda: triton_grouped.roast_grouped_matmul(dy[:, :128], memory, offs, grouped, 4, 0.5, False,
                                                     config=default)),
        ("roast_grouped_grad_memory", "4 experts, atomic + sum of squares", dname, default, size,
         lambda: triton_grouped.roast_grouped_grad_memory(x, dy[:, :128], offs, memory.numel(), grouped, 4, 0.5,
                                                          sumsq=True, config=default)),
    ]
    ids = torch.zeros(M, dtype=torch.int64)
    # BERT's embeddings: word rows + token type rows + a position table broadcast over the batch
    words = mapping(M, N)
    out.append(("roast_embedding_epilogue", "word + token type + position", dname, None, None,
                lambda: triton_epilogue.roast_embedding_epilogue(
                    memory, words, 0.5, ids.reshape(4, M // 4), Epilogue.parse("add:x0|add:x1"),
                    [torch.zeros(4, M // 4, N, dtype=dtype), torch.zeros(M // 4, N, dtype=dtype)])))
    out.append(("gather_rows", "embedding", dname, None, None,
                lambda: triton_embedding.gather_rows(memory, site, 0.5, ids, dtype=dtype)))
    out.append(("scatter_rows_grad", "embedding dMemory", dname, None, None,
                lambda: triton_embedding.scatter_rows_grad(torch.zeros(M, N, dtype=dtype), memory.numel(), site,
                                                           0.5, ids, deterministic=False)))
    out.append(("materialize", "fallback", dname, None, None,
                lambda: triton_materialize.materialize(memory, site, 0.5, dtype=dtype)))
    out.append(("slice_sumsq", "weight norm's squared norms", dname, None, None,
                lambda: triton_norms.slice_sumsq(memory, site, 0.5, True)))
    out.append(("slice_sumsq_grad", "their dMemory", dname, None, None,
                lambda: triton_norms.slice_sumsq_grad(torch.zeros(N), memory, site, 0.5, True, deterministic=False)))
    return out


def run(args):
    os.environ["ROASTFX_KERNELS"] = "triton"
    if os.environ.pop("TRITON_INTERPRET", None) == "1":
        print("compile_check: TRITON_INTERPRET=1 was set; compiling instead", file=sys.stderr)
    from roastfx.codegen import configs
    from roastfx.codegen.aot import compile_only

    profile = args.profile
    limit = profile.smem_per_block_bytes
    rows, failures, refused = [], [], []
    for name, variant, dname, cfg, b_size, call in launches(args.quick, profile.cuda_arch):
        with compile_only(profile.cuda_arch) as compiled:
            try:
                call()
                error = None
            except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a finding, not a crash
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        size = 4 if dname == "fp32" else 2
        kept = None if cfg is None or name == "dense_reference_gemm" else cfg in configs.candidates(
            profile, size, b_element_size=b_size,
                                                                  fma=fma_dot(dname),
                                                                  conv="conv" in name)
        if error or not compiled:
            failures.append(f"{name} [{variant}] {dname}: {error or 'no launch'}")
            rows.append(dict(kernel=name, variant=variant, dtype=dname, config=_cfg(cfg), error=error or "no launch"))
            continue
        for c in compiled:
            row = dict(kernel=c.kernel.lstrip("_"), variant=variant, dtype=dname, config=_cfg(cfg),
                       num_warps=c.num_warps, num_stages=c.num_stages, shared_bytes=c.shared_bytes,
                       estimate_bytes=cfg.shared_memory(size, b_size) if cfg is not None else None,
                       fits=c.shared_bytes <= limit, kept_by_candidates=kept, registers=c.registers,
                       spill_bytes=c.spill_bytes, tensor_core_ops=c.tensor_core_ops, async_copies=c.async_copies,
                       loop_instructions=c.loop and c.loop.instructions,
                       loop_integer_ops=c.loop and c.loop.integer_ops(),
                       loop_tensor_core=c.loop and c.loop.tensor_core, loop_calls=c.loop and c.loop.calls,
                       loop_spill_ops=c.loop and c.loop.local_memory_ops,
                       compile_s=round(c.seconds, 2))
            rows.append(row)
            if cfg is not None and dname != "fp32" and not c.tensor_core_ops:
                failures.append(f"{name} [{variant}] {dname} {_cfg(cfg)}: no tensor-core instruction in the PTX")
            if kept and not row["fits"]:
                refused.append(f"{name} [{variant}] {dname} {_cfg(cfg)}: needs {c.shared_bytes} B of shared "
                               f"memory, {profile.name} allows {limit}")
    _print(rows, profile)
    missed = [r for r in rows if r.get("fits") and r.get("kept_by_candidates") is False]
    summary = dict(launches=len(rows), failures=failures, kept_but_refused=refused,
                   fit_but_pruned=[f"{r['kernel']} [{r['variant']}] {r['dtype']} {r['config']}" for r in missed],
                   max_registers=max((r["registers"] or 0 for r in rows if "registers" in r), default=None),
                   any_spills=any((r.get("spill_bytes") or 0) > 0 for r in rows),
                   max_spill_bytes=max((r.get("spill_bytes") or 0 for r in rows), default=0),
                   spills_in_main_loops=any((r.get("loop_spill_ops") or 0) > 0 for r in rows),
                   forward_loop_vs_dense=loop_vs_dense(rows))
    print(f"\n{len(rows)} launches compiled for {profile.name} (sm_{profile.cuda_arch}); "
          f"{len(failures)} failure(s); {len(refused)} kept by configs.candidates but over the shared memory "
          f"(the device refuses them and configs.run_fitting falls back); {len(missed)} that fit but are pruned; "
          f"max {summary['max_registers']} registers/thread; spills: "
          f"{'at most %d bytes' % summary['max_spill_bytes'] if summary['any_spills'] else 'none'}, "
          f"{'some' if summary['spills_in_main_loops'] else 'none'} inside a main loop")
    for key, (roast, dense) in summary["forward_loop_vs_dense"].items():
        print(f"main loop, forward {key}: ROAST {roast} instructions per iteration, dense Triton GEMM {dense} "
              f"({roast / dense:.2f}x)")
    for f in failures:
        print("FAIL", f)
    for r in refused:
        print("OVER", r)
    if not args.no_json:
        import torch
        import triton

        os.makedirs(args.out, exist_ok=True)
        date = datetime.date.today().isoformat()
        path = os.path.join(args.out, f"compile-{profile.name}-triton{triton.__version__}-{date}.json")
        env = dict(target=profile.name, cuda_arch=profile.cuda_arch, smem_per_block_bytes=limit, date=date,
                   torch=torch.__version__, triton=triton.__version__, quick=args.quick,
                   note="compiled on CPU with Triton's compiler and ptxas; nothing was run")
        with open(path, "w") as f:
            json.dump(dict(environment=env, summary=summary, launches=rows), f, indent=1)
        print(f"wrote {path}")
    return 1 if failures else 0


def loop_vs_dense(rows) -> dict:
    """{"<dtype> <config>": [ROAST forward's main-loop instructions, the dense reference GEMM's]} where both
    compiled at that config (a 16-bit input, the ROAST memory in fp32)."""
    loops = {}
    for r in rows:
        if r.get("loop_instructions") and (r["kernel"], r["variant"]) in (
                ("roast_matmul_kernel", "forward"), ("dense_reference_gemm", "dense x @ W (reference)")):
            loops.setdefault(f"{r['dtype']} {r['config']}", {})[r["kernel"]] = r["loop_instructions"]
    return {key: [v["roast_matmul_kernel"], v["dense_reference_gemm"]] for key, v in loops.items() if len(v) == 2}


def _cfg(cfg):
    if cfg is None:
        return "fixed"
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def _print(rows, profile):
    head = f"{'kernel':<22} {'variant':<36} {'dtype':<5} {'block':<20} {'smem KiB':>9} {'est KiB':>8} " \
           f"{'fits':>5} {'kept':>5} {'regs':>5} {'spill':>6} {'mma':>5} {'cp.async':>8} {'loop':>5} {'int':>5}"
    print(f"compile check for {profile.name} (sm_{profile.cuda_arch}), shared memory per block "
          f"{profile.smem_per_block_bytes / 1024:.0f} KiB\n{head}\n{'-' * len(head)}")
    for r in rows:
        variant = r["variant"] if len(r["variant"]) <= 36 else r["variant"][:33] + "..."
        if "error" in r:
            print(f"{r['kernel']:<22} {variant:<36} {r['dtype']:<5} {r['config']:<20} ERROR {r['error']}")
            continue
        est = f"{r['estimate_bytes'] / 1024:.0f}" if r["estimate_bytes"] is not None else "-"
        kept = "-" if r["kept_by_candidates"] is None else "yes" if r["kept_by_candidates"] else "no"
        print(f"{r['kernel']:<22} {variant:<36} {r['dtype']:<5} {r['config']:<20} {r['shared_bytes'] / 1024:>9.0f} "
              f"{est:>8} {'yes' if r['fits'] else 'NO':>5} {kept:>5} {r['registers'] or '?':>5} "
              f"{r['spill_bytes'] if r['spill_bytes'] is not None else '?':>6} {r['tensor_core_ops']:>5} "
              f"{r['async_copies']:>8} {_count(r['loop_instructions']):>5} {_count(r['loop_integer_ops']):>5}")


def _count(n):
    return "-" if n is None else str(n)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
