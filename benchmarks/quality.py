"""Accuracy at equal training: dense vs ROAST (global, local) vs HashedNet vs a small dense model.

    python benchmarks/quality.py                      # the default table (about 20 min on 2 cores)
    python benchmarks/quality.py --quick              # tiny sizes, one seed, a minute
    python benchmarks/quality.py --tasks digits --ratios 100x --seeds 0,1

Every method of a task trains with the same epochs, optimizer, schedule and seeds.
The small dense model is the largest model of the task's family whose parameter
count is at most the compressed model's (memory plus the biases and norms it
keeps dense). Writes benchmarks/results/quality-<date>.json, docs/results.md and
docs/quality.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_tasks as Q  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED: list[str] = []  # configurations roastfx refused, with its message
RECIPES: list[str] = []  # one line per task: epochs, lr, batch, memory lr multiplier
NOTES_MARKER = "<!-- notes: kept when the table is regenerated -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits,tweets,mnist", help="comma list of: " + ", ".join(Q.TASKS))
    p.add_argument("--ratios", default="10x,100x,1000x", help="comma list of compressions, e.g. 10x,100x")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--methods", default=",".join(Q.METHODS), help="comma list of: " + ", ".join(Q.METHODS))
    p.add_argument("--quick", action="store_true", help="tiny models and data, one seed: a smoke run")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--tile", default=None, help="hash tile for the ROAST schemes, e.g. 8x8 (default: the planner's)")
    p.add_argument("--no-memory-lr", action="store_true", help="train the memory with the plain learning rate")
    p.add_argument("--memory-lr-mult", type=float, default=None,
                   help="memory lr = mult * lr / median site scale (default: each task's, chosen on a validation split)")
    p.add_argument("--grad-scaling", default=Q.GRAD_SCALING, choices=("none", "site"),
                   help="roastfx grad_scaling of every compressed method (default %(default)s)")
    p.add_argument("--no-view-cache", action="store_true",
                   help="recompute every weight's sign and run starts at each forward and backward "
                        "(ROASTFX_VIEW_CACHE_MB=0; slower, same numbers)")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/quality-<date>.json)")
    p.add_argument("--markdown", default=os.path.join(ROOT, "docs", "results.md"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "quality.png"))
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.ratios = [r for r in args.ratios.split(",") if r]
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick and args.seeds == [0, 1, 2]:
        args.seeds = [0]
    for t in args.tasks:
        if t not in Q.TASKS:
            p.error(f"unknown task {t!r}; accepted: {', '.join(Q.TASKS)}")
    for m in args.methods:
        if m not in Q.METHODS:
            p.error(f"unknown method {m!r}; accepted: {', '.join(Q.METHODS)}")
    if args.tile:
        args.tile = tuple(int(x) for x in args.tile.lower().split("x"))
    return args


def run_task(args, task_name: str, log=print) -> list[dict]:
    runs = []
    task = Q.TASKS[task_name](quick=args.quick)
    mult = task.memory_lr_mult if args.memory_lr_mult is None else args.memory_lr_mult
    RECIPES.append(f"{task.name}: {task.epochs} epochs, lr {task.lr:g}, batch {task.batch_size}, memory lr x{mult:g}"
                   + (f", roast with own_window={task.own_window}" if task.own_window else ""))
    log(f"== {task.title}: {task.epochs} epochs, Adam lr {task.lr}, batch {task.batch_size}, "
        f"memory lr x{task.memory_lr_mult if args.memory_lr_mult is None else args.memory_lr_mult}, "
        f"grad_scaling {args.grad_scaling}")
    configs = [("dense", None)] if "dense" in args.methods else []
    configs += [(m, r) for r in args.ratios for m in args.methods if m != "dense"]
    for method, compression in configs:
        for seed in args.seeds:
            try:
                model, info = Q.make_model(task, method, compression, seed, tile=args.tile, grad_scaling=args.grad_scaling)
            except ValueError as e:  # e.g. a memory too small to give every site a window
                log(f"{task.name:7s} {method:12s} {compression or '-':6s} seed {seed}: SKIPPED: {e}")
                SKIPPED.append(f"{task.name} {method} {compression} seed {seed}: {e}")
                continue
            result = Q.train(task, model, seed, memory_lr_scale=not args.no_memory_lr, memory_lr_mult=args.memory_lr_mult)
            run = {"task": task.name, "title": task.title, "method": method, "compression": compression,
                   "seed": seed, **info, **result}
            runs.append(run)
            log(f"{task.name:7s} {method:12s} {compression or '-':6s} seed {seed}: acc {run['accuracy']:.4f} "
                f"params {run['params']:,} {run['wall_s_per_epoch']:.2f} s/epoch")
    return runs


def aggregate(runs: list[dict]) -> list[dict]:
    rows = {}
    for r in runs:
        rows.setdefault((r["task"], r["method"], r["compression"]), []).append(r)
    out = []
    for (task, method, compression), rs in rows.items():
        acc = np.array([r["accuracy"] for r in rs]) * 100
        out.append({
            "task": task, "title": rs[0]["title"], "method": method, "compression": compression,
            "n_seeds": len(rs), "acc_mean": float(acc.mean()), "acc_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
            "params": int(np.mean([r["params"] for r in rs])), "bytes": int(np.mean([r["bytes"] for r in rs])),
            "wall_s_per_epoch": float(np.mean([r["wall_s_per_epoch"] for r in rs])),
            "cpu_s_per_epoch": float(np.mean([r["cpu_s_per_epoch"] for r in rs])),
            "small_size": rs[0].get("small_size"), "memory_size": rs[0].get("memory_size"),
        })
    return out


def _find(rows, task, method, compression):
    return next((r for r in rows if r["task"] == task and r["method"] == method and r["compression"] == compression), None)


def check_targets(rows: list[dict]) -> list[tuple[str, str]]:
    """(target, verdict) for each target of the issue the table can answer."""
    checks = []

    def gap(task, compression, limit, label):
        dense, roast = _find(rows, task, "dense", None), _find(rows, task, "roast", compression)
        if dense and roast:
            d = dense["acc_mean"] - roast["acc_mean"]
            verdict = "met" if d <= limit else "MISSED"
            checks.append((label, f"{verdict}: dense {dense['acc_mean']:.2f}, ROAST {roast['acc_mean']:.2f} "
                                  f"({d:+.2f} points below dense)"))

    gap("tweets", "100x", 1.0, "BERT at 100x within 1 point of dense")
    gap("tweets", "1000x", 3.0, "BERT at 1000x within 3 points of dense")
    gap("digits", "100x", 2.0, "digits MLP at 100x within 2 points of dense")
    for r in rows:
        if r["method"] != "roast":
            continue
        local = _find(rows, r["task"], "roast-local", r["compression"])
        if local:
            ok = r["acc_mean"] >= local["acc_mean"]
            checks.append((f"{r['task']} {r['compression']}: global >= local",
                           f"{'met' if ok else 'MISSED'}: {r['acc_mean']:.2f} vs {local['acc_mean']:.2f}"))
        small = _find(rows, r["task"], "small-dense", r["compression"])
        if small and float(r["compression"].rstrip("x")) >= 100:
            ok = r["acc_mean"] > small["acc_mean"]
            checks.append((f"{r['task']} {r['compression']}: ROAST beats the equal-size small dense model",
                           f"{'met' if ok else 'MISSED'}: {r['acc_mean']:.2f} vs {small['acc_mean']:.2f} "
                           f"({small['params']:,} vs {r['params']:,} parameters)"))
    return checks


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def markdown(rows, checks, meta, notes: str) -> str:
    out = [
        "# Quality: dense vs ROAST vs HashedNet vs small dense",
        "",
        "Generated by `benchmarks/quality.py`; the section after the notes marker is written by hand.",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; wall time of the whole run: {meta['total_minutes']:.1f} min; tasks done: {', '.join(meta['tasks_done'])} of {', '.join(meta['tasks_asked'])}",
        f"- machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads",
        f"- seeds: {', '.join(map(str, meta['seeds']))}; accuracy is test accuracy in %, mean +- sample std over seeds",
        "- memory: bytes of every parameter the model holds. For a compressed model that is the ROAST memory "
        "plus everything left uncompressed (biases, LayerNorms), so it does not shrink by the full ratio. "
        "The BERT's word, position and token-type embeddings are nn.Embedding sites: they are compressed.",
        "- s/epoch: wall seconds per training epoch on CPU. The machine is shared with other workers running "
        "tests, so these times are noisy (a run can be several times slower than its neighbour); read them as "
        "rough. The compressed models recompute every weight from the memory at each forward "
        "(the PyTorch reference path), which is why they are slower than dense here.",
        "- every method of a task trains with the same epochs, Adam, cosine schedule, learning rate and seeds "
        f"({meta['recipes']}). The ROAST memory gets mult * lr / (median site scale), with the task's mult "
        "chosen on a validation split carved from the training data (`--memory-lr-mult`, `--no-memory-lr`); "
        f"every compressed method is built with `grad_scaling=\"{meta['grad_scaling']}\"`. "
        "Compressed models start from `init=\"random\"`.",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        trs = [r for r in rows if r["task"] == task]
        out += [f"## {trs[0]['title']}", "",
                "| method | compression | params | memory | accuracy % | s/epoch |",
                "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in trs:
            label = r["method"]
            if r["method"] == "small-dense":
                label += f" (size {r['small_size']})"
            out.append(f"| {label} | {r['compression'] or '1x'} | {r['params']:,} | {_bytes(r['bytes'])} | "
                       f"{r['acc_mean']:.2f} +- {r['acc_std']:.2f} | {r['wall_s_per_epoch']:.2f} |")
        out.append("")
    out += ["## Targets of the issue", "", "| target | result |", "| --- | --- |"]
    out += [f"| {t} | {v} |" for t, v in checks]
    if meta["skipped"]:
        out += ["", "Configurations roastfx refused (not in the table):", ""] + [f"- {s}" for s in meta["skipped"]]
    out += ["", "![accuracy vs memory](quality.png)", "", NOTES_MARKER, notes.rstrip() + "\n"]
    return "\n".join(out)


def plot(rows, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        trs = [r for r in rows if r["task"] == task]
        for method in Q.METHODS:
            pts = sorted((r["bytes"], r["acc_mean"], r["acc_std"]) for r in trs if r["method"] == method)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("model memory (bytes)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(trs[0]["title"], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _existing_notes(path: str) -> str:
    if os.path.exists(path):
        text = open(path).read()
        if NOTES_MARKER in text:
            return text.split(NOTES_MARKER, 1)[1].strip()
    return "## Notes\n\n(none yet)"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    date = datetime.date.today().isoformat()
    json_path = args.json or os.path.join(ROOT, "benchmarks", "results", f"quality-{date}.json")
    from roastfx.codegen import runs as torch_path

    cache = torch_path.VIEW_CACHE
    if args.no_view_cache:  # the PyTorch path's per-mapping cache off (ROASTFX_VIEW_CACHE_MB=0)
        torch_path.VIEW_CACHE = torch_path.ViewCache(0)
    runs = []
    try:
        for task_name in args.tasks:  # outputs are rewritten after each task, so a cut run keeps its tables
            runs += run_task(args, task_name)
            rows, checks = write_outputs(args, argv, runs, started, json_path)
    finally:
        torch_path.VIEW_CACHE = cache
    for t, v in checks:
        print(f"{t}: {v}")
    print(f"wrote {json_path}" + (f", {args.markdown}" if args.markdown else "") + (f", {args.plot}" if args.plot else ""))
    return rows


def write_outputs(args, argv, runs, started, json_path):
    rows = aggregate(runs)
    checks = check_targets(rows)
    meta = {
        "command": "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "total_minutes": (time.time() - started) / 60,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'})",
        "torch": torch.__version__, "threads": args.threads, "seeds": args.seeds, "quick": args.quick,
        "skipped": list(SKIPPED), "grad_scaling": args.grad_scaling, "memory_lr_mult": args.memory_lr_mult,
        "recipes": "; ".join(RECIPES), "tasks_done": list(dict.fromkeys(r["task"] for r in runs)), "tasks_asked": args.tasks,
    }
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": checks, "runs": runs}, f, indent=1)
    if args.markdown:
        os.makedirs(os.path.dirname(args.markdown), exist_ok=True)
        text = markdown(rows, checks, meta, _existing_notes(args.markdown))
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot:
        plot(rows, args.plot)
    return rows, checks


if __name__ == "__main__":
    main()
