"""Time ROAST convolutions against cuDNN: the implicit-GEMM kernels and im2col + the ROAST GEMM.

    python benchmarks/bench_conv.py                 # CUDA: table, JSON in benchmarks/results/conv-<gpu>-<date>.json
    python benchmarks/bench_conv.py --dry-run       # CPU: a tiny shape in the Triton interpreter, checks wiring only

Shapes: ResNet-50's convs, a ResNeXt grouped conv, a MobileNet depthwise conv and a U-Net
decoder's transposed conv. Methods, each computing the conv with bias:
  dense     F.conv2d / F.conv_transpose2d with a dense weight (cuDNN)
  implicit  roastfx::roast_conv with ROASTFX_CONV=implicit: the forward, dX and dMemory kernels read the
            input and the output gradient in place (implicit GEMMs)
  im2col    roastfx::roast_conv with ROASTFX_CONV=im2col: F.unfold, then the fused ROAST GEMM; backward
            F.fold / F.unfold around the ROAST dX and dMemory GEMM kernels
Forward alone and forward + backward. Before timing, each ROAST method's output and input gradient
are compared with the materialized weight's F.conv2d.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_arguments, parse_common, run_script, time_forward_backward, timer  # noqa: E402

SHAPES = {  # name: (batch, in channels, out channels, height = width, kernel, stride, padding, groups, transposed)
    "resnet50-conv2-3x3": (32, 64, 64, 56, 3, 1, 1, 1, False),
    "resnet50-conv4-3x3": (32, 256, 256, 14, 3, 1, 1, 1, False),
    "resnet50-conv4-1x1": (32, 1024, 256, 14, 1, 1, 0, 1, False),
    "resnet50-conv5-3x3-s2": (32, 512, 512, 14, 3, 2, 1, 1, False),
    "resnext50-3x3-g32": (32, 256, 256, 28, 3, 1, 1, 32, False),
    "mobilenetv2-dw-3x3": (32, 144, 144, 56, 3, 1, 1, 144, False),
    "unet-up-2x2-s2": (32, 256, 128, 32, 2, 2, 0, 1, True),
}
DRY_RUN_SHAPES = {"tiny": (2, 8, 16, 9, 3, 1, 1, 1, False), "tiny-depthwise": (2, 8, 8, 7, 3, 2, 1, 8, False),
                  "tiny-transposed-g2": (2, 8, 6, 5, 3, 2, 1, 2, True)}
METHODS = ("dense", "implicit", "im2col")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, SHAPES, compression="10,100")
    return parse_common(p, argv, DRY_RUN_SHAPES, SHAPES)


def run(args, save=lambda rows: None):
    import torch
    import torch.nn.functional as F

    from bench_kernels import make_mapping, pick_tile
    from roastfx.codegen.hashing import TileHash
    from roastfx.codegen.ops import mapping_args, roast_conv, roast_conv_transpose

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        os.environ["ROASTFX_KERNELS"] = "triton"  # the roast ops' Triton path, interpreted on CPU
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bench = timer(args.dry_run, args.l2)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, (n, cin, cout, hw, k, stride, pad, groups, transposed) in args.shape_table.items():
        x = torch.randn(n, cin, hw, hw, device=device, dtype=dtype, generator=gen)
        if transposed:  # weight (in, out/groups, k, k); view (in, out/groups * k * k)
            weight_shape, view_rows, view_cols = (cin, cout // groups, k, k), cin, cout // groups * k * k
            out_hw = (hw - 1) * stride - 2 * pad + k
            fan_in = cin // groups * k * k
        else:  # weight (out, in/groups, k, k); view (in/groups * k * k, out)
            weight_shape, view_rows, view_cols = (cout, cin // groups, k, k), cin // groups * k * k, cout
            out_hw = (hw + 2 * pad - k) // stride + 1
            fan_in = view_rows
        dense_w = (torch.randn(*weight_shape, device=device, dtype=dtype, generator=gen) / fan_in**0.5)
        dense_w.requires_grad_()
        bias = torch.zeros(cout, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(n, cout, out_hw, out_hw, device=device, dtype=dtype, generator=gen)
        for factor in args.factors:
            size = max(int(view_rows * view_cols / factor), 2)
            tile = pick_tile(size)
            mapping = make_mapping(TileHash, view_rows, view_cols, size, tile, seed=1)
            args_list = mapping_args(mapping)
            memory = torch.randn(size, device=device, dtype=torch.float32, generator=gen).requires_grad_()
            scale = 1 / fan_in**0.5

            def roast(x, mode):
                os.environ["ROASTFX_CONV"] = mode
                if transposed:
                    return roast_conv_transpose(x, memory, args_list, scale, bias, [k, k], [stride] * 2, [pad] * 2,
                                                [0, 0], [1, 1], groups)
                return roast_conv(x, memory, args_list, scale, bias, [k, k], [stride] * 2, [pad] * 2, [1, 1], groups)

            def dense(x, w=dense_w):
                if transposed:
                    return F.conv_transpose2d(x, w, bias, stride, pad, 0, groups)
                return F.conv2d(x, w, bias, stride, pad, 1, groups)

            fns = {
                "dense": dense,
                "implicit": lambda x: roast(x, "implicit"),
                "im2col": lambda x: roast(x, "im2col"),
            }
            errors = {m: conv_errors(fns[m], dense, x, dy, mapping, memory, scale, weight_shape, transposed)
                      for m in ("implicit", "im2col")}
            for m, (err, grad_err) in errors.items():
                if max(err, grad_err) > 2e-2:
                    print(f"WARNING: {name} at {factor:g}x: {m} differs from the materialized conv by {err:.3g} "
                          f"(output) / {grad_err:.3g} (input gradient), relative", file=sys.stderr)
            for method in METHODS:
                fwd, fwd_bwd = time_forward_backward(bench, fns[method], x, dy, args.warmup, args.rep,
                                                     params=(memory, dense_w, bias))
                flops = 2 * n * (hw * hw if transposed else out_hw * out_hw) * view_rows * view_cols
                row = dict(shape=name, batch=n, cin=cin, cout=cout, hw=hw, kernel=k, stride=stride,
                                groups=groups, transposed=transposed, compression=factor, memory_size=size,
                                tile=list(tile), method=method)
                rows.append(dict(row, rel_err_vs_materialized=errors.get(method, (None,))[0],
                                 grad_rel_err_vs_materialized=errors.get(method, (None, None))[1], forward_ms=fwd,
                                 forward_backward_ms=fwd_bwd, forward_tflops=flops / fwd / 1e9,
                                 forward_backward_tflops=3 * flops / fwd_bwd / 1e9))
            save(rows)
    os.environ.pop("ROASTFX_CONV", None)
    return rows


def conv_errors(fn, dense, x, dy, mapping, memory, scale, weight_shape, transposed):
    """(output, input gradient) of ``fn`` against the dense op (``dense(x, w)``) with the materialized weight:
    the largest difference over the largest reference value."""
    import torch

    from roastfx.codegen import reference

    def relative(got, want):
        return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()

    x = x.detach().requires_grad_()
    with torch.no_grad():
        view = reference.materialize(memory, mapping, scale).to(x.dtype)
        weight = (view if transposed else view.t()).reshape(weight_shape)
    want = dense(x, weight)
    (want_dx,) = torch.autograd.grad(want, x, dy)
    got = fn(x)
    (got_dx,) = torch.autograd.grad(got, x, dy)
    return relative(got, want), relative(got_dx, want_dx)


def print_table(rows):
    header = f"{'shape':<24}{'comp':>7}{'method':>10}{'fwd ms':>10}{'fwd TF/s':>10}{'f+b ms':>10}{'f+b TF/s':>10}" \
             f"{'vs dense fwd':>14}{'vs dense f+b':>14}"
    print(header)
    print("-" * len(header))
    dense = {(r["shape"], r["compression"]): r for r in rows if r["method"] == "dense"}
    for r in rows:
        d = dense[(r["shape"], r["compression"])]
        print(f"{r['shape']:<24}{r['compression']:>6g}x{r['method']:>10}{r['forward_ms']:>10.3f}"
              f"{r['forward_tflops']:>10.1f}{r['forward_backward_ms']:>10.3f}{r['forward_backward_tflops']:>10.1f}"
              f"{d['forward_ms'] / r['forward_ms']:>13.2f}x{d['forward_backward_ms'] / r['forward_backward_ms']:>13.2f}x")


def main(argv=None):
    run_script("bench_conv.py", parse_args, run, print_table, argv, prefix="conv-")


if __name__ == "__main__":
    main()
