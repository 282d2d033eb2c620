"""The PyTorch path on a CPU: each eager read of a compressed weight beside the way it was read before and
beside the dense layer, side by side in one run (median of repeats, one thread).

    python benchmarks/bench_cpu.py            # table + benchmarks/results/cpu-<cpu>-<date>.json
    python benchmarks/bench_cpu.py --quick    # tiny shapes, no JSON (checks the script)

Cases, each forward + backward of one layer at 100x:
- embedding: a BERT-base word table (30,522 x 768), 8 x 128 ids. ``rows``: the compressed module as it
  runs now (only the looked-up rows read from the memory, `RoastState.rows`); ``whole table``: the weight
  read whole, then ``F.embedding`` (what the module did before); ``dense``: nn.Embedding.
- linear: the quickstart's 512 x 512 layer at 64 rows, and a BERT-base FFN (768 -> 3072) at 8 x 128
  tokens. ``eager``: the compressed module as it runs now (`ops.EagerMaterialize`); ``custom op``: the
  same read through ``roastfx::materialize``'s dispatch, as the module read it before (the gather itself
  is this commit's in both); ``dense``: nn.Linear.
- repeated reads within one forward: an nn.LSTMCell (512 -> 512) stepped 16 times in Python over a batch of
  16, and a stacked experts weight (8 experts, 256 -> 1024) indexed per expert in a Python loop over 64
  tokens (each token picks one expert), as transformers' ``experts_implementation="eager"`` does.
  ``shared``: the model as it runs now (a site the previous forward read more than once is read once per
  forward, `RoastState.kept_read`); ``every use``: each use reading the memory (as before); ``dense``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, results_path  # noqa: E402

CASES = {  # name: (kind, rows of the input, in, out)
    "embedding-bert-base-words": ("embedding", 8 * 128, 30522, 768),
    "linear-quickstart-512": ("linear", 64, 512, 512),
    "linear-bert-ffn-up": ("linear", 8 * 128, 768, 3072),
    "lstmcell-16-steps": ("cell-loop", 16, 512, 512),
    "experts-loop-8": ("experts-loop", 64, 256, 1024),
}
QUICK_CASES = {
    "embedding-tiny": ("embedding", 24, 300, 40),
    "linear-tiny": ("linear", 16, 48, 40),
    "lstmcell-tiny": ("cell-loop", 4, 24, 32),
    "experts-loop-tiny": ("experts-loop", 12, 24, 40),
}
STEPS, EXPERTS = 16, 8  # the cell loop's steps; the experts loop's experts


def _loop_models(kind: str, d_in: int, d_out: int):
    """(dense model class, its constructor args, example input maker) of a repeated-reads case."""
    import torch
    from torch import nn

    class CellLoop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.LSTMCell(d_in, d_out)

        def forward(self, x):
            h = c = x.new_zeros(x.shape[1], d_out)
            for t in range(x.shape[0]):
                h, c = self.cell(x[t], (h, c))
            return h

    class ExpertsLoop(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(EXPERTS, d_out, d_in) / d_in ** 0.5)

        def forward(self, x, pick):
            out = x.new_zeros(x.shape[0], d_out)
            for e in range(EXPERTS):
                rows = (pick == e).nonzero().squeeze(1)
                out = out.index_add(0, rows, x[rows] @ self.w[e].t())
            return out

    return CellLoop if kind == "cell-loop" else ExpertsLoop


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, no JSON")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per method (the median is reported)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: caches filled, allocations made
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def methods(kind: str, rows: int, d_in: int, d_out: int):
    """{method: a forward + backward step}, the compressed ones first."""
    import torch
    from torch import nn

    import roastfx
    from roastfx.codegen import ops

    gen = torch.Generator().manual_seed(0)
    if kind == "embedding":
        dense = nn.Embedding(d_in, d_out)
        ids = torch.randint(0, d_in, (rows,), generator=gen)
        model = roastfx.compress(nn.Embedding(d_in, d_out), "100x", init="random")
        calls = {
            "rows": lambda: model(ids),
            "whole table": lambda: nn.functional.embedding(ids, model.weight),
            "dense": lambda: dense(ids),
        }
    elif kind in ("cell-loop", "experts-loop"):
        from roastfx.state import RoastState

        cls = _loop_models(kind, d_in, d_out)
        if kind == "cell-loop":
            inputs = (torch.randn(STEPS, rows, d_in, generator=gen),)
        else:
            inputs = (torch.randn(rows, d_in, generator=gen), torch.randint(0, EXPERTS, (rows,), generator=gen))
        torch.manual_seed(0)
        dense = cls()
        model = roastfx.compress(cls(), "100x", init="random", example_inputs=inputs)

        def every_use():
            keep = RoastState.keep_read
            RoastState.keep_read = lambda self, site, weight: None  # each use reads the memory
            try:
                return model(*inputs)
            finally:
                RoastState.keep_read = keep

        calls = {"shared": lambda: model(*inputs), "every use": every_use, "dense": lambda: dense(*inputs)}
    else:
        dense = nn.Linear(d_in, d_out)
        x = torch.randn(rows, d_in, generator=gen)
        model = roastfx.compress(nn.Linear(d_in, d_out), "100x", init="random")
        state = roastfx.roast_state(model)
        site = state.plan.sites[0]

        def custom_op():
            view = ops.materialize(model.roast_memory, ops.mapping_args(site.mapping), site.scale)
            weight = view.t() if site.transposed else view
            return nn.functional.linear(x, weight.reshape(site.shape), model.bias)

        calls = {"eager": lambda: model(x), "custom op": custom_op, "dense": lambda: dense(x)}

    def step(call, params):
        def run():
            for p in params:
                p.grad = None
            call().square().mean().backward()
        return run

    return {name: step(call, list((dense if name == "dense" else model).parameters()))
            for name, call in calls.items()}


def run(args) -> dict:
    import torch

    torch.set_num_threads(1)
    cases = QUICK_CASES if args.quick else CASES
    repeats = 2 if args.quick else args.repeats
    results = {}
    print(f"{'case':<28}{'method':<14}{'fwd+bwd ms':>12}{'vs previous':>13}{'vs dense':>10}")
    for name, (kind, rows, d_in, d_out) in cases.items():
        timed = {m: median_ms(fn, repeats) for m, fn in methods(kind, rows, d_in, d_out).items()}
        now, before, dense = list(timed)
        results[name] = dict(kind=kind, rows=rows, d_in=d_in, d_out=d_out, ms=timed,
                             speedup_vs_previous=timed[before] / timed[now], vs_dense=timed[now] / timed[dense])
        for method, ms in timed.items():
            vs_prev = f"{timed[before] / ms:.2f}x" if method == now else ""
            vs_dense = f"{ms / timed[dense]:.2f}" if method != dense else ""
            print(f"{name:<28}{method:<14}{ms:>12.3f}{vs_prev:>13}{vs_dense:>10}")
    env = environment(threads=1, repeats=repeats)
    out = dict(environment=env, cases=results,
               note="median ms of forward + backward of one layer, compressed 100x; 'vs previous': how many times "
                    "faster than the read it replaced; 'vs dense': time over the dense layer's")
    if not args.quick:
        path = results_path(args.out, env, prefix="cpu-")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {path}")
    return out


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
