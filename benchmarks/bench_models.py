"""Whole models, dense against ROAST: inference and training step time, parameter and peak memory.

    python benchmarks/bench_models.py                # CUDA: BERT-base, GPT-2 small, ResNet-50 from their configs
    python benchmarks/bench_models.py --dry-run      # CPU: tiny configs, aot_eager, checks wiring only

Variants of each model (transformers, built from a config: no weights are downloaded; ResNet-50 on
224x224 images, its convs the implicit-GEMM kernels):
  dense          eager PyTorch
  dense-compile  torch.compile with inductor
  roast-<c>x     roastfx.compress(model, "<c>x") then torch.compile(backend="roast"): every weight read
                 is a fused ROAST kernel, the dense weights never exist
Per variant: inference (no_grad forward) and training step (forward, backward, AdamW step) times,
the median of --steps timed iterations after warm-up (compiles included in warm-up, not in the
times); parameter bytes; peak CUDA memory of the training step. Ratios are against dense-compile
measured in the same run. JSON: benchmarks/results/models-<models>-<gpu>-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, parse_factors, results_path, select_device  # noqa: E402

MODELS = {  # name: (batch, sequence length or image size)
    "bert-base": (32, 128),
    "gpt2-small": (8, 512),
    "resnet50": (32, 224),
}
DRY_RUN_MODELS = {"bert-tiny": (2, 16), "gpt2-tiny": (2, 16), "resnet-tiny": (2, 32)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated names from {list(MODELS)}")
    p.add_argument("--compression", default="10,100", help="comma-separated compression factors")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype of the runs")
    p.add_argument("--steps", type=int, default=10, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compiles happen here)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--dry-run", action="store_true", help="tiny configs on CPU with aot_eager; no JSON")
    args = p.parse_args(argv)
    table = DRY_RUN_MODELS if args.dry_run else MODELS
    names = list(table) if args.dry_run else [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in table]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(table)}")
    args.model_table = {n: table[n] for n in names}
    args.factors = parse_factors(p, args.compression)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    return args


def build(name: str):
    """(model, inputs) from a transformers config; ``inputs(batch, size, device, generator)`` gives the forward's
    keyword arguments, ``labels`` (for the training loss) included."""
    try:
        import transformers as tf
    except ImportError:
        raise SystemExit("bench_models.py builds its models with transformers, which is not installed here") from None
    import torch

    def tokens(vocab):
        def inputs(batch, seq, device, gen):
            ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
            return dict(input_ids=ids, labels=ids)
        return inputs

    if name.startswith("bert"):
        tiny = name == "bert-tiny"
        config = tf.BertConfig(num_hidden_layers=2 if tiny else 12, hidden_size=32 if tiny else 768,
                               num_attention_heads=2 if tiny else 12, intermediate_size=64 if tiny else 3072,
                               vocab_size=101 if tiny else 30522, max_position_embeddings=64 if tiny else 512)
        return tf.BertForMaskedLM(config), tokens(config.vocab_size)
    if name.startswith("resnet"):
        tiny = name == "resnet-tiny"
        config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10) if tiny \
            else tf.ResNetConfig(num_labels=1000)  # the defaults are ResNet-50's

        def images(batch, size, device, gen):
            return dict(pixel_values=torch.randn(batch, 3, size, size, device=device, generator=gen),
                        labels=torch.randint(0, config.num_labels, (batch,), device=device, generator=gen))
        return tf.ResNetForImageClassification(config), images
    tiny = name == "gpt2-tiny"
    config = tf.GPT2Config(n_layer=2 if tiny else 12, n_embd=32 if tiny else 768, n_head=2 if tiny else 12,
                           vocab_size=101 if tiny else 50257, n_positions=64 if tiny else 1024)
    return tf.GPT2LMHeadModel(config), tokens(config.vocab_size)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(fn, steps: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``steps`` calls after ``warmup`` untimed ones."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(args, save=None):
    import torch

    import roastfx
    from roastfx.backend import roast_backend

    cuda = not args.dry_run
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    inner = "aot_eager" if args.dry_run else "inductor"
    rows = []
    for name, (batch, seq) in args.model_table.items():
        # the comparisons that matter first (dense-compile is the baseline), so a timeout loses the least
        roast = [f"roast-{c:g}x" for c in args.factors]
        variants = ["dense-compile", *roast[:1], "dense", *roast[1:]]
        for variant in variants:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model, make_inputs = build(name)
            if variant.startswith("roast"):
                roastfx.compress(model, variant.split("-")[1], init="random", grad_scaling="site")
            model = model.to(device)
            run_model = model
            if variant == "dense-compile":
                run_model = torch.compile(model, backend=inner)
            elif variant.startswith("roast"):
                # the backend itself, not its name: the name resolves through the installed entry point,
                # which a checkout run from a package link (gpu_session.sh) does not have
                run_model = torch.compile(model, backend=roast_backend, options={"inner": inner})
            gen = torch.Generator(device=device).manual_seed(1)
            inputs = make_inputs(batch, seq, device, gen)
            features = {k: v for k, v in inputs.items() if k != "labels"}
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def infer():
                with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    run_model(**features)

            def train():
                with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    loss = run_model(**inputs).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            model.eval()
            infer_ms = measure(infer, args.steps, args.warmup, cuda)
            model.train()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            train_ms = measure(train, args.steps, args.warmup, cuda)
            peak = torch.cuda.max_memory_allocated() if cuda else None
            rows.append(dict(model=name, batch=batch, seq=seq, variant=variant, parameter_bytes=parameter_bytes(model),
                             inference_ms=infer_ms, train_step_ms=train_ms, peak_train_bytes=peak,
                             items_per_s_train=batch * (1 if name.startswith("resnet") else seq) / train_ms * 1e3))
            if save is not None:
                save(rows)  # after every variant: a step cut by its timeout keeps what it measured
            del model, run_model, optimizer
            if cuda:
                torch.cuda.empty_cache()
    return rows


def print_table(rows):
    header = (f"{'model':<12}{'variant':>15}{'params MB':>11}{'infer ms':>10}{'train ms':>10}{'peak GB':>9}"
              f"{'infer x':>9}{'train x':>9}")
    print(header + "\n" + "-" * len(header))
    base = {r["model"]: r for r in rows if r["variant"] == "dense-compile"}
    for r in rows:
        b = base[r["model"]]
        peak = f"{r['peak_train_bytes'] / 2**30:.2f}" if r["peak_train_bytes"] is not None else "-"
        print(f"{r['model']:<12}{r['variant']:>15}{r['parameter_bytes'] / 1e6:>11.2f}{r['inference_ms']:>10.2f}"
              f"{r['train_step_ms']:>10.2f}{peak:>9}{b['inference_ms'] / r['inference_ms']:>8.2f}x"
              f"{b['train_step_ms'] / r['train_step_ms']:>8.2f}x")
    print("x: dense-compile's time / this variant's, measured in this run (above 1: faster than dense-compile)")


def main(argv=None):
    import json

    args = parse_args(argv)
    select_device(args.dry_run, "bench_models.py")
    env = environment()
    path = None if args.dry_run else results_path(args.out, env, prefix=f"models-{'-'.join(args.model_table)}-")

    def save(rows):
        with open(path, "w") as f:
            json.dump(dict(environment=env, dtype=args.dtype, steps=args.steps, warmup=args.warmup, results=rows),
                      f, indent=1)

    rows = run(args, save if path else None)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  autocast {args.dtype}")
    print_table(rows)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
