"""Writes to a compressed weight go into the memory.

In eager mode a compressed module's attribute (``fc.weight``) is a tensor computed from the shared memory,
handed out as a ``RoastWeight``. An in-place change to it, or to a tensor sharing its storage (``.data``,
``.detach()``, a view, a row), is projected into the memory at once: ``nn.init.*``, ``copy_``,
``w.data.normal_()``, ``w[0] = v``, ``w.data = t``, ``torch.add(a, b, out=w)``, ``F.relu(w, inplace=True)``.
Each slot the weight lands on becomes the mean over every element sharing it
(``codegen.reference.project_write``, the least squares of ``compress(init="project")``), the other sites'
elements at their values from before the write. So the model holds the written weight only as far as the
memory can: the tensor written keeps the values written, and reading the attribute again shows what the model
computes with. Reshaping a weight in place (``resize_``, ``t_``, ``unsqueeze_``) raises: its shape is the plan's.

A weight read before the memory changed (an optimizer step, another weight's write) is read again before an
in-place op changes it, so that ``w.mul_(2)`` doubles what the model holds now. Reads are not refreshed: such a
tensor is a snapshot, as any tensor computed from parameters is.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
import weakref

import torch

from roastfx.codegen.reference import view_to_weight
from roastfx.codegen.runs import gather_view
from roastfx.state import EXTRA_STATE_KEY, MEMORY_ATTR, plan_extra_state, plan_from_extra_state

log = logging.getLogger("roastfx")

_NOT_WRITES = frozenset({"requires_grad_", "share_memory_", "detach_", "retain_grad", "rename_", "record_stream"})
_RESHAPES = frozenset({"resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "t_",
                       "transpose_", "swapdims_", "swapaxes_"})
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                              "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                              "__irshift__", "__imatmul__"})
_DATA_SET = torch.Tensor.data.__set__
_DATA_GET = torch.Tensor.data.__get__
_REQUIRES_GRAD_SET = torch.Tensor.requires_grad.__set__


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (torch.__file__, __file__))


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside torch and roastfx (the user's line that wrote), for warnings."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class _Writer:
    """Where a handed-out weight and the tensors sharing its storage write to: one site of one model."""

    def __init__(self, state, site: str, weight: torch.Tensor):
        self.state = weakref.ref(state)  # a weight kept after its model is gone is a plain tensor
        self.site = site
        self.weight = weight  # plain, sharing the handed-out tensor's storage
        self.synced = state.memory._version  # the memory version the weight's values come from
        self.baseline = None  # the memory before this weight's first write: the other sites' values

    def before_write(self) -> None:
        state = self.state()
        if state is None or state.memory._version == self.synced:
            return
        # the memory changed since these values were read: read them again, so that a relative change
        # (mul_, add_, a row's zero_) applies to what the model holds now
        with torch.no_grad():
            self.weight.detach().copy_(state.weight(self.site))
        self.synced, self.baseline = state.memory._version, None

    def rebind(self, tensor: torch.Tensor) -> None:
        """``w.data = t`` gave the handed-out tensor new storage: write back from it from now on."""
        self.weight = tensor.as_subclass(torch.Tensor).detach()

    def write(self) -> None:
        state = self.state()
        if state is None:
            return
        memory = state.memory
        if memory._version != self.synced:
            self.baseline = None  # the memory changed under a write we could not see coming
        if self.baseline is None:
            self.baseline = memory.detach().clone()
        state.write(self.site, self.weight, self.baseline)
        self.synced = memory._version
        if not state.warned_write or log.isEnabledFor(logging.INFO):
            with torch.no_grad():
                written = self.weight.detach().to(torch.float64)
                held = state.weight(self.site).detach().to(torch.float64)
                error = float((held - written).norm() / torch.maximum(written.norm(), held.norm()).clamp_min(1e-300))
            log.info("wrote %s into the memory: relative error %.3g", self.site, error)
            if not state.warned_write:
                state.warned_write = True
                warnings.warn(
                    f"roastfx: an in-place write to the compressed weight {self.site!r} was projected onto the "
                    f"shared memory: the model now holds it with relative error {error:.3g} (the difference's norm "
                    "over the larger of the two weights' norms; each slot is the mean over every weight element "
                    "sharing it). The tensor written keeps the written values; "
                    "read the attribute again for the model's. Other writes are logged at INFO level "
                    "(logger 'roastfx')", stacklevel=_caller_stacklevel())


class RoastWeight(torch.Tensor):
    """A compressed weight as eager code reads it (``module.weight``): a plain tensor for every op, whose
    in-place changes (and those of the tensors sharing its storage) are written into the memory."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # a handed-out weight given to a compiled function: a plain tensor
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if not all(issubclass(cls, t) or issubclass(t, cls) for t in types):
            return NotImplemented
        with torch._C.DisableTorchFunctionSubclass():
            _check_requires_grad(func, args, kwargs)
            ours = _ours(args, kwargs)
            target = _write_target(func, args, kwargs)
            if target is not None:
                name = getattr(func, "__name__", "")
                if name in _RESHAPES:
                    raise RuntimeError(
                        f"{name} on the compressed weight {target._roast_writer.site!r}: its shape "
                        f"{tuple(target._roast_writer.weight.shape)} is part of the compression plan and cannot "
                        "change in place. Work on a copy (w.detach().clone())")
                target._roast_writer.before_write()
            versions = [None if t.is_inference() else t._version for t in ours]
            out = func(*args, **kwargs)
            if func == _DATA_SET:
                args[0]._roast_writer.rebind(args[0])
                versions[ours.index(args[0])] = -1
            writers = {}
            for t, version in zip(ours, versions):
                if version is not None and t._version != version:
                    writers[id(t._roast_writer)] = t._roast_writer
            for writer in writers.values():
                writer.write()
            if getattr(func, "__name__", "") == "__get__" and func != _DATA_GET:
                return out  # an attribute (._base, .grad, ...), not a new alias of the weight's values
            return _wrap_aliases(out, ours)

    def __deepcopy__(self, memo):
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).__deepcopy__(memo)

    def __reduce_ex__(self, protocol):
        # pickled as a plain tensor: a writer would pickle the whole model with it
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).detach().__reduce_ex__(protocol)


def _check_requires_grad(func, args, kwargs) -> None:
    """Refuse to change a handed-out weight's ``requires_grad``: the flag would be set on a tensor computed
    from the memory, not on anything the model trains (torch's own error says only "leaf variables")."""
    if func == _REQUIRES_GRAD_SET:  # a method-wrapper: a new object at each access
        wanted = args[1]
    elif func is torch.Tensor.requires_grad_:
        wanted = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
    else:
        return
    weight = args[0]
    # only the attribute's tensor itself: an alias such as w.detach() is the user's own leaf to flag
    if not getattr(weight, "_roast_attribute", False) or bool(wanted) == weight.requires_grad:
        return
    site = weight._roast_writer.site
    raise ValueError(
        f"requires_grad={bool(wanted)} on the compressed weight {site!r}: it has no requires_grad of its own. "
        "It is computed from the model's shared roast_memory at each access, together with every other "
        "compressed weight, so the flag would be set on that temporary tensor, not on anything the model trains "
        "(and module.parameters() does not list it). To freeze it, keep it dense "
        f"(roastfx.compress(..., exclude=[{site!r}])); to freeze every compressed weight, "
        "model.roast_memory.requires_grad_(False)")


def _ours(args, kwargs) -> list[RoastWeight]:
    """The RoastWeights among an op's arguments (and inside its list arguments, e.g. an RNN's weights)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, RoastWeight):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, RoastWeight))
    return found


def _write_target(func, args, kwargs) -> RoastWeight | None:
    """The handed-out tensor ``func`` is about to change in place, if its name says so."""
    name = getattr(func, "__name__", "")
    out = kwargs.get("out")
    if isinstance(out, RoastWeight):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, RoastWeight)), None)
    first = args[0] if args else None
    if not isinstance(first, RoastWeight) or name in _NOT_WRITES:
        return None
    if (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS or kwargs.get("inplace") is True:
        return first
    return None


def _storage(t: torch.Tensor) -> int | None:
    """Where ``t``'s storage starts (tensors sharing it share this), or None for no storage."""
    try:
        return t.data_ptr() - t.storage_offset() * t.element_size() if t.numel() and t.layout == torch.strided else None
    except (RuntimeError, NotImplementedError):
        return None


def _wrap_aliases(out, ours: list[RoastWeight]):
    """``out`` with each tensor that shares a handed-out tensor's storage (a view, ``.data``, ``.detach()``)
    made a RoastWeight writing to the same site."""
    if not ours:
        return out
    storages = {}
    for t in ours:
        key = _storage(t)
        if key is not None:
            storages.setdefault(key, t._roast_writer)

    def wrap(o):
        if type(o) is not torch.Tensor:
            return o
        key = _storage(o)
        writer = storages.get(key) if key is not None else None
        if writer is None:
            return o
        alias = o.as_subclass(RoastWeight)
        alias._roast_writer = writer
        return alias

    if isinstance(out, (tuple, list)):
        return type(out)(wrap(o) for o in out) if type(out) in (tuple, list) else out
    return wrap(out)


def hand_out(state, site: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (site ``site`` read from ``state``'s memory) as the RoastWeight eager code gets; as it is
    under inference mode (inference tensors have no version counter to see writes by) and when it is already
    a tensor subclass of its own (a DTensor memory, a fake tensor)."""
    if type(weight) is not torch.Tensor or weight.is_inference():
        return weight
    with torch._C.DisableTorchFunctionSubclass():
        writer = _Writer(state, site, weight.detach())  # no reference back to the tensor: no cycle
    weight.__class__ = RoastWeight  # the same tensor, no autograd node added
    weight._roast_writer = writer
    weight._roast_attribute = True
    return weight


def load_dense_weights(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """``load_state_dict`` pre-hook of a compressed model's root: dense weights of compressed sites in the
    state dict (a dense checkpoint of the same architecture, or one weight set in a roastfx state dict) are
    projected into ``roast_memory`` as in-place writes are, all at once, instead of being unexpected keys.
    Runs before anything is loaded, so a bad weight raises with the model as it was."""
    state = module.__dict__["_roast_state"]
    dense = {}
    for site in state.plan.sites:
        found = [(prefix + b, state_dict[prefix + b]) for b in site.bindings if prefix + b in state_dict]
        for key, value in found:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != site.shape:
                what = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                        else type(value).__name__)
                raise ValueError(f"load_state_dict: {key!r} is {what}; the compressed weight it would be projected "
                                 f"into (site {site.name!r}) takes a floating-point tensor of shape {site.shape}. "
                                 "Nothing was loaded")
            if not torch.equal(value, found[0][1]):
                raise ValueError(f"load_state_dict: {found[0][0]!r} and {key!r} are one compressed weight (site "
                                 f"{site.name!r}, tied) but hold different values. Nothing was loaded")
        if found:
            dense[site.name] = found[0][1]
    if not dense:
        return
    extra_key, memory_key = prefix + EXTRA_STATE_KEY, prefix + MEMORY_ATTR
    if extra_key in state_dict:
        theirs = plan_from_extra_state(state_dict[extra_key])
        if [(s.name, s.mapping) for s in theirs.sites] != [(s.name, s.mapping) for s in state.plan.sites]:
            raise ValueError("load_state_dict: the state dict holds dense weights for compressed sites "
                             f"({sorted(dense)}) and a roastfx plan other than this model's; load one or the "
                             "other. Nothing was loaded")
    for site in state.plan.sites:
        for b in site.bindings:
            state_dict.pop(prefix + b, None)
    memory = state.memory
    baseline = state_dict.get(memory_key, memory).detach().to(memory.device)
    new = state.projected({name: w.to(memory.device) for name, w in dense.items()}, baseline)
    state_dict[memory_key] = new.to(memory.dtype)
    state_dict.setdefault(extra_key, plan_extra_state(state.current_plan()))
    errors = []
    sites = {s.name: s for s in state.plan.sites}
    for name, weight in dense.items():
        site = sites[name]
        held = view_to_weight(gather_view(new, site.mapping, site.scale), site.shape, site.transposed, site.op)
        w = weight.detach().to(held.device, torch.float64)
        errors.append(float((held - w).norm() / torch.maximum(w.norm(), held.norm()).clamp_min(1e-300)))
    log.info("load_state_dict: projected %d dense weights into roast_memory", len(dense))
    warnings.warn(
        f"roastfx: load_state_dict projected the dense weights of {len(dense)} compressed site(s) "
        f"({', '.join(sorted(dense)[:4])}{', ...' if len(dense) > 4 else ''}) onto the shared memory, as "
        f"well as it holds them: relative error up to {max(errors):.3g} (norm of the difference over the larger "
        "norm; each slot is the mean over every weight element sharing it)", stacklevel=_caller_stacklevel())
