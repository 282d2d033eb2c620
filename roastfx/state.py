"""A compressed model's state: its plan, and each site's weight read from (and written into) the memory.

Not a module: the memory is a parameter of the root model itself (``roast_memory``); module.py gives the
compressed modules their attributes, which call ``RoastState.weight`` (or ``rows`` for an embedding lookup).
"""
from __future__ import annotations

import collections
import dataclasses
import threading

import torch
from torch import nn

from roastfx.codegen import ops
from roastfx.codegen.grad_norm import SiteGradNorm, site_grad_norm
from roastfx.codegen.reference import view_to_weight, weight_to_view
from roastfx.codegen.runs import gather_view_differentiable, project_write
from roastfx.passes.cost_model import slot_load_by_tiles
from roastfx.plan import Plan, check_grad_scaling

MEMORY_ATTR = "roast_memory"  # the root's parameter that holds the memory
EXTRA_STATE_KEY = "_extra_state"  # the root's state_dict key that holds the plan


def plan_extra_state(plan: Plan) -> torch.Tensor:
    """The plan as the root's extra state: its JSON text, UTF-8, as a uint8 tensor, so that every value of
    a compressed model's state_dict is a tensor (safetensors.torch.save_file, and tools that detach or move
    each value, take it)."""
    return torch.tensor(list(plan.to_json().encode("utf-8")), dtype=torch.uint8)


def plan_from_extra_state(value) -> Plan:
    """The plan in a state dict's ``_extra_state``: a uint8 tensor of its JSON (`plan_extra_state`, on any
    device), or the ``{"plan": json}`` dict of checkpoints saved before 2026-12-07."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        return Plan.from_json(bytes(value.cpu().tolist()).decode("utf-8"))
    if isinstance(value, dict) and isinstance(value.get("plan"), str):
        return Plan.from_json(value["plan"])
    raise ValueError(f"{EXTRA_STATE_KEY} holds {type(value).__name__}, not a roastfx plan (a uint8 tensor of its "
                     "JSON, or a dict {'plan': json} from older checkpoints)")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def scale_site_grad(view: torch.Tensor, grad_scaling: str) -> torch.Tensor:
    """``view`` unchanged, with its gradient scaled as ``grad_scaling`` says ("none" or "site": divided
    by its RMS through ``roastfx::site_grad_norm``, which the compiled graph's fused ops apply themselves)."""
    if grad_scaling == "site" and view.requires_grad:
        # the autograd.Function under torch.func (it must) and in eager (cheaper); the op in compiled graphs
        if torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active():
            return site_grad_norm(view)
        return SiteGradNorm.apply(view)
    check_grad_scaling(grad_scaling)
    return view


class RoastState:
    """The plan of a compressed model and access to its memory.

    Not a module: the memory is a parameter of the root model itself
    (``roast_memory``), so containers such as ``nn.Sequential`` keep their children.
    """

    def __init__(self, root: nn.Module, plan: Plan, compute_dtypes: dict[str, torch.dtype] | None = None):
        self.root = root
        self.plan = plan
        self._sites = {s.name: s for s in plan.sites}
        self._args = {s.name: ops.mapping_args(s.mapping) for s in plan.sites}
        self._slot_load = None
        # the dtype each site's weight is read in: its dense weight's, then whatever model.to / .double() /
        # .half() make of it (root's _apply); the memory keeps its own dtype (e.g. float32 under bf16 weights)
        self.compute_dtypes = {s.name: (compute_dtypes or {}).get(s.name, DTYPES.get(s.dtype, torch.float32))
                               for s in plan.sites}
        self._slot_load = None  # every site's elements per slot, for writes (weight_writes.py)
        self.warned_write = False
        self._reads = threading.local()  # this thread's eager forward of the root: its reads (begin_forward)
        self.repeated: frozenset[str] = frozenset()  # sites the last eager forward read more than once

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_reads"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reads = threading.local()

    # An eager forward of the root reads each weight from the memory as often as the model asks for it: a loop
    # over experts indexes a stacked weight once per expert, an RNN cell called per step reads its weights
    # every step. Within one forward the memory does not change, so the sites the previous forward read more
    # than once are read once and shared (one autograd node: their gradients add up as for a dense weight);
    # the others are not kept, so a forward holds no more weights than before.

    def begin_forward(self) -> None:
        reads = self._reads
        reads.depth = getattr(reads, "depth", 0) + 1
        if reads.depth == 1:
            reads.counts, reads.kept = collections.Counter(), {}

    def end_forward(self, completed: bool = True) -> None:
        """``completed``: False after a forward that raised, whose reads say nothing about the next one."""
        reads = self._reads
        if getattr(reads, "depth", 0) <= 0:
            return
        reads.depth -= 1
        if reads.depth == 0:
            if completed:
                self.repeated = frozenset(s for s, c in reads.counts.items() if c > 1)
            reads.counts = reads.kept = None

    def _read_key(self):
        return self.memory._version, torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def kept_read(self, site_name: str) -> torch.Tensor | None:
        """The weight this forward already read for a site read repeatedly, or None (and the read counted)."""
        reads = self._reads
        if not getattr(reads, "depth", 0):
            return None
        reads.counts[site_name] += 1
        kept = reads.kept.get(site_name)
        return kept[1] if kept is not None and kept[0] == self._read_key() else None

    def keep_read(self, site_name: str, weight: torch.Tensor) -> None:
        reads = self._reads
        if self.plan.grad_scaling == "site" and weight.requires_grad:
            return  # each read's gradient is normalized on its own (as compiled graphs do): sharing one read
            # would normalize the sum of its uses' gradients instead, from the second forward on
        if getattr(reads, "depth", 0) and site_name in self.repeated:
            reads.kept[site_name] = (self._read_key(), weight)

    @property
    def memory(self) -> nn.Parameter:
        return self.root._parameters[MEMORY_ATTR]

    def weight(self, site_name: str) -> torch.Tensor:
        """The site's weight in its dense shape, computed from the memory."""
        site, args = self._sites[site_name], self._args[site_name]
        if torch._C._are_functorch_transforms_active():
            # torch.func (grad, vmap, jacrev, ...) cannot enter the custom ops: torch ops it differentiates
            view = gather_view_differentiable(self.memory, site.mapping, site.scale)
        elif torch.compiler.is_compiling():
            view = ops.materialize(self.memory, args, site.scale)  # what the roast backend finds and fuses
        else:
            view = ops.EagerMaterialize.apply(self.memory, site.mapping, site.scale)
        view = scale_site_grad(view, self.plan.grad_scaling)
        weight = view_to_weight(view, site.shape, site.transposed, site.op)
        dtype = self.compute_dtypes[site_name]
        return weight if weight.dtype == dtype else weight.to(dtype)

    def projected(self, weights: dict[str, torch.Tensor], baseline: torch.Tensor) -> torch.Tensor:
        """The memory (float64) holding ``weights`` (site name: its weight in the dense shape) as well as it can,
        the other sites' elements kept at their values in ``baseline`` (``reference.project_write``)."""
        for name, weight in weights.items():
            if tuple(weight.shape) != self._sites[name].shape:
                raise ValueError(f"cannot write a weight of shape {tuple(weight.shape)} into site {name!r}, "
                                 f"whose shape is {self._sites[name].shape}")
        if self._slot_load is None:
            self._slot_load = slot_load_by_tiles([s.mapping for s in self.plan.sites], self.plan.memory_size)
        sites = [self._sites[name] for name in weights]
        views = [weight_to_view(w.detach(), s.transposed, s.op) for s, w in zip(sites, weights.values())]
        return project_write(baseline, self._slot_load, views, [s.mapping for s in sites], [s.scale for s in sites])

    def write(self, site_name: str, weight: torch.Tensor, baseline: torch.Tensor) -> None:
        """Set one site's weight to ``weight`` as well as the memory can hold it (``projected``)."""
        with torch.no_grad():
            self.memory.copy_(self.projected({site_name: weight}, baseline))

    def rows(self, site_name: str, ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor | None:
        """``F.embedding(ids, weight, padding_idx)`` reading only the looked-up rows from the memory
        (``roastfx::roast_embedding``), or None where the whole weight will do or must: while torch.compile
        traces (the backend fuses the lookup itself) or under a torch.func transform, when the site's view
        is the weight transposed (a table tied to a head that owns the site), or when there are at least as
        many ids as rows."""
        site = self._sites[site_name]
        if (site.transposed or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or ids.dtype not in (torch.int64, torch.int32)):
            return None
        if ids.numel() >= site.mapping.rows:
            return None  # as many lookups as rows (position and token-type tables): the whole weight is cheaper
        if ids.numel() and ids.device.type == "cpu":  # F.embedding's check
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= site.mapping.rows:
                raise IndexError(f"embedding index {low if low < 0 else high} is out of range for "
                                 f"{site.mapping.rows} rows (site {site_name!r}): indices must be in "
                                 f"[0, {site.mapping.rows})")
        elif ids.numel():  # on a GPU as F.embedding does it: a device-side assert, no synchronization
            torch._assert_async(((ids >= 0) & (ids < site.mapping.rows)).all())
        check_grad_scaling(self.plan.grad_scaling)
        grad_norm = self.plan.grad_scaling == "site" and self.memory.requires_grad and torch.is_grad_enabled()
        out = ops.roast_embedding(ids, self.memory, self._args[site_name], site.scale, padding_idx, grad_norm)
        dtype = self.compute_dtypes[site_name]
        return out if out.dtype == dtype else out.to(dtype)

    def current_plan(self) -> Plan:
        """The plan with the dtypes the model has now (memory and weights), which ``.to()`` may have changed."""
        sites = tuple(dataclasses.replace(s, dtype=NAMES.get(self.compute_dtypes[s.name], s.dtype))
                      for s in self.plan.sites)
        return dataclasses.replace(self.plan, sites=sites,
                                   memory_dtype=NAMES.get(self.memory.dtype, self.plan.memory_dtype))

    def follow_conversion(self, fn) -> None:
        """After ``root._apply(fn)`` (model.to, .double(), .half(), ...): each site's weight dtype becomes what
        ``fn`` makes of a tensor of its old dtype, as it did for every dense parameter."""
        for name, dtype in self.compute_dtypes.items():
            converted = fn(torch.empty(0, dtype=dtype))
            if isinstance(converted, torch.Tensor) and converted.is_floating_point():
                self.compute_dtypes[name] = converted.dtype

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
        self._slot_load = None
