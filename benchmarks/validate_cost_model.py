"""Check the planner's cost model against measured kernel times (issue: planner, item 3).

    python benchmarks/validate_cost_model.py                  # CUDA: table + benchmarks/results/costmodel-<gpu>-<date>.json
    python benchmarks/validate_cost_model.py --dry-run        # CPU: tiny shape in the Triton interpreter, checks wiring

For each benchmark shape (the kernels issue's shapes) and compression, one nn.Linear
site is laid out with several (tile, alignment) candidates: the cost-model planner's
choice, the default planner's fixed rule, and a spread of the other candidates the
planner scored. Each layout's fused ROAST kernel is timed (forward, and forward +
backward) and set beside the cost model's prediction for the same layout, profile and
token count. Reported per shape: the rank correlation of predicted and measured times,
the error of each prediction after one scale fitted over the whole run (the model
ranks layouts; its absolute level is a datasheet roofline), and whether the planner's
choice beat the default rule on measured time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_arguments, environment, parse_common, results_path, select_device, timer  # noqa: E402

DRY_RUN_SHAPES = {"tiny": (40, 96, 64)}
MODES = ("infer", "train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    # the cost model counts a memory that fits in L2 as served from it, as in a model whose layers share it
    p.set_defaults(l2="warm")
    p.add_argument("--target", default=None, help="hardware profile for the predictions (default: detected)")
    p.add_argument("--layouts", type=int, default=6, help="other scored candidates timed per shape, besides the two")
    args = parse_common(p, argv, DRY_RUN_SHAPES)
    if args.layouts < 0:
        p.error(f"--layouts must be >= 0, got {args.layouts}")
    return args


def layouts_to_time(spec, window, profile, memory_size, tokens, extra):
    """[(label, (tile_rows, tile_cols, alignment))]: the planner's choice, the default rule, and
    ``extra`` other candidates spread over the predicted-time ranking."""
    from roastfx.passes.cost_model import Layout, geometry, predicted_time
    from roastfx.passes.plan_cost import candidates, choose_layout
    from roastfx.passes.plan_layout import choose_tile, view_shape

    rows, cols = view_shape(spec)
    line = profile.alignment_elements(4)
    chosen = choose_layout(spec, window, profile, memory_size=memory_size, memory_itemsize=4)
    default = choose_tile(rows, cols, spec.op, window[1], line)
    out = [("planner", chosen), ("default", tuple(default))]
    others = []
    for c in candidates(rows, cols, spec.op, window, line):
        if c in (chosen, tuple(default)):
            continue
        g = geometry(Layout(rows, cols, *c, *window), spec.op, spec.dtype, profile, memory_size=memory_size,
                     memory_itemsize=4)
        others.append((predicted_time(g, profile, tokens), c))
    others.sort()
    if others and extra:
        step = max(1, len(others) // extra)
        out += [("candidate", c) for _, c in others[::step][:extra]]
    return out


def predict(spec, layout, window, profile, memory_size, tokens):
    from roastfx.passes.cost_model import Layout, geometry, predicted_time
    from roastfx.passes.plan_layout import view_shape

    rows, cols = view_shape(spec)
    g = geometry(Layout(rows, cols, *layout, *window), spec.op, spec.dtype, profile, memory_size=memory_size,
                 memory_itemsize=4)
    return {mode: predicted_time(g, profile, tokens, mode) for mode in MODES}


def run(args, save=lambda rows: None):
    import torch

    from roastfx.codegen.kernels import roast_linear
    from roastfx.passes.capture_sites import SiteSpec
    from roastfx.passes.plan_layout import make_site
    from roastfx.profiles import get_profile

    device = "cpu" if args.dry_run else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    profile = get_profile(args.target)
    bench = timer(args.dry_run, args.l2)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, (M, K, N) in args.shape_table.items():
        spec = SiteSpec(name, (name,), (N, K), "linear", True, str(dtype).removeprefix("torch."))
        x = torch.randn(M, K, device=device, dtype=dtype, generator=gen)
        dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
        for factor in args.factors:
            memory_size = max(int(K * N / factor), 2)
            window = (0, memory_size)
            memory = torch.randn(memory_size, device=device, dtype=torch.float32, generator=gen).requires_grad_()
            for label, layout in layouts_to_time(spec, window, profile, memory_size, M, args.layouts):
                site = make_site(spec, 1 / K**0.5, 1, layout[:2], layout[2], window)
                xg = x.clone().requires_grad_()

                def forward():
                    with torch.no_grad():
                        roast_linear(x, memory, site.mapping, site.scale, True)

                def forward_backward():
                    roast_linear(xg, memory, site.mapping, site.scale, True).backward(dy)

                measured = {"infer": bench(forward, args.warmup, args.rep),
                            "train": bench(forward_backward, args.warmup, args.rep, grad_to_none=[xg, memory])}
                predicted = predict(spec, layout, window, profile, memory_size, M)
                rows.append(dict(shape=name, M=M, K=K, N=N, compression=factor, memory_size=memory_size,
                                 layout=label, tile=list(layout[:2]), alignment=layout[2],
                                 predicted_ms={m: 1e3 * t for m, t in predicted.items()}, measured_ms=measured))
            save(rows)
    return rows, profile.name


def spearman(a, b):
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    if len(a) < 3:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def summarize(rows):
    """Per (shape, compression, mode): rank correlation, planner vs default; and one fitted scale per mode."""
    summary = {"groups": [], "fitted_scale": {}, "median_abs_log2_error": {}}
    for mode in MODES:
        logs = [math.log(r["measured_ms"][mode] / r["predicted_ms"][mode]) for r in rows if r["predicted_ms"][mode] > 0]
        scale = math.exp(sum(logs) / len(logs)) if logs else float("nan")
        errs = sorted(abs(math.log2(r["measured_ms"][mode] / (scale * r["predicted_ms"][mode]))) for r in rows
                      if r["predicted_ms"][mode] > 0)
        summary["fitted_scale"][mode] = scale
        summary["median_abs_log2_error"][mode] = errs[len(errs) // 2] if errs else float("nan")
    keys = sorted({(r["shape"], r["compression"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for shape, comp in keys:
        group = [r for r in rows if (r["shape"], r["compression"]) == (shape, comp)]
        by = {r["layout"]: r for r in group}
        for mode in MODES:
            pred = [r["predicted_ms"][mode] for r in group]
            meas = [r["measured_ms"][mode] for r in group]
            planner, default = by["planner"]["measured_ms"][mode], by["default"]["measured_ms"][mode]
            summary["groups"].append(dict(shape=shape, compression=comp, mode=mode, layouts=len(group),
                                          spearman=spearman(pred, meas), planner_ms=planner, default_ms=default,
                                          planner_speedup_over_default=default / planner,
                                          best_measured_ms=min(meas)))
    return summary


def print_report(rows, summary, env):
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  profile {env['profile']}")
    head = f"{'shape':<22}{'comp':>7}{'layout':>10}{'tile':>9}{'align':>6}" \
           f"{'pred fwd':>10}{'meas fwd':>10}{'pred f+b':>10}{'meas f+b':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['shape']:<22}{r['compression']:>6g}x{r['layout']:>10}{'x'.join(map(str, r['tile'])):>9}"
              f"{r['alignment']:>6}{r['predicted_ms']['infer']:>10.4f}{r['measured_ms']['infer']:>10.4f}"
              f"{r['predicted_ms']['train']:>10.4f}{r['measured_ms']['train']:>10.4f}")
    print("\nper shape (ms measured):")
    print(f"{'shape':<22}{'comp':>7}{'mode':>6}{'spearman':>9}{'planner':>10}{'default':>10}{'speedup':>8}{'best':>10}")
    for g in summary["groups"]:
        print(f"{g['shape']:<22}{g['compression']:>6g}x{g['mode']:>6}{g['spearman']:>9.2f}{g['planner_ms']:>10.4f}"
              f"{g['default_ms']:>10.4f}{g['planner_speedup_over_default']:>8.2f}{g['best_measured_ms']:>10.4f}")
    for mode in MODES:
        print(f"{mode}: measured = {summary['fitted_scale'][mode]:.3g} x predicted (geometric mean); median "
              f"|log2 error| after that scale: {summary['median_abs_log2_error'][mode]:.2f}")


def main(argv=None):
    args = parse_args(argv)
    select_device(args.dry_run, "validate_cost_model.py")
    env = environment(profile=args.target)
    path = None if args.dry_run else results_path(args.out, env, prefix="costmodel-")

    def save(rows, summary=None):  # after each (shape, compression): a run cut short keeps what it measured
        if path is not None:
            with open(path, "w") as f:
                json.dump(dict(environment=env, dtype=args.dtype, complete=summary is not None, results=rows,
                               summary=summary), f, indent=1)

    rows, profile = run(args, save)
    summary = summarize(rows)
    env["profile"] = profile
    print_report(rows, summary, env)
    if path is not None:
        save(rows, summary)
        print(f"wrote {path}")
    return rows, summary


if __name__ == "__main__":
    main()
