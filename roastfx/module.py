"""The compressed model's runtime: one memory module and ROAST-backed attributes.

The root model gets the memory as its parameter ``roast_memory`` and keeps the
plan in its ``state_dict`` as extra state (``_extra_state``: the plan's JSON as a uint8 tensor). Each
module that held a compressed weight gets a subclass whose attribute (e.g.
``weight``) is a property computing the weight from the memory through the
reference path (``state.RoastState``); the dense tensor is deleted.
"""
from __future__ import annotations

import inspect
import logging
import weakref

import torch
from torch import nn

from roastfx import rnn, weight_writes
from roastfx.codegen import ops
from roastfx.codegen.grad_norm import site_grad_rms  # noqa: F401 (public here too)
from roastfx.plan import Plan
from roastfx.state import DTYPES as _DTYPES
from roastfx.state import EXTRA_STATE_KEY, MEMORY_ATTR, RoastState, scale_site_grad  # noqa: F401 (public here too)
from roastfx.state import plan_extra_state, plan_from_extra_state
from roastfx.state import NAMES as _NAMES

log = logging.getLogger("roastfx")

def _root_get_extra_state(self):
    return plan_extra_state(self.__dict__["_roast_state"].current_plan())


def _root_apply(self, fn, *args, **kwargs):
    out = type(self)._roast_base_class._apply(self, fn, *args, **kwargs)
    self.__dict__["_roast_state"].follow_conversion(fn)
    return out


def _reset_parameters(self, *args, **kwargs):
    sites = self.__dict__.get("_roast_sites", {})
    raise RuntimeError(
        f"{type(self)._roast_base_class.__name__}.reset_parameters: {sorted(sites)} are ROAST-compressed (sites "
        f"{sorted(sites.values())}); their values are computed from the model's shared roast_memory, which this "
        "method cannot re-initialize. Re-initialize the memory (model.roast_memory) or compress a freshly "
        "initialized dense model (roastfx.compress(..., init='random'))")


def _root_dtype(self) -> torch.dtype:
    """transformers' ``model.dtype`` (its first floating-point parameter's), with the memory standing for the
    weights read from it: with ``memory_dtype="float32"`` under a bf16 model the model's dtype stays bf16."""
    for name, p in self.named_parameters():
        if p.is_floating_point():
            return next(iter(self.__dict__["_roast_state"].compute_dtypes.values())) if name == MEMORY_ATTR else p.dtype
    return type(self)._roast_base_class.dtype.fget(self)  # no floating parameter: transformers' own answer


def _root_get_parameter(self, target: str):
    """``nn.Module.get_parameter``, which also names a compressed weight: it returns the weight computed from
    the memory (a tensor, not a Parameter), as transformers' tie_weights reads it."""
    try:
        return type(self)._roast_base_class.get_parameter(self, target)
    except AttributeError:
        path, _, attr = target.rpartition(".")
        module = self.get_submodule(path)
        if attr in module.__dict__.get("_roast_sites", {}):
            return getattr(module, attr)
        raise


def _save_pretrained(self, *args, **kwargs):
    raise RuntimeError(
        f"{type(self)._roast_base_class.__name__}.save_pretrained: this model is ROAST-compressed, and "
        "from_pretrained could not read its weights back (they live in roast_memory, with a plan). Save it with "
        "roastfx.save(model, 'model.safetensors') (and model.config.save_pretrained(dir) for the config); load "
        "it with roastfx.load(factory, 'model.safetensors'), the factory building the dense model, e.g. from "
        "the config")


def _resize_token_embeddings(self, *args, **kwargs):
    base = type(self)._roast_base_class
    tables = [m for m in (self.get_input_embeddings(), self.get_output_embeddings()) if m is not None]
    compressed = [m for m in tables if m.__dict__.get("_roast_sites")]
    if compressed:
        raise RuntimeError(
            f"{base.__name__}.resize_token_embeddings: the token embeddings are ROAST-compressed (sites "
            f"{sorted({s for m in compressed for s in m.__dict__['_roast_sites'].values()})}); their shape is part "
            "of the plan. Resize the dense model before roastfx.compress, or exclude the embeddings and head "
            "(exclude=[...]). Nothing was changed")
    return base.resize_token_embeddings(self, *args, **kwargs)


def _new_roast_module(base: type, attrs: tuple[str, ...], root: bool):
    """Unpickling: an empty instance of the roast subclass, rebuilt by name from its dense base class."""
    cls = roast_subclass(base, attrs, root)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    """Pickle (torch.save of a whole model, multiprocessing) by the dense base class, which is importable."""
    cls = type(self)
    return _new_roast_module, (cls._roast_base_class, cls._roast_attrs, cls._roast_root), self.__getstate__()


def _root_set_extra_state(self, state):
    self.__dict__["_roast_state"].replace_plan(plan_from_extra_state(state))


_SUBCLASSES: dict[tuple, type] = {}
_ROOTS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # every live compressed model


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward turns a sparse gradient dense: an Embedding(sparse=True) gives its weight a
    sparse gradient, but the weight is computed from the shared memory, whose gradient is dense."""

    @staticmethod
    def forward(weight):
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


def _roast_property(attr: str):
    def get(self):
        site, state = self.__dict__["_roast_sites"][attr], self.__dict__["_roast_state"]
        sparse = self.__dict__.get("sparse") is True
        plain = torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
        if not sparse and not plain:
            kept = state.kept_read(site)
            if kept is not None:
                return kept
        weight = state.weight(site)
        if sparse and weight.requires_grad:
            weight = _DenseGrad.apply(weight)
        if not plain:
            weight = weight_writes.hand_out(state, site, weight)
            if not sparse:
                state.keep_read(site, weight)
        if not torch.compiler.is_compiling():
            weight._roast_site = site  # assigning it back to a binding of the same site is a no-op (a tie)
        return weight

    def set_(self, value):
        raise AttributeError(
            f"{type(self).__name__}.{attr} is ROAST-compressed (site {self.__dict__['_roast_sites'][attr]!r}); "
            "its values live in the model's roast.memory and cannot be assigned"
        )

    return property(get, set_)


def _root_forward_begins(module, args):
    if not torch.compiler.is_compiling():
        module.__dict__["_roast_state"].begin_forward()


def _root_forward_ends(module, args, output):
    if not torch.compiler.is_compiling():  # output None: the forward raised (or returns nothing)
        module.__dict__["_roast_state"].end_forward(completed=output is not None)


def _guarded_setattr(self, name, value):
    sites = self.__dict__.get("_roast_sites", {})
    if name in sites and getattr(value, "_roast_site", None) == sites[name]:
        return  # the same site's weight (transformers' tie_weights, head.weight = emb.weight): tied already
    if name in sites:
        raise AttributeError(
            f"{type(self).__name__}.{name} is ROAST-compressed (site {sites[name]!r}); "
            "its values live in the root model's roast_memory and cannot be assigned"
        )
    type(self)._roast_base_class.__setattr__(self, name, value)


def _embedding_forward(self, input):
    """nn.Embedding's forward reading only the looked-up rows (`RoastState.rows`) where its options allow;
    else the base forward over the whole weight."""
    if self.max_norm is not None:
        # torch renormalizes the weight's rows in place; here a copy of the weight read from the memory, for
        # this lookup only (the memory cannot follow an in-place change of one of its weights)
        return nn.functional.embedding(input, self.weight.clone(), self.padding_idx, self.max_norm, self.norm_type,
                                       self.scale_grad_by_freq, self.sparse)
    if not self.scale_grad_by_freq and not self.sparse:
        site = self.__dict__["_roast_sites"]["weight"]
        out = self.__dict__["_roast_state"].rows(site, input, self.padding_idx)
        if out is not None:
            return out
    return type(self)._roast_base_class.forward(self, input)


def _embedding_bag_forward(self, input, offsets=None, per_sample_weights=None):
    """nn.EmbeddingBag's forward over the looked-up rows only (`ops.embedding_bag_of_rows`) where its options
    allow; else the base forward over the whole weight."""
    if self.max_norm is not None:  # as in _embedding_forward: the renorm applies to a copy, for this lookup
        return nn.functional.embedding_bag(input, self.weight.clone(), offsets, self.max_norm, self.norm_type,
                                           self.scale_grad_by_freq, self.mode, self.sparse, per_sample_weights,
                                           self.include_last_offset, self.padding_idx)
    if (not self.scale_grad_by_freq and not self.sparse and self.padding_idx is None
            and (input.dim() == 2) == (offsets is None) and input.dim() in (1, 2)):
        site = self.__dict__["_roast_sites"]["weight"]
        rows = self.__dict__["_roast_state"].rows(site, input, None)
        if rows is not None:
            if per_sample_weights is not None and per_sample_weights.dtype != rows.dtype:
                return type(self)._roast_base_class.forward(self, input, offsets, per_sample_weights)
            return ops.embedding_bag_of_rows(rows, input, offsets, self.mode, per_sample_weights,
                                             self.include_last_offset)
    return type(self)._roast_base_class.forward(self, input, offsets, per_sample_weights)


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
        namespace.update(_roast_attrs=attrs, _roast_root=root, __reduce_ex__=_reduce_ex)
        if root:
            namespace["_apply"] = _root_apply
            namespace["get_parameter"] = _root_get_parameter
            if callable(getattr(cls, "save_pretrained", None)) and callable(getattr(cls, "from_pretrained", None)):
                namespace["save_pretrained"] = _save_pretrained  # transformers' PreTrainedModel
            if isinstance(inspect.getattr_static(cls, "dtype", None), property):  # PreTrainedModel.dtype
                namespace["dtype"] = property(_root_dtype)
            if callable(getattr(cls, "resize_token_embeddings", None)):
                namespace["resize_token_embeddings"] = _resize_token_embeddings
        if attrs and callable(getattr(cls, "reset_parameters", None)):
            namespace["reset_parameters"] = _reset_parameters
        if issubclass(cls, nn.RNNBase):
            # RNNs keep a list of their weights; recompute it from the properties on each access
            namespace["_flat_weights"] = property(_rnn_flat_weights, lambda self, v: None)
        if attrs == ("weight",) and cls.forward in (nn.Embedding.forward, nn.EmbeddingBag.forward):
            # eager lookups read only the looked-up rows (benchmarks/bench_cpu.py: 36x faster in a BERT-base table)
            namespace["forward"] = (_embedding_forward if cls.forward is nn.Embedding.forward
                                    else _embedding_bag_forward)
        if cls in rnn.DECOMPOSED:  # step by step while dynamo traces it: every weight read a matmul (rnn.py)
            namespace["forward"] = rnn.roast_rnn_forward
        elif cls in rnn.CELLS:
            namespace["forward"] = rnn.roast_cell_forward
        _SUBCLASSES[key] = type(f"Roast{cls.__name__}", (cls,), namespace)
    return _SUBCLASSES[key]


def install(model: nn.Module, plan: Plan, memory: torch.Tensor,
            compute_dtypes: dict[str, torch.dtype] | None = None) -> RoastState:
    """Make ``model`` ROAST-backed: add the memory, swap classes, free the dense weights. ``compute_dtypes``:
    the dtype each site's weight is read in (default: the plan's site dtypes)."""
    if memory.shape != (plan.memory_size,):
        raise ValueError(f"memory has shape {tuple(memory.shape)}, the plan needs ({plan.memory_size},)")
    if type(model).get_extra_state is not nn.Module.get_extra_state:
        raise ValueError(f"{type(model).__name__} defines get_extra_state; roastfx needs it to store the plan")
    modules = dict(model.named_modules(remove_duplicate=False))
    state = RoastState(model, plan, compute_dtypes)
    # per module object (one registered under several names is one module), its compressed attributes
    per_module: dict[int, tuple[nn.Module, dict[str, str]]] = {id(model): (model, {})}
    for site in plan.sites:
        for binding in site.bindings:
            mod_path, _, attr = binding.rpartition(".")
            module = modules[mod_path]
            per_module.setdefault(id(module), (module, {}))[1][attr] = site.name
    for module, attrs in per_module.values():
        for attr in attrs:
            if attr in module._parameters:
                del module._parameters[attr]
        module.__dict__["_roast_state"] = state
        module.__dict__["_roast_sites"] = dict(attrs)
        module.__class__ = roast_subclass(module.__class__, tuple(sorted(attrs)), root=module is model)
    model.register_parameter(MEMORY_ATTR, memory if isinstance(memory, nn.Parameter) else nn.Parameter(memory))
    model.register_forward_pre_hook(_root_forward_begins)
    model.register_forward_hook(_root_forward_ends, always_call=True)
    model._register_load_state_dict_pre_hook(weight_writes.load_dense_weights, with_module=True)
    _ROOTS.add(model)
    if any(type(m)._roast_base_class in rnn.DECOMPOSED for m, _ in per_module.values()):
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


_MODULE_REQUIRES_GRAD_ = nn.Module.requires_grad_


def _requires_grad_(self, requires_grad: bool = True):
    """nn.Module.requires_grad_, refusing to freeze (or unfreeze) a part of a compressed model whose
    compressed weights live in a memory it does not hold: those weights are not parameters of the part, so
    torch's requires_grad_ would skip them silently. Installed on nn.Module when roastfx is imported; a model
    with no compressed part is not affected."""
    if _ROOTS:
        held = {id(m) for m in self.modules()}  # a memory this part holds (it contains the root) it may change
        for path, module in self.named_modules():
            state, sites = module.__dict__.get("_roast_state"), module.__dict__.get("_roast_sites")
            if not sites or not isinstance(state, RoastState) or id(state.root) in held:
                continue
            if state.memory.requires_grad != requires_grad:
                where = f"{type(self).__name__}.{path}" if path else type(self).__name__
                raise ValueError(
                    f"requires_grad_({requires_grad}) on a part of a ROAST-compressed model: {where} holds "
                    f"compressed weights ({sorted(sites.values())}) that share the model's roast_memory "
                    f"(requires_grad={state.memory.requires_grad}) with other sites, so they cannot be "
                    f"{'unfrozen' if requires_grad else 'frozen'} alone. Exclude them when compressing "
                    "(exclude=[...]) or change the whole memory: model.roast_memory.requires_grad_(...). "
                    "Nothing was changed")
    return _MODULE_REQUIRES_GRAD_(self, requires_grad)


_requires_grad_.__wrapped__ = _MODULE_REQUIRES_GRAD_
nn.Module.requires_grad_ = _requires_grad_


def already_compressed(model: nn.Module) -> str | None:
    """Why ``model`` cannot be compressed again (None if it can): it, a module inside it, or a model that
    contains it is ROAST-compressed already (two memories in one model would not load back)."""
    if roast_state(model) is not None:
        return "this model is already ROAST-compressed (it has a roast_memory)"
    for path, module in model.named_modules():
        if path and isinstance(module.__dict__.get("_roast_state"), RoastState):
            return f"its submodule {path!r} belongs to a ROAST-compressed model"
    for root in list(_ROOTS):
        if root is not model and roast_state(root) is not None and any(m is model for m in root.modules()):
            return f"it is inside a ROAST-compressed {type(root)._roast_base_class.__name__} (excluded from its compression)"
    return None


def roast_state(model: nn.Module) -> RoastState | None:
    state = model.__dict__.get("_roast_state") if isinstance(model, nn.Module) else None
    return state if isinstance(state, RoastState) and state.root is model else None


def memory_dtype(name) -> torch.dtype:
    """The torch dtype of a memory dtype given by name ("float32") or as a torch.dtype."""
    if isinstance(name, torch.dtype) and name in _DTYPES.values():
        return name
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"memory_dtype={name!r} is not supported; accepted: {', '.join(_DTYPES)} "
                         "(by name or as the torch dtype)")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def default_memory_dtype(weight_dtypes) -> torch.dtype:
    """The memory's dtype when none is asked for: the weights' own, when they share one a memory can have;
    float32 otherwise."""
    dtypes = set(weight_dtypes)
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in _NAMES else torch.float32
