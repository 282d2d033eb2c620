"""The compressed model's runtime: one memory module and ROAST-backed attributes.

The root model gets the memory as its parameter ``roast_memory`` and keeps the
plan in its ``state_dict`` as extra state (``_extra_state``). Each
module that held a compressed weight gets a subclass whose attribute (e.g.
``weight``) is a property computing the weight from the memory through the
reference path; the dense tensor is deleted.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from roastfx import rnn
from roastfx.codegen import ops
from roastfx.codegen.grad_norm import site_grad_norm, site_grad_rms  # noqa: F401 (site_grad_rms: public here too)
from roastfx.codegen.reference import view_to_weight
from roastfx.plan import Plan, check_grad_scaling

log = logging.getLogger("roastfx")

MEMORY_ATTR = "roast_memory"  # the root's parameter that holds the memory
EXTRA_STATE_KEY = "_extra_state"  # the root's state_dict key that holds the plan
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def scale_site_grad(view: torch.Tensor, grad_scaling: str) -> torch.Tensor:
    """``view`` unchanged, with its gradient scaled as ``grad_scaling`` says ("none" or "site": divided
    by its RMS through ``roastfx::site_grad_norm``, which the compiled graph's fused ops apply themselves)."""
    if grad_scaling == "site" and view.requires_grad:
        return site_grad_norm(view)
    check_grad_scaling(grad_scaling)
    return view


class RoastState:
    """The plan of a compressed model and access to its memory.

    Not a module: the memory is a parameter of the root model itself
    (``roast_memory``), so containers such as ``nn.Sequential`` keep their children.
    """

    def __init__(self, root: nn.Module, plan: Plan):
        self.root = root
        self.plan = plan
        self._sites = {s.name: s for s in plan.sites}
        self._args = {s.name: ops.mapping_args(s.mapping) for s in plan.sites}

    @property
    def memory(self) -> nn.Parameter:
        return self.root._parameters[MEMORY_ATTR]

    def weight(self, site_name: str) -> torch.Tensor:
        """The site's weight in its dense shape, computed from the memory."""
        site, args = self._sites[site_name], self._args[site_name]
        view = ops.materialize(self.memory, args, site.scale)
        view = scale_site_grad(view, self.plan.grad_scaling)
        return view_to_weight(view, site.shape, site.transposed)

    def replace_plan(self, plan: Plan) -> None:
        ours = [(s.name, s.shape) for s in self.plan.sites]
        theirs = [(s.name, s.shape) for s in plan.sites]
        if ours != theirs or plan.memory_size != self.plan.memory_size:
            raise ValueError(
                f"checkpoint plan does not fit this model: it has sites {theirs} and memory {plan.memory_size}, "
                f"the model has {ours} and memory {self.plan.memory_size}"
            )
        self.plan = plan
        self._sites = {s.name: s for s in plan.sites}
        self._args = {s.name: ops.mapping_args(s.mapping) for s in plan.sites}


def _root_get_extra_state(self):
    return {"plan": self.__dict__["_roast_state"].plan.to_json()}


def _root_set_extra_state(self, state):
    self.__dict__["_roast_state"].replace_plan(Plan.from_json(state["plan"]))


_SUBCLASSES: dict[tuple, type] = {}


def _roast_property(attr: str):
    def get(self):
        return self.__dict__["_roast_state"].weight(self.__dict__["_roast_sites"][attr])

    def set_(self, value):
        raise AttributeError(
            f"{type(self).__name__}.{attr} is ROAST-compressed (site {self.__dict__['_roast_sites'][attr]!r}); "
            "its values live in the model's roast.memory and cannot be assigned"
        )

    return property(get, set_)


def _guarded_setattr(self, name, value):
    sites = self.__dict__.get("_roast_sites", {})
    if name in sites:
        raise AttributeError(
            f"{type(self).__name__}.{name} is ROAST-compressed (site {sites[name]!r}); "
            "its values live in the root model's roast_memory and cannot be assigned"
        )
    type(self)._roast_base_class.__setattr__(self, name, value)


def _rnn_flat_weights(self):
    return [getattr(self, n) if hasattr(self, n) else None for n in self._flat_weights_names]


def roast_subclass(cls: type, attrs: tuple[str, ...], root: bool = False) -> type:
    """A subclass of ``cls`` whose ``attrs`` read from the memory (cached per class and attrs)."""
    key = (cls, attrs, root)
    if key not in _SUBCLASSES:
        namespace = {a: _roast_property(a) for a in attrs}
        namespace["__setattr__"] = _guarded_setattr
        if root:
            namespace["get_extra_state"] = _root_get_extra_state
            namespace["set_extra_state"] = _root_set_extra_state
        namespace["_roast_base_class"] = cls
        if issubclass(cls, nn.RNNBase):
            # RNNs keep a list of their weights; recompute it from the properties on each access
            namespace["_flat_weights"] = property(_rnn_flat_weights, lambda self, v: None)
        if cls in rnn.DECOMPOSED:  # step by step while dynamo traces it: every weight read a matmul (rnn.py)
            namespace["forward"] = rnn.roast_rnn_forward
        _SUBCLASSES[key] = type(f"Roast{cls.__name__}", (cls,), namespace)
    return _SUBCLASSES[key]


def install(model: nn.Module, plan: Plan, memory: torch.Tensor) -> RoastState:
    """Make ``model`` ROAST-backed: add the memory, swap classes, free the dense weights."""
    if memory.shape != (plan.memory_size,):
        raise ValueError(f"memory has shape {tuple(memory.shape)}, the plan needs ({plan.memory_size},)")
    if type(model).get_extra_state is not nn.Module.get_extra_state:
        raise ValueError(f"{type(model).__name__} defines get_extra_state; roastfx needs it to store the plan")
    modules = dict(model.named_modules(remove_duplicate=False))
    state = RoastState(model, plan)
    per_module: dict[str, dict[str, str]] = {name: {} for name in ("",)}
    for site in plan.sites:
        for binding in site.bindings:
            mod_path, _, attr = binding.rpartition(".")
            per_module.setdefault(mod_path, {})[attr] = site.name
    for mod_path, attrs in per_module.items():
        module = modules[mod_path]
        for attr in attrs:
            if attr in module._parameters:
                del module._parameters[attr]
        module.__dict__["_roast_state"] = state
        module.__dict__["_roast_sites"] = dict(attrs)
        module.__class__ = roast_subclass(module.__class__, tuple(sorted(attrs)), root=mod_path == "")
    model.register_parameter(MEMORY_ATTR, nn.Parameter(memory))
    if any(type(modules[p])._roast_base_class in rnn.DECOMPOSED for p in per_module):
        _trace_rnns()
    return state


def _trace_rnns() -> None:
    """Let dynamo trace RNN modules (it runs them eagerly by default), so that the compressed ones' step-by-step
    forward (rnn.py) is in the graph the roast backend rewrites."""
    import torch._dynamo

    if not torch._dynamo.config.allow_rnn:
        torch._dynamo.config.allow_rnn = True
        log.info("roastfx: torch._dynamo.config.allow_rnn turned on, so that torch.compile traces the compressed "
                 "RNN modules step by step")


def roast_state(model: nn.Module) -> RoastState | None:
    state = model.__dict__.get("_roast_state") if isinstance(model, nn.Module) else None
    return state if isinstance(state, RoastState) and state.root is model else None


def memory_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"memory dtype {name!r} not supported; accepted: {', '.join(_DTYPES)}")
    return _DTYPES[name]
