"""Why does global ROAST sharing fail on the BERT task, and what fixes it? One seed per line.

    python benchmarks/quality_bert_ablation.py                       # the exclusion variants, test split
    python benchmarks/quality_bert_ablation.py --split val --grad-scaling none,site --memory-lr-mult 1,3,10
    python benchmarks/quality_bert_ablation.py --task digits --split val --schemes roast,roast-local,hashednet

Uses the tasks of benchmarks/quality_tasks.py (same model, data, optimizer and memory
learning-rate rule as benchmarks/quality.py). ``--split val`` trains on the training
split minus its last ``--n-val`` examples and scores on those, so recipe choices
never look at the test split. Prints one line per run and a markdown table.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_tasks as Q  # noqa: E402

import roastfx  # noqa: E402

HEAD = ("*classifier*", "*pooler*")
EMBEDDINGS = ("*embeddings.*",)
VARIANTS = {  # name: weights kept dense (not compressed)
    "all compressed": (),
    "type+position embeddings dense": ("*token_type_embeddings*", "*position_embeddings*"),
    "embeddings dense": EMBEDDINGS,
    "pooler+classifier dense": HEAD,
    "pooler+classifier+embeddings dense": HEAD + EMBEDDINGS,
    "only the FFN compressed": HEAD + EMBEDDINGS + ("*attention*",),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="tweets", choices=sorted(Q.TASKS))
    p.add_argument("--compression", default="100x")
    p.add_argument("--seeds", default="0")
    p.add_argument("--schemes", default="roast", help="comma list of roast, roast-local, hashednet, dense")
    p.add_argument("--variants", default="all compressed", help="';'-separated names of: " + "; ".join(VARIANTS)
                   + " (or 'all')")
    p.add_argument("--grad-scaling", default="none,site", help="comma list of roastfx grad_scaling values")
    p.add_argument("--memory-lr-mult", default="task", help="comma list of multipliers of the memory learning rate "
                   "(memory lr = mult * lr / median site scale; default: the task's own, as in quality.py)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the task's)")
    p.add_argument("--lr", default="task", help="comma list of Adam learning rates (default: the task's)")
    p.add_argument("--tile", default=None, help="hash tile for the ROAST schemes, e.g. 8x8")
    p.add_argument("--chunk", type=int, default=None, help="ROBE chunk of the embedding sites (planner default 32)")
    p.add_argument("--slot-scaler", default="none", help="comma list of: none, v1, v4: a FakeRoast-style static "
                   "per-slot divisor of the memory gradient (v1: (sum of scales)^2 / count, v4: sqrt(sum of scales^2))")
    p.add_argument("--init-scale", default="1", help="comma list: the random memory is multiplied by this")
    p.add_argument("--own-window", default="", help="comma list of name patterns passed to roastfx.compress(own_window=...) "
                   "for scheme roast (the product's version of --isolate; the table uses it)")
    p.add_argument("--isolate", default="", help="comma list of name patterns: with scheme roast, these sites get their "
                   "own window at the end of the memory (share of their dense size, per-element hashing) while the "
                   "rest share the remaining slots globally; equal memory. A planner experiment, not a roastfx option")
    p.add_argument("--hidden", type=int, default=None, help="the tweets BERT's hidden size (default 64)")
    p.add_argument("--layers", type=int, default=None, help="the tweets BERT's layers (default 2)")
    p.add_argument("--dropout", default="task", help="comma list of dropout probabilities set on every nn.Dropout of "
                   "the model (default: the task's, 0.1 in the tweets BERT)")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--n-val", type=int, default=0, help="validation examples (default: the test split's size)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.schemes = args.schemes.split(",")
    args.variants = list(VARIANTS) if args.variants == "all" else args.variants.split(";")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; accepted: {'; '.join(VARIANTS)}")
    args.grad_scaling = args.grad_scaling.split(",")
    args.memory_lr_mult = [None if x == "task" else float(x) for x in args.memory_lr_mult.split(",")]
    args.lr = [None if x == "task" else float(x) for x in args.lr.split(",")]
    args.slot_scaler = args.slot_scaler.split(",")
    args.init_scale = [float(x) for x in args.init_scale.split(",")]
    args.dropout = [None if x == "task" else float(x) for x in args.dropout.split(",")]
    args.tile = tuple(int(x) for x in args.tile.lower().split("x")) if args.tile else None
    return args


def isolate_sites(state, patterns) -> str:
    """Move the sites matching ``patterns`` into one window at the end of the memory (the rest keep sharing)."""
    import dataclasses
    import fnmatch

    plan = state.plan
    iso = [s for s in plan.sites if any(fnmatch.fnmatch(s.name, p) for p in patterns)]
    if not iso:
        return "no site matched"
    share = sum(s.numel for s in iso) / plan.dense_numel
    size = max(1, round(plan.memory_size * share))
    rest = plan.memory_size - size
    sites = []
    for s in plan.sites:
        m = s.mapping
        if s in iso:
            m = dataclasses.replace(m, tile_rows=1, tile_cols=1, alignment=1, window_start=rest, window_size=size)
        else:
            m = dataclasses.replace(m, window_size=rest)
        sites.append(dataclasses.replace(s, mapping=m))
    state.replace_plan(dataclasses.replace(plan, sites=tuple(sites)))
    return f"{len(iso)} sites in the last {size} slots"


def slot_divisor(plan, kind: str) -> torch.Tensor:
    """FakeRoast's idea, written from its description: a fixed per-slot divisor of the memory gradient
    from how many weights (count) of which scale land on each slot."""
    count = torch.zeros(plan.memory_size, dtype=torch.float64)
    scale_sum = torch.zeros_like(count)
    scale2_sum = torch.zeros_like(count)
    for site in plan.sites:
        index = site.mapping.full_index()[0].reshape(-1)
        ones = torch.ones(index.numel(), dtype=torch.float64)
        count.index_add_(0, index, ones)
        scale_sum.index_add_(0, index, ones * site.scale)
        scale2_sum.index_add_(0, index, ones * site.scale**2)
    if kind == "v1":
        d = scale_sum.square() / (count + 1e-3)
    elif kind == "v4":
        d = scale2_sum.sqrt()
    else:
        raise ValueError(f"slot scaler {kind!r}: accepted none, v1, v4")
    return torch.where(d > 0, d, torch.ones_like(d)).to(torch.float32)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    sizes = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers)) if v}
    if sizes and args.task != "tweets":
        raise SystemExit(f"--hidden/--layers size the tweets BERT; task {args.task!r} has no such option")
    task = Q.TASKS[args.task](quick=False, **sizes)
    if args.split == "val":
        task = Q.validation_task(task, args.n_val or len(task.data[1][-1]))
    if args.epochs:
        task.epochs = args.epochs
    print(f"# {task.title}; {task.epochs} epochs; {args.compression}; scored on the {args.split} split ({len(task.data[1][-1])} examples)")
    rows = []
    base_lr = task.lr
    for scheme, variant, gs, lr, mult, scaler, init_scale, dropout, seed in itertools.product(
            args.schemes, args.variants, args.grad_scaling, args.lr, args.memory_lr_mult, args.slot_scaler,
            args.init_scale, args.dropout, args.seeds):
        if scheme == "dense" and (gs, mult, variant, scaler, init_scale) != (
                args.grad_scaling[0], args.memory_lr_mult[0], args.variants[0], args.slot_scaler[0], args.init_scale[0]):
            continue  # dense has no memory: one run per learning rate and seed
        torch.manual_seed(seed)
        task.lr = base_lr if lr is None else lr
        if scheme == "dense":
            model, slots = task.build(), 0
        else:
            options = {"tile": args.tile} if args.tile and scheme != "hashednet" else {}
            if args.chunk and scheme != "hashednet":
                options["chunk"] = args.chunk
            if args.own_window and scheme == "roast":
                options["own_window"] = tuple(args.own_window.split(","))
            model = roastfx.compress(task.build(), args.compression, seed=seed, init="random", scheme=scheme,
                                     exclude=VARIANTS[variant], grad_scaling=gs, **options)
            state = roastfx.roast_state(model)
            slots = state.plan.memory_size
            if args.isolate and scheme == "roast":
                variant_note = isolate_sites(state, args.isolate.split(","))
            with torch.no_grad():
                state.memory.mul_(init_scale)
            if scaler != "none":
                divisor = slot_divisor(state.plan, scaler)
                state.memory.register_hook(lambda g, d=divisor: g / d)
        if dropout is not None:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = dropout
        start = time.perf_counter()
        result = Q.train(task, model, seed=seed, memory_lr_mult=mult)
        extra = (f", tile {args.tile[0]}x{args.tile[1]}" if args.tile and scheme != "hashednet" else "") + (
            f", chunk {args.chunk}" if args.chunk and scheme != "hashednet" else "") + (
            f", {args.isolate} isolated ({variant_note})" if args.isolate and scheme == "roast" else "") + (
            f", own_window {args.own_window}" if args.own_window and scheme == "roast" else "") + (
            f", slot scaler {scaler}" if scaler != "none" else "") + (
            f", init x{init_scale:g}" if init_scale != 1 else "") + (
            f", dropout {dropout:g}" if dropout is not None else "")
        row = (scheme, variant + extra, gs, f"{task.lr:g}, {task.memory_lr_mult if mult is None else mult:g}", seed, slots,
               sum(p.numel() for p in model.parameters()), 100 * result["accuracy"], result["losses"][-1])
        rows.append(row)
        print(" ".join(map(str, row)), f"{time.perf_counter() - start:.0f}s", flush=True)
    print("\n| scheme | variant | grad_scaling | lr, memory lr mult | seed | memory slots | parameters | accuracy % | last train loss |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:,} | {r[7]:.2f} | {r[8]:.3f} |")
    return rows


if __name__ == "__main__":
    main()
