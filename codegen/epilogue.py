"""Epilogues: the chain of pointwise ops that follows a fused ROAST GEMM, as data.

An `Epilogue` is a tuple of `Step`s applied in order to the GEMM's output z, shape
(..., N). Each step is one pointwise op:

    add / sub / rsub / mul / div / rdiv   by a scalar constant or by an extra tensor
                                           (rsub: operand - z, rdiv: operand / z)
    relu, gelu (erf), gelu_tanh, silu, tanh, sigmoid
    cast                                   to float32, float16 or bfloat16

An extra tensor broadcasts to z's shape without growing it: a per-column (N,) vector
such as a bias, or a (..., N) tensor such as a residual.

Three views of one epilogue:

- ``signature``: a string that serializes it exactly (it crosses the custom op boundary);
  ``Epilogue.parse`` reads it back. ``pattern`` is the signature without the constants'
  values: generated kernels are cached by pattern and take the constants as arguments.
- ``apply(z, extras)``: eager torch, the reference (differentiable with autograd).
- ``triton_lines()``: the epilogue lowered to Triton source lines (no Triton import here).

This module imports neither Triton nor anything in passes/.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BINARY = ("add", "sub", "rsub", "mul", "div", "rdiv")
UNARY = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
CAST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TL_DTYPES = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}
_SEP = "|"


@dataclass(frozen=True)
class Step:
    """One pointwise op on z. Binary ops have exactly one of ``value`` (a constant) or
    ``extra`` (index into the extra tensors); ``cast`` has ``dtype`` (a CAST_DTYPES name)."""

    op: str
    value: float | None = None
    extra: int | None = None
    dtype: str | None = None

    def __post_init__(self):
        if self.op in BINARY:
            if (self.value is None) == (self.extra is None):
                raise ValueError(f"epilogue step {self.op!r} needs exactly one of a constant or an extra tensor")
            if self.value is not None:
                if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
                    raise TypeError(f"epilogue step {self.op!r}: constant {self.value!r} is not a number")
                if not math.isfinite(self.value):
                    raise ValueError(f"epilogue step {self.op!r}: constant {self.value!r} is not finite")
                object.__setattr__(self, "value", float(self.value))
            if self.extra is not None and (not isinstance(self.extra, int) or self.extra < 0):
                raise ValueError(f"epilogue step {self.op!r}: extra index {self.extra!r} is not an int >= 0")
        elif self.op == "cast":
            if self.dtype not in CAST_DTYPES:
                raise ValueError(f"epilogue cast to {self.dtype!r}: accepted dtypes are {', '.join(CAST_DTYPES)}")
        elif self.op not in UNARY:
            raise ValueError(f"epilogue op {self.op!r} is not one of {', '.join(BINARY + UNARY + ('cast',))}")
        if self.op not in BINARY and (self.value is not None or self.extra is not None):
            raise ValueError(f"epilogue step {self.op!r} takes no operand")

    @property
    def token(self) -> str:
        """This step in a signature: ``mul:0.5``, ``add:x0``, ``relu``, ``cast:bfloat16``."""
        if self.op in BINARY:
            return f"{self.op}:{'x%d' % self.extra if self.extra is not None else repr(self.value)}"
        if self.op == "cast":
            return f"cast:{self.dtype}"
        return self.op

    @classmethod
    def parse(cls, token: str) -> "Step":
        op, _, arg = token.strip().partition(":")
        if op in BINARY:
            if arg.startswith("x") and arg[1:].isdigit():
                return cls(op, extra=int(arg[1:]))
            try:
                return cls(op, value=float(arg))
            except ValueError:
                raise ValueError(f"epilogue step {token!r}: operand {arg!r} is neither xN nor a number") from None
        if op == "cast":
            return cls(op, dtype=arg)
        if arg:
            raise ValueError(f"epilogue step {token!r}: {op!r} takes no operand")
        return cls(op)


@dataclass(frozen=True)
class Epilogue:
    steps: tuple[Step, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        used = sorted({s.extra for s in self.steps if s.extra is not None})
        if used != list(range(len(used))):
            raise ValueError(f"epilogue extras must be numbered 0..n-1 in use, got x{used}")

    # -- serialization ----------------------------------------------------------------------
    @property
    def signature(self) -> str:
        return _SEP.join(s.token for s in self.steps)

    @classmethod
    def parse(cls, signature: str) -> "Epilogue":
        if not isinstance(signature, str):
            raise TypeError(f"an epilogue signature is a str, got {type(signature).__name__}")
        return cls(tuple(Step.parse(t) for t in signature.split(_SEP) if t.strip()))

    @property
    def constants(self) -> tuple[float, ...]:
        return tuple(s.value for s in self.steps if s.value is not None)

    @property
    def pattern(self) -> str:
        """The signature with each constant replaced by its argument name c0, c1 ...: the kernel cache key."""
        tokens, k = [], 0
        for s in self.steps:
            if s.value is not None:
                tokens.append(f"{s.op}:c{k}")
                k += 1
            else:
                tokens.append(s.token)
        return _SEP.join(tokens)

    @property
    def pattern_hash(self) -> str:
        return hashlib.sha256(self.pattern.encode()).hexdigest()[:16]

    @property
    def num_extras(self) -> int:
        return len({s.extra for s in self.steps if s.extra is not None})

    def __add__(self, other: "Epilogue") -> "Epilogue":
        """``self`` then ``other``; other's extras are renumbered after self's."""
        shift = self.num_extras
        moved = tuple(Step(s.op, s.value, s.extra + shift, s.dtype) if s.extra is not None else s for s in other.steps)
        return Epilogue(self.steps + moved)

    # -- eager reference ---------------------------------------------------------------------
    def apply(self, z: torch.Tensor, extras=()) -> torch.Tensor:
        """The epilogue in eager torch (type promotion and broadcasting as torch does them)."""
        extras = list(extras)
        if len(extras) != self.num_extras:
            raise ValueError(f"epilogue {self.signature!r} takes {self.num_extras} extra tensors, got {len(extras)}")
        for s in self.steps:
            operand = extras[s.extra] if s.extra is not None else s.value
            z = _EAGER[s.op](z, operand if s.op in BINARY else s.dtype)
        return z

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
        """The dtype ``apply`` returns for an input of ``in_dtype`` (torch's promotion rules)."""
        dtype = in_dtype
        for s in self.steps:
            if s.op == "cast":
                dtype = CAST_DTYPES[s.dtype]
            elif s.extra is not None:
                e = extras[s.extra]
                probe = torch.empty((), dtype=e.dtype, device="meta") if e.dim() == 0 else \
                    torch.empty((1,), dtype=e.dtype, device="meta")
                dtype = torch.result_type(torch.empty((1,), dtype=dtype, device="meta"), probe)
        return dtype

    # -- Triton lowering ---------------------------------------------------------------------
    def triton_lines(self) -> list[str]:
        """The epilogue as Triton statements on an fp32 block ``z``.

        Names the lines assume: ``z`` (fp32, the scaled GEMM block), ``mask`` (its valid
        elements), ``offs_m`` / ``offs_n`` (its rows and columns), for extra i the arguments
        ``x{i}_ptr``, ``stride_x{i}m``, ``stride_x{i}n`` (its (M, N) broadcast view), and
        for constant k the fp32 argument ``c{k}``. Math stays fp32; a cast rounds to its dtype.
        Each step is preceded by a comment naming the FX ops it stands for.
        """
        lines, k = [], 0
        for s, token in zip(self.steps, self.pattern.split(_SEP)):
            lines.append(f"# {token}: {_FX_NAMES[s.op]}")
            if s.op in BINARY:
                if s.extra is not None:
                    i = s.extra
                    operand = f"x{i}"
                    lines.append(
                        f"x{i} = tl.load(x{i}_ptr + offs_m[:, None] * stride_x{i}m + offs_n[None, :] * stride_x{i}n, "
                        f"mask=mask, other=0.0).to(tl.float32)"
                    )
                else:
                    operand = f"c{k}"
                    k += 1
                lines.append("z = " + _TRITON_BINARY[s.op].format(z="z", v=operand))
            elif s.op == "cast":
                lines.append(f"z = z.to({_TL_DTYPES[s.dtype]}).to(tl.float32)")
            else:
                lines.extend(_TRITON_UNARY[s.op].split("\n"))
        return lines


def _rsub(z, v):
    return v - z


def _rdiv(z, v):
    return v / z


_EAGER = {
    "add": lambda z, v: z + v,
    "sub": lambda z, v: z - v,
    "rsub": _rsub,
    "mul": lambda z, v: z * v,
    "div": lambda z, v: z / v,
    "rdiv": _rdiv,
    "relu": lambda z, _: F.relu(z),
    "gelu": lambda z, _: F.gelu(z),
    "gelu_tanh": lambda z, _: F.gelu(z, approximate="tanh"),
    "silu": lambda z, _: F.silu(z),
    "tanh": lambda z, _: torch.tanh(z),
    "sigmoid": lambda z, _: torch.sigmoid(z),
    "cast": lambda z, dtype: z.to(CAST_DTYPES[dtype]),
}

_TRITON_BINARY = {
    "add": "{z} + {v}", "sub": "{z} - {v}", "rsub": "{v} - {z}",
    "mul": "{z} * {v}", "div": "{z} / {v}", "rdiv": "{v} / {z}",
}

# exp-based forms need no libdevice; clamping the exponent keeps exp finite (fp32: |u| > 15 is +-1 already)
_TRITON_UNARY = {
    "relu": "z = tl.where(z > 0.0, z, 0.0)",
    "gelu": "z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))",
    "gelu_tanh": "u = tl.minimum(tl.maximum(0.7978845608028654 * (z + 0.044715 * z * z * z), -15.0), 15.0)\n"
                 "z = 0.5 * z * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))",
    "silu": "z = z / (1.0 + tl.exp(tl.minimum(-z, 80.0)))",
    "tanh": "u = tl.minimum(tl.maximum(z, -15.0), 15.0)\nz = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)",
    "sigmoid": "z = 1.0 / (1.0 + tl.exp(tl.minimum(-z, 80.0)))",
}

_FX_NAMES = {
    "add": "operator.add / torch.add / Tensor.add (bias, residual or constant)",
    "sub": "operator.sub / torch.sub / Tensor.sub",
    "rsub": "operator.sub with the GEMM output on the right",
    "mul": "operator.mul / torch.mul / Tensor.mul (scaling)",
    "div": "operator.truediv / torch.div / Tensor.div",
    "rdiv": "operator.truediv with the GEMM output on the right",
    "relu": "torch.relu / F.relu / Tensor.relu",
    "gelu": "F.gelu (erf)",
    "gelu_tanh": "F.gelu(approximate='tanh')",
    "silu": "F.silu",
    "tanh": "torch.tanh / Tensor.tanh",
    "sigmoid": "torch.sigmoid / Tensor.sigmoid",
    "cast": "Tensor.to(dtype) / .float() / .half() / .bfloat16()",
}


def fused_op():
    """The custom op that runs ``epilogue(x @ V)`` (registered on first use; no Triton import)."""
    from . import epilogue_op  # noqa: F401 - registers roastfx::roast_linear_epilogue

    return torch.ops.roastfx.roast_linear_epilogue.default
