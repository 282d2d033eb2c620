"""Differential fuzz of the whole backend over random models: compiled (backend="roast") against eager.

    python benchmarks/fuzz_models.py --cases 40 --seed 1       # CPU: reference ops and interpreted Triton kernels
    ROASTFX_TEST_CUDA=1 python benchmarks/fuzz_models.py      # a GPU
    python benchmarks/fuzz_models.py --seed 2 --only 12        # one case again (the numbers a run prints)

Each case draws a small model from a grammar of the layers and weight uses the backend rewrites -- linears
with activations, residuals and scalings after them (epilogue fusion), weights used functionally (``x @ W``,
``x @ W.T``, ``F.linear``, ``einsum``, ``torch.matmul``, ``addmm``, the weight on the left), weight norm over
every dim, embeddings and bags, a head tied to the embedding, multi-head attention, transformer encoder layers, a
linear used twice, GRUs, LSTMs (with projections) and RNNs (stacked, bidirectional), transformers' Conv1D,
bilinears, conv1d/2d and transposed convs at random kernels, strides, paddings,
dilations and groups (also ``F.conv1d`` over a plain parameter), batch and group norms -- compresses it (random ratio, seed,
hash tile and grad_scaling), and runs one training step eagerly and compiled (inner compiler aot_eager or
inductor; static or dynamic=True; roast ops on the reference path or the Triton kernels, interpreted on a CPU), then both again at
another batch size, then in eval under no_grad. It checks the outputs and the gradient of every parameter (the
memory, and what stayed dense) against eager's, and counts the weight reads that fused and why the others did not. Under autocast (a
quarter of the cases) the differences allowed include three times how far bfloat16 moves eager from eager in
float32.

Prints one line per failure, the reasons reads stayed materialized, and a summary; exits 1 if any case failed.
A model the generator built that eager itself cannot run is a generator bug and fails too. Not a timed benchmark:
a check of the passes on models nobody wrote a test for, too slow (minutes) for the test suite, which runs a few
cases (tests/test_benchmark_scripts.py).
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import random
import sys
import time
import traceback

if not os.environ.get("ROASTFX_TEST_CUDA"):
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before roastfx imports them

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.parametrizations import weight_norm  # noqa: E402

import roastfx  # noqa: E402
import roastfx.passes.fuse_roast_ops as fuse_pass  # noqa: E402

DEVICE = "cuda" if os.environ.get("ROASTFX_TEST_CUDA") else "cpu"
ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "none": lambda x: x}


# ---- sequence layers: (batch, tokens, features) -> (batch, tokens', features'); each sets .out (features),
# .t (tokens after it) and .desc ----

class Dense(nn.Module):
    """nn.Linear, an activation, and a scaling, a residual or both after it (epilogue material)."""

    def __init__(self, rng, d, t):
        super().__init__()
        self.out, self.t = rng.choice([d, rng.randrange(3, 40)]), t
        self.lin = nn.Linear(d, self.out, bias=rng.random() < 0.7)
        self.act = rng.choice(list(ACTIVATIONS))
        self.residual = self.out == d and rng.random() < 0.5
        self.factor = rng.choice([None, 0.5, -1.25])
        self.desc = f"linear({d}->{self.out}, bias={self.lin.bias is not None}) {self.act}" + (
            f" *{self.factor}" if self.factor else "") + (" +x" if self.residual else "")

    def forward(self, x):
        y = ACTIVATIONS[self.act](self.lin(x))
        if self.factor:
            y = y * self.factor
        return x + y if self.residual else y


class Functional(nn.Module):
    """A plain nn.Parameter used by a functional op (found with example_inputs)."""

    FORMS = ("x @ W", "x @ W.T", "F.linear", "einsum", "matmul", "addmm", "W @ x.mT")

    def __init__(self, rng, d, t):
        super().__init__()
        self.out, self.t = rng.randrange(3, 40), t
        self.form = rng.choice(self.FORMS)
        shape = (d, self.out) if self.form in ("x @ W", "matmul", "addmm") else (self.out, d)
        self.w = nn.Parameter(torch.randn(*shape) / d ** 0.5)
        self.b = nn.Parameter(torch.randn(self.out) * 0.1)
        self.desc = f"{self.form} W{tuple(shape)}"

    def forward(self, x):
        w = self.w
        if self.form == "x @ W":
            return x @ w
        if self.form == "x @ W.T":
            return x @ w.T + self.b
        if self.form == "F.linear":
            return F.linear(x, w, self.b)
        if self.form == "einsum":
            return torch.einsum("btd,od->bto", x, w)
        if self.form == "matmul":
            return torch.matmul(x, w)
        if self.form == "addmm":
            return torch.addmm(self.b, x.flatten(0, 1), w, beta=0.5, alpha=2.0).unflatten(0, x.shape[:2])
        return (w @ x.mT).mT  # (out, d) @ (b, d, t): the weight on the left


class Normed(nn.Module):
    """weight norm (torch's parametrization) of a linear over dim 0, 1 or all of it."""

    def __init__(self, rng, d, t):
        super().__init__()
        self.out, self.t = rng.randrange(3, 40), t
        dim = rng.choice([0, 1, None])
        self.lin = weight_norm(nn.Linear(d, self.out), dim=dim)
        self.desc = f"weight_norm(linear({d}->{self.out}), dim={dim})"

    def forward(self, x):
        return F.silu(self.lin(x))


class Attention(nn.Module):
    def __init__(self, rng, d, t):
        super().__init__()
        heads = rng.choice([h for h in (1, 2, 3, 4) if d % h == 0])
        self.out, self.t = d, t
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True, bias=rng.random() < 0.8)
        self.need_weights = rng.random() < 0.5
        self.causal = rng.random() < 0.5
        self.desc = f"mha(d={d}, heads={heads}, need_weights={self.need_weights}, causal={self.causal})"

    def forward(self, x):
        mask = None
        if self.causal:
            t = x.shape[1]
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        y, _ = self.mha(x, x, x, need_weights=self.need_weights, attn_mask=mask)
        return x + y


class Recurrent(nn.Module):
    """nn.GRU, nn.LSTM (maybe with projections) or nn.RNN: one or two layers, maybe bidirectional."""

    def __init__(self, rng, d, t):
        super().__init__()
        kind, hidden = rng.choice(["gru", "lstm", "rnn"]), rng.randrange(3, 16)
        layers, both = rng.choice([1, 1, 2]), rng.random() < 0.3
        extra = {"proj_size": rng.randrange(2, hidden)} if kind == "lstm" and rng.random() < 0.3 else {}
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind](d, hidden, layers, batch_first=True,
                                                                          bidirectional=both, **extra)
        self.out, self.t = extra.get("proj_size", hidden) * (2 if both else 1), t
        self.desc = f"{kind}({d}->{hidden}, layers={layers}, bidirectional={both}{', proj' if extra else ''})"

    def forward(self, x):
        return self.rnn(x)[0]


class GPT2Conv1D(nn.Module):
    """transformers' Conv1D (GPT-2's projections: x @ W + b with W stored (in, out))."""

    def __init__(self, rng, d, t):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.out, self.t = rng.randrange(3, 30), t
        self.proj = Conv1D(self.out, d)
        self.desc = f"gpt2 Conv1D({d}->{self.out})"

    def forward(self, x):  # Conv1D views its input: GPT-2 hands it contiguous activations
        return F.gelu(self.proj(x.contiguous()), approximate="tanh")


class Bilinear(nn.Module):
    def __init__(self, rng, d, t):
        super().__init__()
        self.out, self.t = rng.randrange(3, 16), t
        self.bil = nn.Bilinear(d, d, self.out)
        self.desc = f"bilinear({d},{d}->{self.out})"

    def forward(self, x):
        return self.bil(x, torch.tanh(x))


class SeqConv(nn.Module):
    """A conv1d over the tokens (channels = features), maybe transposed, maybe under weight norm."""

    def __init__(self, rng, d, t):
        super().__init__()
        groups = rng.choice([g for g in (1, 2, 3) if d % g == 0])
        self.out = groups * rng.randrange(1, 8)
        dilation = rng.choice([1, 1, 2])
        k = rng.choice([k for k in (1, 2, 3, 4, 5) if dilation * (k - 1) < t] or [1])
        reach = dilation * (k - 1)
        if rng.random() < 0.3:
            stride = rng.choice([1, 2])
            padding = rng.randrange(0, min(k, ((t - 1) * stride + reach) // 2 + 1))
            self.conv = nn.ConvTranspose1d(d, self.out, k, stride=stride, padding=padding, dilation=dilation,
                                           groups=groups)
            self.t = (t - 1) * stride - 2 * padding + reach + 1
            kind = f"conv_transpose1d(stride={stride}, padding={padding})"
        else:
            stride = rng.choice([1, 1, 2])
            padding = "same" if stride == 1 and rng.random() < 0.5 else rng.randrange(0, k + 1)
            self.conv = nn.Conv1d(d, self.out, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
            self.t = t if padding == "same" else (t + 2 * padding - reach - 1) // stride + 1
            kind = f"conv1d(stride={stride}, padding={padding!r})"
        norm_dim = rng.choice([None, None, 0, 1, 2])
        if norm_dim is not None and not (isinstance(self.conv, nn.ConvTranspose1d) and norm_dim == 2):
            self.conv = weight_norm(self.conv, dim=norm_dim)
            kind = f"weight_norm({kind}, dim={norm_dim})"
        self.desc = f"{kind} {d}->{self.out} k={k} dilation={dilation} groups={groups}"

    def forward(self, x):
        return F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer (no dropout); in eval under no_grad torch takes its fused fast path."""

    def __init__(self, rng, d, t):
        super().__init__()
        heads = rng.choice([h for h in (1, 2, 4) if d % h == 0])
        self.out, self.t = d, t
        first, act = rng.random() < 0.5, rng.choice(["relu", "gelu"])
        self.layer = nn.TransformerEncoderLayer(d, heads, rng.randrange(4, 33), dropout=0.0, activation=act,
                                                batch_first=True, norm_first=first)
        self.desc = f"encoder_layer(d={d}, heads={heads}, norm_first={first}, {act})"

    def forward(self, x):
        return self.layer(x)


class Shared(nn.Module):
    """One nn.Linear applied twice (a weight read once per use, or shared)."""

    def __init__(self, rng, d, t):
        super().__init__()
        self.out, self.t = d, t
        self.lin = nn.Linear(d, d)
        self.desc = f"shared linear({d}->{d}) twice"

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class FunctionalConv(nn.Module):
    """A plain nn.Parameter used by F.conv1d over the tokens."""

    def __init__(self, rng, d, t):
        super().__init__()
        k = rng.choice([k for k in (1, 2, 3) if k <= t])
        self.out, self.t = rng.randrange(2, 12), t - k + 1
        self.w = nn.Parameter(torch.randn(self.out, d, k) / (d * k) ** 0.5)
        self.desc = f"F.conv1d W{tuple(self.w.shape)}"

    def forward(self, x):
        return F.conv1d(x.transpose(1, 2), self.w).transpose(1, 2)


class Norm(nn.Module):
    def __init__(self, rng, d, t):
        super().__init__()
        self.out, self.t = d, t
        self.ln = nn.LayerNorm(d)
        self.desc = "layer_norm"

    def forward(self, x):
        return self.ln(x)


SEQ_LAYERS = (Dense, Dense, Functional, Normed, Attention, Recurrent, Bilinear, SeqConv, SeqConv, Norm, Encoder,
              Shared, FunctionalConv, GPT2Conv1D)


class SeqModel(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.vocab = rng.randrange(5, 60)
        d = rng.choice([4, 6, 8, 12, 16])
        self.bag = rng.random() < 0.2
        self.tokens = rng.randrange(3, 10)
        self.embed = nn.EmbeddingBag(self.vocab, d, mode=rng.choice(["sum", "mean"])) if self.bag else \
            nn.Embedding(self.vocab, d, padding_idx=rng.choice([None, 0]))
        self.pos = nn.Embedding(self.tokens, d) if rng.random() < 0.5 else None
        layers, parts = [], [("embedding_bag" if self.bag else "embedding") + f"({self.vocab}, {d})"]
        t = self.tokens
        for _ in range(rng.randrange(1, 5)):
            layer = rng.choice(SEQ_LAYERS)(rng, d, t)
            layers.append(layer)
            parts.append(layer.desc)
            d, t = layer.out, layer.t
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(d, rng.randrange(2, 9), bias=rng.random() < 0.5)
        if d == self.embed.weight.shape[1] and not self.bag and rng.random() < 0.5:  # tied, as in a language model
            self.head = nn.Linear(d, self.vocab, bias=False)
            self.head.weight = self.embed.weight
            parts.append("head tied to the embedding")
        self.desc = f"{self.tokens} tokens: " + " | ".join(parts)

    def inputs(self, gen, batch):
        # an embedding bag takes 3 ids per token
        return (torch.randint(0, self.vocab, (batch, self.tokens * (3 if self.bag else 1)), generator=gen),)

    def forward(self, ids):
        if self.bag:
            b = ids.shape[0]
            x = self.embed(ids.reshape(-1, 3)).reshape(b, self.tokens, -1)
        else:
            x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(x.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


# ---- image layers: (batch, channels, height, width) ----

class ImageConv(nn.Module):
    """A conv2d or transposed conv2d (maybe under weight norm), a batch or group norm or none, an activation.
    Sets .out (channels), .hw (output height and width) and .desc."""

    def __init__(self, rng, c, hw):
        super().__init__()
        groups = rng.choice([g for g in (1, 1, 2, c) if c % g == 0])
        self.out = groups * rng.randrange(1, 5) if groups != c else c * rng.choice([1, 2])
        for _ in range(20):  # draw until the output has at least one pixel
            k = rng.choice([1, 2, 3, (1, 3), (3, 2)])
            k2 = k if isinstance(k, tuple) else (k, k)
            stride, dilation, padding = rng.choice([1, 1, 2]), rng.choice([1, 1, 2]), rng.choice([0, 1])
            transposed = rng.random() < 0.25
            if transposed:
                dilation = max(dilation, stride)
                output_padding = rng.randrange(0, stride)
                self.hw = tuple((s - 1) * stride + dilation * (kk - 1) + output_padding + 1 for s, kk in zip(hw, k2))
            else:
                self.hw = tuple((s + 2 * padding - dilation * (kk - 1) - 1) // stride + 1 for s, kk in zip(hw, k2))
            if min(self.hw) >= 1:
                break
        else:
            k, stride, dilation, padding, transposed, self.hw = 1, 1, 1, 0, False, hw
        if transposed:
            conv = nn.ConvTranspose2d(c, self.out, k, stride=stride, groups=groups, output_padding=output_padding,
                                      dilation=dilation)
            kind = "conv_transpose2d"
        else:
            conv = nn.Conv2d(c, self.out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             bias=rng.random() < 0.6)
            kind = "conv2d"
        if rng.random() < 0.25:
            dim = rng.choice([0, 1, None] + ([2, 3] if kind == "conv2d" else []))
            conv = weight_norm(conv, dim=dim)
            kind = f"weight_norm({kind}, dim={dim})"
        self.conv = conv
        # a norm right after a conv whose output channel is one weight times one input (a 1x1 conv of one
        # channel per group) makes that weight's gradient zero: only rounding noise, which no comparison checks
        taps = (c // groups) * k2[0] * k2[1]
        self.norm = rng.choice(["batch", "group", "none"]) if taps > 1 and self.out > 1 else "none"
        if self.norm == "batch" and self.hw[0] * self.hw[1] == 1:  # a batch of one: one value per channel
            self.norm = "group"
        self.bn = nn.BatchNorm2d(self.out) if self.norm == "batch" else \
            nn.GroupNorm(1, self.out) if self.norm == "group" else None
        self.act = rng.choice(list(ACTIVATIONS))
        self.desc = (f"{kind}({c}->{self.out}, k={k}, stride={stride}, dilation={dilation}, groups={groups}) "
                     f"{self.norm} {self.act} -> {self.hw}")

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return ACTIVATIONS[self.act](y)


class ImageModel(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.channels = c = rng.choice([1, 2, 3, 4])
        self.size = rng.randrange(7, 13)
        layers, parts, hw = [], [], (self.size, self.size)
        for _ in range(rng.randrange(1, 4)):
            layer = ImageConv(rng, c, hw)
            layers.append(layer)
            parts.append(layer.desc)
            c, hw = layer.out, layer.hw
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(4 * c, rng.randrange(2, 9))
        self.desc = " | ".join(parts)

    def inputs(self, gen, batch):
        return (torch.randn(batch, self.channels, self.size, self.size, generator=gen),)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        # pooled to 2x2, not to one value per channel: after a batch or group norm, a channel's mean can be
        # constant, and the weights before it would get no gradient (only rounding noise, which
        # grad_scaling="site" would scale up to the size of a real gradient)
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


# ---- one case ----

def _step(call, model, inputs, autocast):
    """One forward (``call``: the model or its compiled form) and backward; the output and ``model``'s
    gradients."""
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = call(*inputs)
    out.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _excess(got, want, tol: float, floor: float = 0.0, exact=None) -> float:
    """|got - want| over what may differ: ``tol`` times |want| (or ``floor``, for a want whose norm is below it:
    a gradient that is zero up to rounding, such as a conv bias's in front of a batch norm, is compared at the
    model's gradient scale), plus, under autocast, three times how far autocast's own rounding moved eager
    from ``exact`` (eager in float32). Above 1 is a failure."""
    got, want = got.double(), want.double()
    allowed = tol * max(want.norm().item(), floor)
    if exact is not None:
        allowed += 3 * (want - exact.double()).norm().item()
    return (got - want).norm().item() / max(allowed, 1e-30)


def _dense_fails_too(model, inner, dynamic, batches, autocast) -> bool:
    """Whether the uncompressed model fails the same training steps under torch.compile with the inner
    compiler alone (a bug of torch's, e.g. inductor's dynamic-shape lowering, not of the roast backend)."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model.train(), backend=inner, dynamic=dynamic)
        for inputs in batches:
            _step(compiled, model, inputs, autocast)
    except Exception:
        return True
    finally:
        torch._dynamo.reset()
    return False


FORCE = {}  # --kernels / --inner / --grad-scaling / --no-autocast: the draws overridden (the rest of the case is
# the same)


def run_case(rng, index, uses):
    """(the case's SiteUses, None) if it passed, ([failure text], None) if it failed, ([], note) if compress
    refused the model or the dense model fails the same compile."""
    seed = rng.randrange(1 << 30)
    torch.manual_seed(seed)
    model = (SeqModel if rng.random() < 0.65 else ImageModel)(rng).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    inputs = tuple(t.to(DEVICE) for t in model.inputs(gen, rng.randrange(1, 4)))
    other = tuple(t.to(DEVICE) for t in model.inputs(gen, rng.randrange(4, 6)))
    ratio = rng.choice(["2x", "4x", "10x"])
    tile = rng.choice([None, (4, 4), (8, 16), (2, 32)])
    grad_scaling = rng.choice(["none", "none", "site"])
    kernels = rng.choice(["reference", "triton"])
    inner = rng.choice(["aot_eager", "aot_eager", "inductor"])
    # nn.Bilinear has no autocast rule: under autocast it gets a bfloat16 input and float32 weights and fails, dense
    # or not
    autocast = rng.random() < 0.25 and not any(isinstance(m, Bilinear) for m in model.modules())
    autocast = autocast if FORCE.get("autocast") is None else FORCE["autocast"]
    dynamic = rng.choice([None, None, True])  # None: torch's default (static, then dynamic on a new batch size)
    kernels, inner, grad_scaling = (FORCE.get("kernels") or kernels, FORCE.get("inner") or inner,
                                    FORCE.get("grad_scaling") or grad_scaling)
    desc = (f"case {index}: {type(model).__name__} [{model.desc}] {ratio} tile={tile} grad_scaling={grad_scaling} "
            f"kernels={kernels} inner={inner} autocast={autocast} dynamic={dynamic}")
    os.environ["ROASTFX_KERNELS"] = kernels
    dense = model
    pristine = copy.deepcopy(model)  # for telling torch's own failures from ours
    for options in ({"tile": tile} if tile else {}, {}):
        try:
            model = roastfx.compress(dense, ratio, seed=seed % 1000, init="random", grad_scaling=grad_scaling,
                                     example_inputs=inputs, **options)
            break
        except ValueError as error:  # a tile larger than a tiny model's memory: the planner says so
            if not options:
                return [], f"{desc}\n  compress refused: {error}"
            desc = desc.replace(f"tile={tile}", f"tile=None (refused {tile}: {str(error)[:60]}...)")
    model.train()
    try:
        eager = _step(model, model, inputs, autocast)
        eager_other = _step(model, model, other, autocast)
        # under autocast eager and compiled both round to bfloat16, in different orders and places (inductor
        # keeps float32 inside its fused kernels); eager in float32 says how much that rounding moves a result
        exact = {"batch 1": _step(model, model, inputs, False), "batch 2": _step(model, model, other, False)} \
            if autocast else {}
    except Exception:
        tail = "\n".join(traceback.format_exc().splitlines()[-12:])
        return [f"{desc}\n  eager failed (a generator bug):\n{tail}"], None
    torch._dynamo.reset()
    start = len(uses)
    try:
        compiled_model = torch.compile(model, backend="roast", options={"inner": inner}, dynamic=dynamic)
        compiled = _step(compiled_model, model, inputs, autocast)
        compiled_other = _step(compiled_model, model, other, autocast)
        model.eval()  # inference: batch norms on running statistics, the encoder layer's fast path
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            eager_eval, compiled_eval = model(*other), compiled_model(*other)
    except Exception:
        tail = "\n".join(traceback.format_exc().splitlines()[-24:])  # where it failed, not where it began
        if _dense_fails_too(pristine, inner, dynamic, (inputs, other), autocast):
            return [], f"{desc}\n  not ours: the dense model fails the same compile (torch.compile(backend=" \
                       f"{inner!r}, dynamic={dynamic})):\n{tail.splitlines()[-1]}"
        return [f"{desc}\n  compiled failed:\n{tail}"], None
    failures = []
    # under autocast eager and compiled both round to bfloat16, in different orders and places (inductor keeps
    # float32 inside its fused kernels): only gross differences (a wrong scale, dtype or transposition) count
    out_tol, grad_tol = (0.02, 0.05) if autocast else (1e-4, 1e-3)
    for label, (e_out, e_grads), (c_out, c_grads) in (("batch 1", eager, compiled), ("batch 2", eager_other,
                                                                                      compiled_other)):
        x_out, x_grads = exact.get(label, (None, {}))
        if c_out.dtype != e_out.dtype or c_out.shape != e_out.shape:
            failures.append(f"{label}: output {c_out.dtype} {tuple(c_out.shape)} vs eager {e_out.dtype} "
                            f"{tuple(e_out.shape)}")
            continue
        if (r := _excess(c_out, e_out, out_tol, exact=x_out)) > 1:
            failures.append(f"{label}: output differs {r:.1f}x more than allowed")
        if set(c_grads) != set(e_grads):
            failures.append(f"{label}: gradients of {sorted(set(c_grads) ^ set(e_grads))} only on one side")
        floor = 1e-2 * sum(g.double().norm() ** 2 for g in e_grads.values()).sqrt().item()
        for name in sorted(set(c_grads) & set(e_grads)):
            if name in x_grads and x_grads[name].double().norm() < floor:
                # zero up to rounding in float32 (a bias in front of a batch norm): under autocast a sum of
                # bfloat16 terms that cancel, its value noise of their size; only that it is finite is checked
                if not c_grads[name].isfinite().all():
                    failures.append(f"{label}: gradient of {name} is not finite")
                continue
            if (r := _excess(c_grads[name], e_grads[name], grad_tol, floor, x_grads.get(name))) > 1:
                failures.append(f"{label}: gradient of {name} differs {r:.1f}x more than allowed")
    if compiled_eval.dtype != eager_eval.dtype or compiled_eval.shape != eager_eval.shape:
        failures.append(f"eval: output {compiled_eval.dtype} {tuple(compiled_eval.shape)} vs eager "
                        f"{eager_eval.dtype} {tuple(eager_eval.shape)}")
    elif (r := _excess(compiled_eval, eager_eval, 0.1 if autocast else out_tol)) > 1:
        failures.append(f"eval: output differs {r:.1f}x more than allowed")
    if failures:
        return [desc + "\n  " + "\n  ".join(failures)], None
    return uses[start:], None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, nargs="*", help="run only these case numbers (of the same seed)")
    parser.add_argument("--verbose", action="store_true", help="print every case's model")
    parser.add_argument("--kernels", choices=["reference", "triton"], help="every case on this kernel path")
    parser.add_argument("--inner", choices=["aot_eager", "inductor"], help="every case with this inner compiler")
    parser.add_argument("--grad-scaling", choices=["none", "site"], help="every case with this grad_scaling")
    parser.add_argument("--no-autocast", action="store_true", help="no case under autocast")
    args = parser.parse_args(argv)
    FORCE.update(kernels=args.kernels, inner=args.inner, grad_scaling=args.grad_scaling,
                 autocast=False if args.no_autocast else None)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")

    uses = []
    original = fuse_pass.fuse_roast_ops

    def recording(gm):
        found = original(gm)
        uses.extend(found)
        return found

    fuse_pass.fuse_roast_ops = recording
    rng = random.Random(args.seed)
    failed, refused, ran, start = 0, 0, 0, time.perf_counter()
    fused, kept = 0, collections.Counter()
    for index in range(args.cases):
        case_rng = random.Random(rng.randrange(1 << 62))
        if args.only and index not in args.only:
            continue
        ran += 1
        result, note = run_case(case_rng, index, uses)
        if note:
            refused += 1
            print(note, flush=True)
        elif result and isinstance(result[0], str):
            failed += 1
            print("FAIL " + result[0], flush=True)
        else:
            fused += sum(u.fused for u in result)
            kept.update(u.why[:160] for u in result if not u.fused)
            if args.verbose:
                print(f"ok   case {index}: {sum(u.fused for u in result)} / {len(result)} reads fused", flush=True)
    print(f"\nweight reads in the compiled graphs of the cases that passed: {fused} fused, {sum(kept.values())} kept "
          "materialized")
    for why, n in kept.most_common():
        print(f"  {n:4d}  {why}")
    print(f"{ran} cases (seed {args.seed}, {DEVICE}): {failed} failed, {refused} refused by compress or failing "
          "in torch itself (dense), "
          f"{time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
