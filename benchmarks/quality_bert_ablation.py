"""Which BERT weights break global ROAST sharing on the tweets task? One seed, 100x, by exclusion.

    python benchmarks/quality_bert_ablation.py [variant ...]    (default: all variants)

Uses the tweets task of benchmarks/quality_tasks.py (same model, data, optimizer and
memory learning rate as benchmarks/quality.py); prints one line per variant.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import quality_tasks as Q  # noqa: E402

import roastfx  # noqa: E402

HEAD = ("*classifier*", "*pooler*")
EMBEDDINGS = ("*embeddings.*",)
VARIANTS = {
    "global": ((), "roast"),
    "local": ((), "roast-local"),
    "global, type+position embeddings dense": (("*token_type_embeddings*", "*position_embeddings*"), "roast"),
    "global, embeddings dense": (EMBEDDINGS, "roast"),
    "global, head dense": (HEAD, "roast"),
    "global, head+embeddings dense": (HEAD + EMBEDDINGS, "roast"),
    "global, only FFN compressed": (HEAD + EMBEDDINGS + ("*attention*",), "roast"),
}


def main(names):
    torch.set_num_threads(1)
    Q.cache_mapping_indices()
    task = Q.TASKS["tweets"](quick=False)
    print(f"{'variant':42s} {'memory':>7s} {'params':>8s} {'accuracy':>8s} {'seconds':>7s}")
    for name in names or VARIANTS:
        exclude, scheme = VARIANTS[name]
        torch.manual_seed(0)
        model = roastfx.compress(task.build(), "100x", seed=0, init="random", exclude=exclude, scheme=scheme)
        start = time.perf_counter()
        result = Q.train(task, model, seed=0)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:42s} {roastfx.roast_state(model).plan.memory_size:7d} {params:8d} "
              f"{100 * result['accuracy']:8.2f} {time.perf_counter() - start:7.0f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
