"""The ``roastfx`` command: plan a model, list targets, inspect a checkpoint.

    roastfx plan my_models:build_gpt --compression 100x --target h100 --format html --out plan.html
    roastfx targets
    roastfx inspect model.safetensors

Planning never changes a weight: the model is built, its sites found and a plan
made. Bad input ends with one line on stderr and exit status 2, also when the
user's factory or the import of its module raises (``plan --traceback`` shows
where).
"""
from __future__ import annotations

import argparse
import importlib
import os
import math
import sys

EXIT_USAGE = 2
FORMATS = ("table", "json", "html")
PLANNERS = ("cost", "default")
PROGRESS_MIN_SITES = 32


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit status 2."""


TRACEBACK_HINT = "run with --traceback for the full traceback"


def _user_error(what: str, err: BaseException) -> str:
    """One line for an exception raised by the user's code: what raised, the type and the message."""
    message = " ".join(str(err).split()) or "(no message)"
    return f"{what} raised {type(err).__name__}: {message} ({TRACEBACK_HINT})"


def load_factory(path: str, traceback: bool = False, what: str = "factory"):
    """The callable named by ``module.path:factory`` (attributes may be dotted); ``what`` names it in errors
    ("factory", or "inputs" for --inputs).

    An error raised while importing the module becomes a UsageError naming the module
    (with ``traceback``, it propagates as it is)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        if what != "factory":
            raise UsageError(f"--{what} {path!r} is not of the form MODULE:FUNCTION (e.g. my_models:example_inputs)")
        raise UsageError(f"model factory {path!r} is not of the form MODULE:FACTORY (e.g. my_models:build_model)")
    if os.getcwd() not in sys.path:  # like `python -m`: modules in the current directory are importable
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        if traceback:
            raise
        raise UsageError(f"cannot import module {module_name!r} of {what} {path!r}: {e}") from None
    except Exception as e:  # a syntax error or an exception raised by the module's own code
        if traceback:
            raise
        raise UsageError(_user_error(f"importing module {module_name!r} of {what} {path!r}", e)) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r} ({what} {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{path!r} is of type {type(obj).__name__}, not a callable that builds "
                         + ("a model" if what == "factory" else "example inputs"))
    from inspect import signature

    try:
        required = [p.name for p in signature(obj).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):  # no signature to read (some builtins): calling it will tell
        required = []
    if required:
        raise UsageError(f"{what} {path!r} needs the argument(s) {', '.join(required)}; "
                         "roastfx plan calls it with none (wrap it in a function that takes no arguments)")
    return obj


def build_model(factory, path: str, meta: bool = False, traceback: bool = False, what: str = "factory"):
    """``factory()`` on the meta device or the CPU; an exception it raises becomes a UsageError naming it."""
    import torch

    try:
        with torch.device("meta") if meta else torch.device("cpu"):
            return factory()
    except Exception as e:
        if traceback:
            raise
        raise UsageError(_user_error(f"{what} {path!r}", e)) from None


def default_init_std(module, p) -> float | None:
    """The std of PyTorch's default init of ``p``, a weight of ``module`` (None: a module type not known here).

    Linear, Conv, ConvTranspose: kaiming_uniform_(a=sqrt(5)), bound 1/sqrt(fan_in), std 1/sqrt(3*fan_in).
    Embedding, EmbeddingBag: N(0, 1) (with a padding_idx, that row is zero). RNN, LSTM, GRU: every weight
    U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)). MultiheadAttention's input projections: xavier_uniform_,
    bound sqrt(6/(fan_in+fan_out)), std sqrt(2/(fan_in+fan_out)). transformers' Conv1D: N(0, 0.02).
    """
    from torch import nn

    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        rows = p.shape[0]
        zeroed = 1 if module.padding_idx is not None and rows > 0 else 0
        return math.sqrt((rows - zeroed) / rows) if rows > 0 else 1.0
    if isinstance(module, nn.RNNBase):
        return 1.0 / math.sqrt(3.0 * module.hidden_size)
    if isinstance(module, nn.MultiheadAttention) and p.dim() == 2:
        return math.sqrt(2.0 / max(1, p.shape[0] + p.shape[1]))
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return 0.02
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return 1.0 / math.sqrt(3.0 * max(1, math.prod(p.shape[1:])))
    return None


def _scale(p, spec=None, modules=None) -> float:
    """The site scale compress would use; for a meta tensor, the std of its module's default init
    (1/sqrt(3*fan_in) for a module type not known here)."""
    from roastfx.compress import _site_scale, site_fan_in

    if p.is_meta:
        for binding in spec.bindings if spec is not None and modules is not None else ():
            path, _, _attr = binding.rpartition(".")
            if path in modules:
                std = default_init_std(modules[path], p)
                if std is not None:
                    return std
        fan_in = site_fan_in(spec) if spec is not None else (math.prod(p.shape[1:]) if p.dim() > 1 else p.numel())
        return 1.0 / math.sqrt(3.0 * max(1, fan_in))
    return _site_scale(p, site_fan_in(spec) if spec is not None else None)


def _progress_bar(total: int, enabled: bool):
    """A callback (done, total) drawing a bar on stderr, or None."""
    if not enabled or total < PROGRESS_MIN_SITES:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="planning sites", unit="site", file=sys.stderr, leave=False)

    def update(done, _total):
        bar.update(done - bar.n)

    return update, bar.close


def cmd_plan(args) -> int:
    import torch
    from torch import nn

    from roastfx.compress import parse_compression
    from roastfx.passes.capture_sites import find_sites
    from roastfx.passes.cost_model import itemsize
    from roastfx.passes.plan_cost import plan_with_cost_model
    from roastfx.passes.plan_layout import plan_layout
    from roastfx.profiles import get_profile
    from roastfx.report import plan_html, plan_report, plan_to_json

    try:
        profile = get_profile(args.target)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.format not in FORMATS:
        raise UsageError(f"--format {args.format!r} is not valid; accepted: {', '.join(FORMATS)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
        if any(t < 1 for t in tokens):
            raise ValueError
    except ValueError:
        raise UsageError(f"--tokens {args.tokens!r} must be positive ints separated by commas, e.g. 1,16,256") from None
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed} must be a non-negative int")
    factory = load_factory(args.factory, traceback=args.traceback)
    model = build_model(factory, args.factory, meta=args.meta, traceback=args.traceback)
    if not isinstance(model, nn.Module):
        raise UsageError(f"factory {args.factory!r} returned {type(model).__name__}, not an nn.Module")
    example_inputs = None
    if args.inputs is not None:  # built like the model (on the meta device with --meta)
        example_inputs = build_model(load_factory(args.inputs, traceback=args.traceback, what="inputs"),
                                     args.inputs, meta=args.meta, traceback=args.traceback, what="inputs")
    # a ValueError from here on is one of roastfx's checks of this model and these arguments
    try:
        specs, notes = find_sites(model, example_inputs, exclude=tuple(args.exclude))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not specs:
        raise UsageError(f"{type(model).__name__} has no weight that feeds a matmul-like op: nothing to plan")
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    mem_item = itemsize(args.memory_dtype)
    dense_numel = sum(params[s.name].numel() for s in specs)
    try:
        memory_size = parse_compression(_number_or_text(args.compression), dense_numel, mem_item)
    except ValueError as e:
        raise UsageError(str(e)) from None
    scales = {s.name: _scale(params[s.name], s, modules) for s in specs}
    try:
        if args.planner == "cost":
            update, close = _progress_bar(len(specs), not args.no_progress)
            try:
                plan = plan_with_cost_model(specs, memory_size, scales, profile, args.seed, scheme=args.scheme,
                                            memory_dtype=args.memory_dtype, token_counts=tokens, mode=args.mode,
                                            notes=notes, progress=update)
            finally:
                close()
        else:
            plan = plan_layout(specs, memory_size, scales, seed=args.seed, scheme=args.scheme, target=profile.name,
                               cache_line=profile.alignment_elements(mem_item), memory_dtype=args.memory_dtype,
                               notes=notes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    report_tokens = max(tokens)
    if args.format == "table":
        text = plan_report(plan, profile, report_tokens)
    elif args.format == "json":
        text = plan_to_json(plan, profile, report_tokens)
    else:
        text = plan_html(plan, profile, report_tokens)
    _write(text, args.out)
    return 0


def cmd_targets(args) -> int:
    from roastfx.profiles import PROFILES, detect

    here = detect().name
    lines = [f"{'target':11s} {'kind':4s} {'L2':>8s} {'DRAM GB/s':>9s} {'fp32 TF':>8s} {'bf16 TF':>8s} "
             f"{'line':>4s}  description"]
    for p in PROFILES.values():
        mark = "  (this machine)" if p.name == here else ""
        lines.append(f"{p.name:11s} {p.kind:4s} {_kib(p.l2_bytes):>8s} {p.dram_gbps:>9.0f} "
                     f"{p.peak('float32'):>8.1f} {p.peak('bfloat16'):>8.1f} {p.cache_line_bytes:>4d}  "
                     f"{p.description}{mark}")
    _write("\n".join(lines), None)
    return 0


def cmd_inspect(args) -> int:
    from roastfx.checkpoint import describe

    try:
        text = describe(args.checkpoint)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {args.checkpoint!r} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise UsageError(f"cannot read {args.checkpoint!r} as a roastfx checkpoint: {e}") from None
    _write(text, None)
    return 0


def _number_or_text(text: str):
    """"0.01" means the ratio 0.01; "100x" and "10MB" stay text for parse_compression."""
    try:
        return float(text)
    except ValueError:
        return text


def _kib(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def _write(text: str, out) -> None:
    if out:
        try:
            with open(out, "w", encoding="utf-8") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        except OSError as e:
            raise UsageError(f"cannot write --out {out!r}: {e.strerror}") from None
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="roastfx", description="ROAST model compression: plans, targets, checkpoints")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    plan = sub.add_parser("plan", help="plan a model's compressed layout (weights are not changed)")
    plan.add_argument("factory", help="MODULE:FACTORY, a callable that builds the model")
    plan.add_argument("--compression", default="100x", help="ratio (0.01), factor (100x) or byte budget (10MB)")
    plan.add_argument("--target", default=None, help="hardware profile (see `roastfx targets`); default: "
                                                     "ROASTFX_TARGET or this machine")
    plan.add_argument("--format", default="table", help="table | json | html")
    plan.add_argument("--out", default=None, help="write the report to this file instead of stdout")
    plan.add_argument("--seed", type=int, default=0, help="hash seed, a non-negative int")
    plan.add_argument("--scheme", default="roast", choices=("roast", "roast-local", "hashednet"))
    plan.add_argument("--planner", default="cost", choices=PLANNERS,
                      help="cost: tiles chosen by predicted time; default: the fixed rules compress uses")
    plan.add_argument("--mode", default="infer", choices=("infer", "train"))
    plan.add_argument("--tokens", default="1,16,256,4096", help="token counts the cost model plans for")
    plan.add_argument("--memory-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    plan.add_argument("--exclude", action="append", default=[], help="glob of weights to keep dense (repeatable)")
    plan.add_argument("--inputs", default=None, metavar="MODULE:FUNCTION",
                      help="a callable returning example inputs (a tuple, a dict of keyword inputs or a tensor): "
                           "the model is traced on them, which finds weights used functionally (x @ self.w, a "
                           "mixture of experts' stacked weights) as compress(example_inputs=...) does")
    plan.add_argument("--meta", action="store_true", help="build the model on the meta device (no weight memory; "
                                                          "scales from the default init)")
    plan.add_argument("--no-progress", action="store_true")
    plan.add_argument("--traceback", action="store_true", help="let an exception raised by the factory or by "
                                                               "the import of its module end with its traceback")
    plan.set_defaults(run=cmd_plan)
    targets = sub.add_parser("targets", help="list hardware profiles")
    targets.set_defaults(run=cmd_targets)
    inspect = sub.add_parser("inspect", help="show the plan and memory statistics of a checkpoint")
    inspect.add_argument("checkpoint")
    inspect.set_defaults(run=cmd_inspect)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            raise UsageError("a command is required: plan, targets or inspect (roastfx --help)")
        return args.run(args)
    except UsageError as e:
        print(f"roastfx: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
