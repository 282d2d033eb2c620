"""What the GPU benchmark scripts share: the issue's shapes, the timer, the environment record."""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time

SHAPES = {  # name: (M tokens, K in_features, N out_features)
    "decode-16x8192x8192": (16, 8192, 8192),
    "square-4096": (4096, 4096, 4096),
    "bert-attn-proj": (32 * 128, 768, 768),
    "bert-ffn-up": (32 * 128, 768, 3072),
    "bert-ffn-down": (32 * 128, 3072, 768),
}


def timer(dry_run: bool, l2: str = "cold"):
    """bench(fn, warmup_ms, rep_ms, grad_to_none=()) -> milliseconds.

    On a GPU, l2="cold": triton's do_bench, which clears the L2 cache before every timed call (weights
    and memory come from HBM); l2="warm": CUDA events around each call with nothing cleared between
    calls, so what fits in L2 stays there, as a ROAST memory shared by every layer does in a model (the
    cost model's assumption). Both: the median; ``grad_to_none`` tensors get .grad = None before each call
    (untimed), so a backward does not time an accumulation into an old gradient. A dry run: one host-timed
    call after one warm-up call (interpreter numbers mean nothing)."""
    if l2 not in ("cold", "warm"):
        raise ValueError(f"l2={l2!r}; accepted: cold, warm")
    if dry_run:
        def bench(fn, warmup, rep, grad_to_none=()):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return bench
    import torch
    import triton.testing

    if l2 == "cold":
        return lambda fn, warmup, rep, grad_to_none=(): triton.testing.do_bench(
            fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None, return_mode="median")

    def warm(fn, warmup, rep, grad_to_none=()):
        def call():
            for t in grad_to_none:
                t.grad = None
            fn()
        call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        for _ in range(max(1, int(warmup / once))):
            call()
        times = []
        for _ in range(max(5, int(rep / once))):
            for t in grad_to_none:
                t.grad = None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    return warm


def environment(**extra) -> dict:
    import torch
    import triton

    return dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), date=datetime.date.today().isoformat(), commit=_commit(), **extra,
    )


def _cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform says, else "cpu"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _commit() -> str | None:
    """The repository's commit, when it is a git checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def results_path(out: str, env: dict, prefix: str = "") -> str:
    """<out>/<prefix><device slug>-<date>.json, creating <out>."""
    os.makedirs(out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    return os.path.join(out, f"{prefix}{slug}-{env['date']}.json")


def select_device(dry_run: bool, script: str) -> None:
    """A dry run uses the Triton interpreter (set before any kernel module is imported);
    otherwise a CUDA device must be there."""
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"{script} times CUDA kernels and no CUDA device is available; "
                         "use --dry-run to check the script on CPU with the Triton interpreter")


def add_common_arguments(p, shapes: dict = SHAPES, compression: str = "10,100,1000") -> None:
    p.add_argument("--shapes", default=",".join(shapes), help=f"comma-separated names from {list(shapes)}")
    p.add_argument("--compression", default=compression, help="comma-separated compression factors")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--warmup", type=int, default=25, help="warmup time per measurement, ms")
    p.add_argument("--rep", type=int, default=100, help="measurement time per measurement, ms")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for the JSON results")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU in the Triton interpreter; no JSON")
    p.add_argument("--l2", default="cold", choices=("cold", "warm"),
                   help="cold: L2 cleared before every timed call (triton's do_bench); warm: not cleared")


def parse_common(p, argv, dry_run_shapes: dict, shapes: dict = SHAPES):
    """Parse, then check --shapes (names from ``shapes``) and --compression: args.shape_table and args.factors."""
    args = p.parse_args(argv)
    table = dry_run_shapes if args.dry_run else shapes
    names = list(table) if args.dry_run else [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in table]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {list(table)}")
    args.shape_table = {n: table[n] for n in names}
    args.factors = parse_factors(p, args.compression)
    return args


def parse_factors(p, text: str) -> list[float]:
    """--compression as numbers >= 1, or the parser's error (exit 2)."""
    try:
        factors = [float(c) for c in text.split(",") if c]
    except ValueError:
        p.error(f"--compression takes numbers, got {text!r}")
    if not factors or any(c < 1 for c in factors):
        p.error(f"compression factors must be >= 1, got {text!r}")
    return factors


def time_forward_backward(bench, fn, x, dy, warmup: int, rep: int, params=()) -> tuple[float, float]:
    """(forward ms without autograd, forward + backward ms into ``dy``) of ``fn(x)``; ``params``: the
    tensors ``fn`` trains, whose gradients are reset (untimed) before each call."""
    import torch

    xg = x.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            fn(x)

    def forward_backward():
        fn(xg).backward(dy)

    return bench(forward, warmup, rep), bench(forward_backward, warmup, rep, grad_to_none=[xg, *params])


def run_script(script: str, parse_args, run, print_table, argv=None, prefix: str = "") -> None:
    """What a timing script's main does: parse, pick the device, run, print the table, and (not in a dry
    run) write benchmarks/results/<prefix><gpu>-<date>.json with the environment and every row. ``run(args,
    save)`` calls ``save(rows)`` as rows come in, so a run cut short (a device session's time limit) leaves
    the rows it measured, marked ``"complete": false``."""
    import json

    args = parse_args(argv)
    select_device(args.dry_run, script)
    env = environment()
    path = None if args.dry_run else results_path(args.out, env, prefix)

    def save(rows, complete=False):
        if path is None:
            return
        with open(path, "w") as f:
            json.dump(dict(environment=env, dtype=args.dtype, l2=args.l2, warmup_ms=args.warmup, rep_ms=args.rep,
                           complete=complete, results=rows), f, indent=1)

    rows = run(args, save)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  dtype {args.dtype}")
    print_table(rows)
    if path is not None:
        save(rows, complete=True)
        print(f"wrote {path}")


def print_timing_table(rows, shape_width: int = 22) -> None:
    """The table the GEMM timing scripts print: per row its shape, compression, method, forward and forward +
    backward ms and TFLOP/s; a row with an ``error`` (a method that failed, or was skipped) says so instead."""
    width = max([11] + [len(r["method"]) + 1 for r in rows])
    header = (f"{'shape':<{shape_width}}{'comp':>7}{'method':>{width}}{'fwd ms':>10}{'fwd TF/s':>10}{'f+b ms':>10}"
              f"{'f+b TF/s':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        lead = f"{r['shape']:<{shape_width}}{r['compression']:>6g}x{r['method']:>{width}}"
        if "error" in r:
            print(f"{lead}  {'' if r['error'].startswith('skipped') else 'failed: '}{r['error'][:60]}")
            continue
        print(f"{lead}{r['forward_ms']:>10.3f}{r['forward_tflops']:>10.1f}{r['forward_backward_ms']:>10.3f}"
              f"{r['forward_backward_tflops']:>10.1f}")
