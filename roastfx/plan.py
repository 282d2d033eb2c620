"""The plan data model: sites, their mappings, the one global memory.

A *site* is one compressed weight tensor (tied uses of one tensor are one site).
A *plan* holds every piece of mapping state: seed, memory size, per-site hash
tile, alignment, window, hash constants and scale. A checkpoint stores the plan
whole, so nothing about the mapping depends on code defaults, kernels or devices.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from roastfx.codegen.hashing import TileHash

SCHEMA_VERSION = 1
SCHEMES = ("roast", "roast-local", "hashednet")
# how each site's gradient is scaled before it is added into the shared memory (see module.py)
GRAD_SCALINGS = ("none", "site")


def check_grad_scaling(value) -> str:
    if value not in GRAD_SCALINGS:
        raise ValueError(f"grad_scaling={value!r} is not valid; accepted: {', '.join(map(repr, GRAD_SCALINGS))}")
    return value


@dataclass(frozen=True)
class Site:
    """One compressed weight and how its elements map to the memory."""

    name: str  # canonical parameter name (the first of its bindings)
    bindings: tuple[str, ...]  # every "module.path.attr" that holds this tensor
    shape: tuple[int, ...]  # the dense parameter's shape
    op: str  # linear | conv | embedding | embedding_bag | matmul | rnn | attention
    transposed: bool  # B view = W2d.T (F.linear / conv) or W2d (x @ W, embedding)
    dtype: str  # the dense parameter's dtype, e.g. "float32"
    scale: float  # recovered weight = scale * sign * memory[index]
    mapping: TileHash
    other_ops: tuple[str, ...] = ()  # the ops of other modules reading this (tied) weight, e.g. a tied lm_head

    @property
    def ops(self) -> tuple[str, ...]:
        """Every op that reads the weight: its own, then the tied readers'."""
        return (self.op, *self.other_ops)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "bindings": list(self.bindings),
            "shape": list(self.shape),
            "op": self.op,
            "transposed": self.transposed,
            "dtype": self.dtype,
            "scale": self.scale,
            "mapping": self.mapping.to_dict(),
            "other_ops": list(self.other_ops),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Site":
        return cls(
            name=d["name"],
            bindings=tuple(d["bindings"]),
            shape=tuple(d["shape"]),
            op=d["op"],
            transposed=bool(d["transposed"]),
            dtype=d["dtype"],
            scale=float(d["scale"]),
            mapping=TileHash(**d["mapping"]),
            other_ops=tuple(d.get("other_ops", ())),  # plans written before the field: none recorded
        )


@dataclass(frozen=True)
class Plan:
    """One global compressed layout for a whole model."""

    seed: int
    memory_size: int
    memory_dtype: str
    scheme: str
    target: str
    sites: tuple[Site, ...]
    schema_version: int = SCHEMA_VERSION
    notes: tuple[str, ...] = field(default=())
    grad_scaling: str = "none"  # "site": each site's weight gradient is RMS-normalized before it reaches the memory

    def __post_init__(self):
        check_grad_scaling(self.grad_scaling)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites: {[s.name for s in self.sites]}")

    @property
    def dense_numel(self) -> int:
        return sum(s.numel for s in self.sites)

    @property
    def ratio(self) -> float:
        """Dense elements per memory slot (100.0 means 100x smaller)."""
        return self.dense_numel / self.memory_size

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "seed": self.seed,
            "memory_size": self.memory_size,
            "memory_dtype": self.memory_dtype,
            "scheme": self.scheme,
            "target": self.target,
            "notes": list(self.notes),
            "grad_scaling": self.grad_scaling,
            "sites": [s.to_dict() for s in self.sites],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {version!r} is not supported; this roastfx reads {SCHEMA_VERSION}")
        return cls(
            seed=int(d["seed"]),
            memory_size=int(d["memory_size"]),
            memory_dtype=d["memory_dtype"],
            scheme=d["scheme"],
            target=d["target"],
            sites=tuple(Site.from_dict(s) for s in d["sites"]),
            schema_version=version,
            notes=tuple(d.get("notes", ())),
            grad_scaling=d.get("grad_scaling", "none"),  # plans written before the option: plain gradients
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """A short text table: one line per site and the totals."""
        lines = [
            f"roastfx plan: scheme={self.scheme} target={self.target} seed={self.seed}"
            + (f" grad_scaling={self.grad_scaling}" if self.grad_scaling != "none" else ""),
            f"{'site':40s} {'op':10s} {'shape':>16s} {'tile':>8s} {'align':>5s} {'scale':>9s}",
        ]
        for s in self.sites:
            m = s.mapping
            shape = "x".join(map(str, s.shape))
            lines.append(
                f"{s.name[:40]:40s} {s.op:10s} {shape:>16s} {m.tile_rows}x{m.tile_cols:<5d} {m.alignment:>5d} {s.scale:9.3g}"
            )
        dense_bytes = sum(s.numel * _itemsize(s.dtype) for s in self.sites)
        mem_bytes = self.memory_size * _itemsize(self.memory_dtype)
        lines.append(
            f"{len(self.sites)} sites, {self.dense_numel:,} dense weights -> memory of {self.memory_size:,} "
            f"{self.memory_dtype} slots ({self.ratio:.1f}x fewer elements; {_fmt_bytes(dense_bytes)} -> "
            f"{_fmt_bytes(mem_bytes)}, {dense_bytes / mem_bytes:.1f}x smaller)"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name ("float32", "bfloat16", ...)."""
    dt = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name; accepted: e.g. 'float32', 'bfloat16', 'float16'")
    return dt.itemsize


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"
