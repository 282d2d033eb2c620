"""Epilogues: the pointwise ops that follow a fused ROAST GEMM, as data.

An `Epilogue` is a small SSA program on the GEMM's output z, shape (..., N). Value v0 is
z; step i computes value v(i+1) from earlier values, extra tensors and constants; the
epilogue's result is its last value. Each step is one pointwise op:

    add / sub / mul / div        two operands: values vK, extras xI or constants
    relu, gelu (erf), gelu_tanh, silu, tanh, sigmoid, exp, erf, rsqrt
    cast                         to float32, float16 or bfloat16

so a chain (``bias -> gelu -> * 0.5 -> + residual``) and a graph that reads a value several
times (GPT-2's ``0.5 * z * (1 + tanh(0.79788 * (z + 0.044715 * z**3)))``, ``z * sigmoid(z)``)
are both epilogues. An extra tensor broadcasts to z's shape without growing it: a per-column
(N,) vector such as a bias, or a (..., N) tensor such as a residual.

Three views of one epilogue:

- ``signature``: a string that serializes it exactly (it crosses the custom op boundary);
  ``Epilogue.parse`` reads it back. A step that applies to the value just before it is
  written in chain form (``add:x0``, ``mul:0.5``, ``rsub:1.0`` = 1.0 - v, ``rdiv:x1`` =
  x1 / v, ``gelu``, ``cast:bfloat16``), any other in SSA form (``mul(v1,v3)``,
  ``cast(v2,float16)``); ``|`` separates steps. ``pattern`` is the signature without the
  constants' values: generated kernels are cached by pattern and take the constants as
  arguments.
- ``apply(z, extras)``: eager torch, the reference (differentiable with autograd).
- ``triton_lines()``: the epilogue lowered to Triton source lines (no Triton import here).

This module imports neither Triton nor anything in passes/.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

BINARY = ("add", "sub", "mul", "div")
UNARY = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "exp", "erf", "rsqrt")
OPS = BINARY + UNARY + ("cast",)
CAST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TL_DTYPES = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}
_SEP = "|"
_REF = re.compile(r"^([vx])(\d+)$")
# chain tokens: op -> (SSA op, whether the previous value is the right operand)
_CHAIN_BINARY = {"add": ("add", False), "sub": ("sub", False), "rsub": ("sub", True),
                 "mul": ("mul", False), "div": ("div", False), "rdiv": ("div", True)}
_COMMUTATIVE = ("add", "mul")


def _is_ref(a, kind=None) -> bool:
    return isinstance(a, str) and bool(_REF.match(a)) and (kind is None or a[0] == kind)


def _ref_index(a: str) -> int:
    return int(a[1:])


def _check_operand(op: str, a) -> object:
    if isinstance(a, str):
        if not _REF.match(a):
            raise ValueError(f"epilogue step {op!r}: operand {a!r} is neither vN, xN nor a number")
        return a
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        raise TypeError(f"epilogue step {op!r}: constant {a!r} is not a number")
    if not math.isfinite(a):
        raise ValueError(f"epilogue step {op!r}: constant {a!r} is not finite")
    return float(a)


@dataclass(frozen=True)
class Step:
    """One pointwise op. ``args`` are its operands: ``"vK"`` (value K; v0 is the GEMM output),
    ``"xI"`` (extra tensor I) or a float constant; binary ops take two, the others one, and at
    least one operand is a tensor. ``cast`` has ``dtype`` (a CAST_DTYPES name). add and mul keep
    a value operand first (they commute), so one computation has one signature."""

    op: str
    args: tuple = ()
    dtype: str | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"epilogue op {self.op!r} is not one of {', '.join(OPS)}")
        args = tuple(_check_operand(self.op, a) for a in (self.args if isinstance(self.args, (tuple, list))
                                                           else (self.args,)))
        arity = 2 if self.op in BINARY else 1
        if len(args) != arity:
            raise ValueError(f"epilogue step {self.op!r} takes {arity} operand(s), got {len(args)}: {args!r}")
        if not any(isinstance(a, str) for a in args):
            raise ValueError(f"epilogue step {self.op!r} has only constants {args!r}: fold it before the epilogue")
        if self.op in _COMMUTATIVE and _is_ref(args[1], "v") and not _is_ref(args[0], "v"):
            args = (args[1], args[0])
        object.__setattr__(self, "args", args)
        if self.op == "cast":
            if self.dtype not in CAST_DTYPES:
                raise ValueError(f"epilogue cast to {self.dtype!r}: accepted dtypes are {', '.join(CAST_DTYPES)}")
        elif self.dtype is not None:
            raise ValueError(f"epilogue step {self.op!r} takes no dtype")

    def token(self, index: int, constant_names=None) -> str:
        """This step (the ``index``-th, computing v(index+1)) in a signature; constants are written
        by value, or by the names in the iterator ``constant_names`` (the pattern)."""
        prev = f"v{index}"

        def show(a):
            return a if isinstance(a, str) else (next(constant_names) if constant_names is not None else repr(a))

        a = self.args
        if self.op == "cast":
            return f"cast:{self.dtype}" if a == (prev,) else f"cast({show(a[0])},{self.dtype})"
        if self.op in UNARY:
            return self.op if a == (prev,) else f"{self.op}({show(a[0])})"
        if a[0] == prev and not _is_ref(a[1], "v"):
            return f"{self.op}:{show(a[1])}"
        if a[1] == prev and not _is_ref(a[0], "v") and self.op in ("sub", "div"):
            return f"r{self.op}:{show(a[0])}"
        return f"{self.op}({show(a[0])},{show(a[1])})"

    @classmethod
    def parse(cls, token: str, index: int) -> "Step":
        """Read one signature token, the ``index``-th step."""
        token = token.strip()
        prev = f"v{index}"
        if token.endswith(")") and "(" in token:
            op, _, inner = token[:-1].partition("(")
            parts = [p.strip() for p in inner.split(",")]
            if op == "cast":
                if len(parts) != 2:
                    raise ValueError(f"epilogue step {token!r}: cast(value,dtype) expected")
                return cls("cast", (_operand(parts[0], token),), dtype=parts[1])
            if op not in BINARY + UNARY:
                raise ValueError(f"epilogue op {op!r} is not one of {', '.join(OPS)}")
            return cls(op, tuple(_operand(p, token) for p in parts))
        op, _, arg = token.partition(":")
        if op in _CHAIN_BINARY:
            name, reverse = _CHAIN_BINARY[op]
            if not arg:
                raise ValueError(f"epilogue step {token!r}: {op!r} needs an operand (xN or a number)")
            operand = _operand(arg, token)
            if _is_ref(operand, "v"):
                raise ValueError(f"epilogue step {token!r}: a chain operand is xN or a number; write {op}(vA,vB)")
            return cls(name, (operand, prev) if reverse else (prev, operand))
        if op == "cast":
            return cls(op, (prev,), dtype=arg)
        if op not in OPS:
            raise ValueError(f"epilogue op {op!r} is not one of {', '.join(OPS)}")
        if arg:
            raise ValueError(f"epilogue step {token!r}: {op!r} takes no operand")
        return cls(op, (prev,))


def _operand(text: str, token: str):
    if _REF.match(text):
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"epilogue step {token!r}: operand {text!r} is neither vN, xN nor a number") from None


@dataclass(frozen=True)
class Epilogue:
    steps: tuple[Step, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        for i, s in enumerate(self.steps):
            for a in s.args:
                if _is_ref(a, "v") and _ref_index(a) > i:
                    raise ValueError(f"epilogue step {i} ({s.op}) reads {a}, which is not computed before it "
                                     f"(v0 is the GEMM output, v1..v{i} the steps before)")
        used = sorted({_ref_index(a) for s in self.steps for a in s.args if _is_ref(a, "x")})
        if used != list(range(len(used))):
            raise ValueError(f"epilogue extras must be numbered 0..n-1 in use, got x{used}")

    # -- serialization ----------------------------------------------------------------------
    @property
    def signature(self) -> str:
        return _SEP.join(s.token(i) for i, s in enumerate(self.steps))

    @classmethod
    def parse(cls, signature: str) -> "Epilogue":
        if not isinstance(signature, str):
            raise TypeError(f"an epilogue signature is a str, got {type(signature).__name__}")
        tokens = [t for t in signature.split(_SEP) if t.strip()]
        return cls(tuple(Step.parse(t, i) for i, t in enumerate(tokens)))

    @property
    def constants(self) -> tuple[float, ...]:
        return tuple(a for s in self.steps for a in s.args if not isinstance(a, str))

    @property
    def pattern(self) -> str:
        """The signature with each constant replaced by its argument name c0, c1 ...: the kernel cache key."""
        names = (f"c{k}" for k in range(len(self.constants)))
        return _SEP.join(s.token(i, names) for i, s in enumerate(self.steps))

    @property
    def pattern_hash(self) -> str:
        return hashlib.sha256(self.pattern.encode()).hexdigest()[:16]

    @property
    def num_extras(self) -> int:
        return len({a for s in self.steps for a in s.args if _is_ref(a, "x")})

    def __add__(self, other: "Epilogue") -> "Epilogue":
        """``self`` then ``other`` on its result; other's values and extras are renumbered after self's."""
        shift_v, shift_x = len(self.steps), self.num_extras

        def move(a):
            if _is_ref(a, "v"):
                return f"v{_ref_index(a) + shift_v}"
            return f"x{_ref_index(a) + shift_x}" if _is_ref(a, "x") else a

        moved = tuple(Step(s.op, tuple(move(a) for a in s.args), s.dtype) for s in other.steps)
        return Epilogue(self.steps + moved)

    # -- eager reference ---------------------------------------------------------------------
    def apply(self, z: torch.Tensor, extras=()) -> torch.Tensor:
        """The epilogue in eager torch (type promotion and broadcasting as torch does them)."""
        extras = list(extras)
        if len(extras) != self.num_extras:
            raise ValueError(f"epilogue {self.signature!r} takes {self.num_extras} extra tensors, got {len(extras)}")
        values = [z]

        def read(a):
            if isinstance(a, str):
                return (values if a[0] == "v" else extras)[_ref_index(a)]
            return a

        for s in self.steps:
            operands = [read(a) for a in s.args]
            values.append(_EAGER[s.op](*operands, s.dtype) if s.op == "cast" else _EAGER[s.op](*operands))
        return values[-1]

    def vjp(self, z: torch.Tensor, extras, grad_out: torch.Tensor):
        """(dz, [d extra_i or None]) of ``apply(z, extras)`` for the output gradient ``grad_out``: the
        vjp of the eager form (torch.func), for z and every floating-point extra, each extra's
        gradient in its own dtype and device."""
        extras = list(extras)
        wants = [i for i, e in enumerate(extras) if e.is_floating_point()]

        def run(z, *differentiable):
            operands = list(extras)
            for i, t in zip(wants, differentiable):
                operands[i] = t
            return self.apply(z, operands)

        _, pullback = torch.func.vjp(run, z, *[extras[i] for i in wants])
        grad_z, *grad_wanted = pullback(grad_out.to(self.out_dtype(z.dtype, extras)))
        grad_extras: list[torch.Tensor | None] = [None] * len(extras)
        for i, g in zip(wants, grad_wanted):
            grad_extras[i] = g.to(extras[i].device, extras[i].dtype)
        return grad_z, grad_extras

    def check_extras(self, out_shape, extras) -> None:
        """Each extra must broadcast to the output shape without growing it."""
        if len(extras) != self.num_extras:
            raise ValueError(f"epilogue {self.signature!r} takes {self.num_extras} extra tensors, got {len(extras)}")
        out_shape = tuple(out_shape)
        for i, e in enumerate(extras):
            try:
                fits = torch.broadcast_shapes(tuple(e.shape), out_shape) == out_shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"epilogue extra x{i} has shape {tuple(e.shape)}, which does not broadcast to the output "
                    f"shape {out_shape} without growing it"
                )

    def out_dtype(self, in_dtype: torch.dtype, extras=()) -> torch.dtype:
        """The dtype ``apply`` returns for an input of ``in_dtype`` (torch's promotion rules), found by
        running the epilogue on meta tensors (a 0-dim extra promotes as a scalar, as in eager torch).
        Every op call asks, so the answer is cached per (epilogue, dtypes)."""
        return _out_dtype(self, in_dtype, tuple((e.dtype, e.dim() == 0) for e in extras))

    # -- Triton lowering ---------------------------------------------------------------------
    def triton_lines(self, extra_load=None) -> list[str]:
        """The epilogue as Triton statements on an fp32 block ``z``, leaving the result in ``z``.

        Names the lines assume: ``z`` (fp32, the scaled GEMM block), ``mask`` (its valid
        elements), ``offs_m`` / ``offs_n`` (its rows and columns), for extra i the arguments
        ``x{i}_ptr``, ``stride_x{i}m``, ``stride_x{i}n`` (its (M, N) broadcast view), and
        for constant k the fp32 argument ``c{k}``. ``extra_load(i)`` replaces the expression that
        loads extra i (kernels specialized to an extra's broadcast, conv kernels' addressing).
        Value k is the block ``v{k}``; each extra is loaded once, before its first use. Math
        stays fp32; a cast rounds to its dtype. Each step is preceded by a comment naming the
        FX ops it stands for.
        """
        if extra_load is None:
            def extra_load(i):
                return (f"tl.load(x{i}_ptr + offs_m[:, None] * stride_x{i}m + offs_n[None, :] * stride_x{i}n, "
                        f"mask=mask, other=0.0)")
        if not self.steps:
            return []
        lines, loaded = ["v0 = z"], set()
        names = iter(f"c{k}" for k in range(len(self.constants)))
        tokens = self.pattern.split(_SEP)
        for i, (s, token) in enumerate(zip(self.steps, tokens)):
            lines.append(f"# {token}: {_FX_NAMES[s.op]}")
            operands = []
            for a in s.args:
                if _is_ref(a, "x") and a not in loaded:
                    loaded.add(a)
                    lines.append(f"{a} = {extra_load(_ref_index(a))}.to(tl.float32)")
                operands.append(a if isinstance(a, str) else next(names))
            out = f"v{i + 1}"
            if s.op in BINARY:
                lines.append(f"{out} = {operands[0]} {_TRITON_BINARY[s.op]} {operands[1]}")
            elif s.op == "cast":
                lines.append(f"{out} = {operands[0]}.to({_TL_DTYPES[s.dtype]}).to(tl.float32)")
            else:
                lines.extend(_TRITON_UNARY[s.op].format(a=operands[0], o=out).split("\n"))
        lines.append(f"z = v{len(self.steps)}")
        return lines


@lru_cache(maxsize=4096)
def _out_dtype(epilogue: Epilogue, in_dtype: torch.dtype, extras: tuple) -> torch.dtype:
    probes = [torch.empty(() if scalar else (1,), dtype=dtype, device="meta") for dtype, scalar in extras]
    return epilogue.apply(torch.empty((1,), dtype=in_dtype, device="meta"), probes).dtype


_EAGER = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "exp": torch.exp,
    "erf": torch.erf,
    "rsqrt": torch.rsqrt,
    "cast": lambda a, dtype: a.to(CAST_DTYPES[dtype]),
}

_TRITON_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

# exp-based forms need no libdevice; clamping the exponent keeps exp finite (fp32: |u| > 15 is +-1 already)
_TRITON_UNARY = {
    "relu": "{o} = tl.where({a} > 0.0, {a}, 0.0)",
    "gelu": "{o} = 0.5 * {a} * (1.0 + tl.math.erf({a} * 0.7071067811865476))",
    "gelu_tanh": "u = tl.minimum(tl.maximum(0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a}), -15.0), 15.0)\n"
                 "{o} = 0.5 * {a} * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))",
    "silu": "{o} = {a} / (1.0 + tl.exp(tl.minimum(-{a}, 80.0)))",
    "tanh": "u = tl.minimum(tl.maximum({a}, -15.0), 15.0)\n{o} = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)",
    "sigmoid": "{o} = 1.0 / (1.0 + tl.exp(tl.minimum(-{a}, 80.0)))",
    "exp": "{o} = tl.exp({a})",
    "erf": "{o} = tl.math.erf({a})",
    "rsqrt": "{o} = 1.0 / tl.sqrt({a})",
}

_FX_NAMES = {
    "add": "operator.add / torch.add / Tensor.add (bias, residual or constant)",
    "sub": "operator.sub / torch.sub / Tensor.sub",
    "mul": "operator.mul / torch.mul / Tensor.mul / operator.neg / pow by 2, 3 or 4",
    "div": "operator.truediv / torch.div / Tensor.div",
    "relu": "torch.relu / F.relu / Tensor.relu",
    "gelu": "F.gelu (erf)",
    "gelu_tanh": "F.gelu(approximate='tanh')",
    "silu": "F.silu",
    "tanh": "torch.tanh / Tensor.tanh",
    "sigmoid": "torch.sigmoid / Tensor.sigmoid",
    "exp": "torch.exp / Tensor.exp",
    "erf": "torch.erf / Tensor.erf",
    "rsqrt": "torch.rsqrt / Tensor.rsqrt, F.batch_norm (eval)",
    "cast": "Tensor.to(dtype) / .float() / .half() / .bfloat16()",
}


def fused_op():
    """The custom op that runs ``epilogue(x @ V)`` (registered on first use; no Triton import)."""
    from . import epilogue_op  # noqa: F401 - registers roastfx::roast_linear_epilogue

    return torch.ops.roastfx.roast_linear_epilogue.default


def conv_fused_op():
    """The custom op that runs ``epilogue(conv(x, W))`` (registered on first use; no Triton import)."""
    from . import conv  # noqa: F401 - registers roastfx::roast_conv_epilogue

    return torch.ops.roastfx.roast_conv_epilogue.default


def conv_transpose_fused_op():
    """The custom op that runs ``epilogue(conv_transpose(x, W))`` (registered on first use; no Triton import)."""
    from . import conv  # noqa: F401 - registers roastfx::roast_conv_transpose_epilogue

    return torch.ops.roastfx.roast_conv_transpose_epilogue.default


def embedding_fused_op():
    """The custom op that runs ``epilogue(view[ids])`` (registered on first use; no Triton import)."""
    from . import epilogue_op  # noqa: F401 - registers roastfx::roast_embedding_epilogue

    return torch.ops.roastfx.roast_embedding_epilogue.default
