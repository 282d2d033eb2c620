"""Checkpoints: ``roastfx.save`` / ``roastfx.load`` with safetensors, plan included.

The plan travels as JSON in the file's metadata, so a checkpoint can be loaded
into a freshly built dense model of the same architecture.
"""
from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from roastfx.plan import Plan

from .compress import apply_plan, binding_problems
from .module import EXTRA_STATE_KEY, MEMORY_ATTR, roast_state
from .state import plan_extra_state

PLAN_KEY = "roastfx.plan"
EXTRA_KEY = "roastfx.extra_state"  # the submodules' get_extra_state() values that are not tensors, as JSON
FORMAT_KEY = "roastfx.format"
FORMAT = "roastfx-safetensors-1"


def save(model: nn.Module, path) -> None:
    """Write the compressed model's tensors and its plan to a .safetensors file."""
    state = roast_state(model)
    if state is None:
        raise ValueError("save expects a ROAST-compressed model (call roastfx.compress first)")
    tensors, extra = {}, {}
    for key, value in model.state_dict().items():
        if key == EXTRA_STATE_KEY:  # the root's is the plan, stored in the file's metadata
            continue
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous().clone()
        else:
            try:
                extra[key] = json.loads(json.dumps(value))
            except (TypeError, ValueError) as e:
                raise ValueError(f"cannot save {key!r}: roastfx checkpoints store extra state that JSON can hold "
                                 f"(dicts, lists, strings, numbers), this is {type(value).__name__} ({e})") from None
            if extra[key] != value:
                raise ValueError(f"cannot save {key!r}: its value {value!r} does not survive JSON unchanged "
                                 "(tuples or non-string keys); roastfx checkpoints store extra state as JSON")
    # the plan with the dtypes the model has now (a model.double() after compress keeps its float64 memory)
    metadata = {PLAN_KEY: state.current_plan().to_json(), FORMAT_KEY: FORMAT}
    if extra:
        metadata[EXTRA_KEY] = json.dumps(extra)
    save_file(tensors, str(path), metadata=metadata)


def read_plan(path) -> Plan:
    """The plan stored in a roastfx checkpoint."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(FORMAT_KEY) != FORMAT or PLAN_KEY not in meta:
        raise ValueError(f"{path} is not a roastfx checkpoint (no {PLAN_KEY!r} in its metadata)")
    return Plan.from_json(meta[PLAN_KEY])


def load(model_or_factory, path) -> nn.Module:
    """Load a checkpoint into a model (dense or compressed) or a factory that builds one.

    A dense model is compressed with the checkpoint's plan first. Every key and
    shape is checked before the model is changed.
    """
    plan = read_plan(path)
    model = model_or_factory
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"load expects an nn.Module or a callable that builds one, got {type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory returned {type(model).__name__}, not an nn.Module")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors.update(json.loads((f.metadata() or {}).get(EXTRA_KEY, "{}")))
    if roast_state(model) is None:
        _check_dense_fits(model, plan, tensors)
        apply_plan(model, plan)
    tensors[EXTRA_STATE_KEY] = plan_extra_state(plan)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad_shapes = [k for k in expected if k in tensors and k != EXTRA_STATE_KEY and isinstance(expected[k], torch.Tensor)
                  and tuple(expected[k].shape) != tuple(getattr(tensors[k], "shape", (None,)))]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"checkpoint {path} is from another architecture: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {bad_shapes[:5]}"
        )
    model.load_state_dict(tensors, strict=True)
    return model


def _check_dense_fits(model: nn.Module, plan: Plan, tensors: dict) -> None:
    """Before touching a dense model: every plan binding and every stored tensor must fit."""
    params = dict(model.named_parameters(remove_duplicate=False))
    compressed = {b for s in plan.sites for b in s.bindings}
    problems = binding_problems(params, plan)
    dense_state = {k: v for k, v in model.state_dict().items() if k not in compressed}
    for key, value in tensors.items():
        if key == MEMORY_ATTR:
            continue
        if key not in dense_state:
            problems.append(f"{key}: not in the model")
        elif isinstance(dense_state[key], torch.Tensor) != isinstance(value, torch.Tensor):
            problems.append(f"{key}: a tensor in one of the model and the checkpoint, extra state in the other")
        elif isinstance(value, torch.Tensor) and tuple(dense_state[key].shape) != tuple(value.shape):
            problems.append(f"{key}: model {tuple(dense_state[key].shape)}, checkpoint {tuple(value.shape)}")
    for key in dense_state:
        if key not in tensors:
            problems.append(f"{key}: not in the checkpoint")
    if problems:
        raise ValueError(f"checkpoint is from another architecture: {'; '.join(problems[:8])}")


def describe(path) -> str:
    """Plan summary and memory statistics of a checkpoint (for `roastfx inspect`)."""
    plan = read_plan(path)
    with safe_open(str(path), framework="pt") as f:
        memory = f.get_tensor(MEMORY_ATTR)
    stats = {"mean": float(memory.float().mean()), "std": float(memory.float().std()),
             "absmax": float(memory.float().abs().max())}
    return plan.summary() + "\nmemory: " + json.dumps(stats)
