"""The fuse_epilogue pass on small graphs: what it folds, where it stops, and that the
rewritten graph computes what the original did (values and gradients)."""
import dataclasses
import logging
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import roastfx.codegen.ops as ops
from roastfx.codegen.epilogue import Epilogue, fused_op
from roastfx.codegen.hashing import PRIME, TileHash
from roastfx.passes.fuse_epilogue import fuse_epilogue

M, K, N = 37, 45, 70
ROAST_LINEAR = torch.ops.roastfx.roast_linear.default
EPILOGUE_OP = fused_op()


def mapping(rows=K, cols=N, seed=0):
    rng = random.Random(seed)
    return TileHash(rows=rows, cols=cols, tile_rows=5, tile_cols=3, alignment=1, window_start=7,
                    window_size=15 + rng.randrange(50, 400), a_row=rng.randrange(1, PRIME),
                    a_col=rng.randrange(1, PRIME), b=rng.randrange(PRIME), c_row=rng.randrange(1, PRIME),
                    c_col=rng.randrange(1, PRIME), d=rng.randrange(PRIME))


MAP = ops.mapping_args(mapping())


def inputs(seed=0, residual_shape=(M, N)):
    gen = torch.Generator().manual_seed(seed)
    size = MAP[5] + MAP[6]  # window_start + window_size
    return (torch.randn(M, K, generator=gen), torch.randn(size, generator=gen), torch.randn(N, generator=gen),
            torch.randn(*residual_shape, generator=gen))


def traced(fn, args, shapes=True):
    class Wrapper(torch.nn.Module):
        def forward(self, x, memory, bias, res):
            return fn(x, memory, bias, res)

    gm = torch.fx.symbolic_trace(Wrapper())
    if shapes:
        ShapeProp(gm).propagate(*args)
    return gm


def nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def linear(x, memory, bias=None, act="none"):
    return ROAST_LINEAR(x, memory, MAP, 0.3, bias, act)


def block(x, memory, bias, res):
    z = linear(x, memory, bias, "relu")
    z = z * 0.5
    z = z + res
    z = F.gelu(z, approximate="tanh")
    z = z.to(torch.bfloat16)
    return torch.cumsum(z, 1)


def test_chain_folds_up_to_the_first_op_it_cannot_lower():
    args = inputs(1)
    gm = traced(block, args)
    want = gm(*args)
    report = fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[5] == "add:x0|relu|mul:0.5|add:x1|gelu_tanh|cast:bfloat16"
    assert [a.name for a in fused.args[4]] == ["bias", "res"]
    assert not nodes(gm, ROAST_LINEAR)
    (cumsum,) = nodes(gm, torch.cumsum)
    assert cumsum.args[0] is fused  # the unsupported op stays, fed by the fused node
    assert len([n for n in gm.graph.nodes if n.op == "call_function"]) == 2
    assert len(report) == 1 and report[0].endswith("stops at cumsum (cumsum)")
    got = gm(*args)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)  # the reference path runs the very same eager ops in the same order


def test_ops_after_an_unlowerable_op_stay():
    def fn(x, memory, bias, res):
        z = linear(x, memory) * 2.0
        return torch.cumsum(z, 0) + 1.0

    args = inputs(2)
    gm = traced(fn, args)
    want = gm(*args)
    fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[5] == "mul:2.0"
    (cumsum,) = nodes(gm, torch.cumsum)
    assert [u.target for u in cumsum.users] == [__import__("operator").add]
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)


def test_operand_forms_methods_and_reversed_ops():
    def fn(x, memory, bias, res):
        z = 1.0 - linear(x, memory)
        z = z.sigmoid()
        z = res.div(z)  # the tensor on the left: rdiv
        z = torch.tanh(z)
        z = z.add(bias)
        z = -z.float()
        return torch.mul(z, 3)

    args = inputs(3)
    gm = traced(fn, args)
    want = gm(*args)
    fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[5] == "rsub:1.0|sigmoid|rdiv:x0|tanh|add:x1|cast:float32|mul:-1.0|mul:3.0"
    assert [a.name for a in fused.args[4]] == ["res", "bias"]
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["grows the output", "two users", "z + z", "alpha", "no shapes"])
def test_operands_it_cannot_prove_safe_stop_the_walk(case):
    residual_shape = (2, M, N) if case == "grows the output" else (M, N)

    def fn(x, memory, bias, res):
        z = linear(x, memory, bias)
        if case == "z + z":
            return z + z
        if case == "alpha":
            return torch.add(z, res, alpha=2.0)
        z = z * 0.5  # folded in every remaining case
        if case == "two users":
            return z + 1.0, z * 2.0
        return z + res

    args = inputs(4, residual_shape)
    gm = traced(fn, args, shapes=case != "no shapes")
    want = gm(*args)
    fuse_epilogue(gm)
    fused = nodes(gm, EPILOGUE_OP)
    if case == "alpha":
        assert not fused and len(nodes(gm, ROAST_LINEAR)) == 1  # nothing to fold beyond the bias
    elif case == "z + z":
        assert [f.args[5] for f in fused] == ["add:x0|add(v1,v1)"]  # a value read twice
    else:
        assert [f.args[5] for f in fused] == ["add:x0|mul:0.5"]
        assert len(list(fused[0].users)) == (2 if case == "two users" else 1)
    got = gm(*args)
    for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_rewritten_graph_has_the_original_gradients():
    def fn(x, memory, bias, res):
        z = linear(x, memory, bias, "silu")
        return F.gelu(z / 3.0 - res) * 2.0

    args = inputs(5)
    gm = traced(fn, args)
    leaves = [a.clone().requires_grad_() for a in args]
    gm(*leaves).square().sum().backward()
    want = [t.grad for t in leaves]
    assert fuse_epilogue(gm)
    assert nodes(gm, EPILOGUE_OP)[0].args[5] == "add:x0|silu|div:3.0|sub:x1|gelu|mul:2.0"
    leaves = [a.clone().requires_grad_() for a in args]
    gm(*leaves).square().sum().backward()
    for name, t, w in zip(["x", "memory", "bias", "residual"], leaves, want):
        torch.testing.assert_close(t.grad, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_generated_kernel_computes_what_the_original_graph_did(monkeypatch):
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")  # tests/conftest.py runs Triton in the interpreter
    args = inputs(6)
    gm = traced(block, args)
    want = gm(*args)  # roast_linear's fixed-epilogue kernel, then eager ops
    fuse_epilogue(gm)
    got = gm(*args)  # one generated kernel for the whole chain
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_pass_works_on_a_dynamo_graph():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(fuse_epilogue(gm))
        return gm.forward

    def fn(x, memory, bias, res):
        return torch.sigmoid(linear(x, memory, bias) * 0.25 + res)

    args = inputs(7)
    got = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(seen) == 1 and "add:x0|mul:0.25|add:x1|sigmoid" in seen[0]
    torch.testing.assert_close(got, fn(*args), rtol=0, atol=0)


def test_pass_signature_reads_back_and_pass_imports_no_triton():
    Epilogue.parse("add:x0|relu|mul:0.5|add:x1|gelu_tanh|cast:bfloat16")  # what the pass writes parses
    code = (
        "import sys, torch\n"
        "import roastfx.codegen.ops\n"
        "from roastfx.passes.fuse_epilogue import fuse_epilogue\n"
        "g = torch.fx.Graph(); x = g.placeholder('x'); m = g.placeholder('m')\n"
        f"y = g.call_function(torch.ops.roastfx.roast_linear.default, (x, m, {MAP}, 0.3))\n"
        "g.output(g.call_function(torch.relu, (y,)))\n"
        "gm = torch.fx.GraphModule(torch.nn.Module(), g)\n"
        "assert fuse_epilogue(gm)\n"
        "assert 'triton' not in sys.modules, 'the pass imported triton'\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_transpose_view_and_act_given_as_fuse_roast_ops_writes_them():
    # fuse_roast_ops writes roast_linear(x, memory, mapping, scale, bias, act, transpose_view=...) with the
    # flag as a keyword; a hand-built graph with meta["val"] as dynamo would leave it
    flipped = ops.mapping_args(mapping(rows=N, cols=K, seed=8))  # view (N, K): x @ V^T maps K -> N
    x, memory, bias, res = inputs(8)
    g = torch.fx.Graph()
    names = ("x", "memory", "bias", "res")
    ph = {n: g.placeholder(n) for n in names}
    for n, t in zip(names, (x, memory, bias, res)):
        ph[n].meta["val"] = torch.empty_like(t)
    z = g.call_function(ROAST_LINEAR, (ph["x"], ph["memory"], flipped, 0.3, ph["bias"], "silu"),
                        {"transpose_view": True})
    z.meta["val"] = torch.empty(M, N)
    out = g.call_function(__import__("operator").sub, (z, ph["res"]))
    g.output(g.call_function(torch.sigmoid, (out,)))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[5] == "add:x0|silu|sub:x1|sigmoid" and fused.args[6] is True
    view = ops.materialize(memory, flipped, 0.3)  # (N, K)
    want = torch.sigmoid(F.silu(x @ view.t() + bias) - res)
    torch.testing.assert_close(gm(x, memory, bias, res), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grad_norm", [False, True])
def test_grad_norm_flag_is_carried_into_the_epilogue_op(grad_norm):
    """grad_scaling="site": the folded op normalizes the memory gradient exactly when the roast_linear did."""
    def fn(x, memory, bias, res):
        return torch.sigmoid(ROAST_LINEAR(x, memory, MAP, 0.3, bias, "relu", False, grad_norm)) * 2.0

    args = inputs(seed=3)
    gm = traced(fn, args)
    memory = args[1].requires_grad_()
    want = torch.autograd.grad(gm(args[0], memory, *args[2:]).square().sum(), memory)[0]
    assert fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[-1] is grad_norm
    got = torch.autograd.grad(gm(args[0], memory, *args[2:]).square().sum(), memory)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- graph-shaped epilogues ----------------------------------------------------------------
def gelu_new(z):
    """transformers' NewGELUActivation, as GPT-2 writes it: z is read three times."""
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3.0))))


def test_a_value_read_several_times_folds_gpt2_gelu_new():
    def fn(x, memory, bias, res):
        return gelu_new(linear(x, memory, bias)) + res

    args = inputs(9)
    gm = traced(fn, args)
    leaves = [a.clone().requires_grad_() for a in args]
    want = gm(*leaves)
    want.square().sum().backward()
    want_grads = [t.grad for t in leaves]
    report = fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[5] == ("add:x0|mul:0.5|mul(v1,v1)|mul(v3,v1)|mul:0.044715|add(v1,v5)"
                             f"|mul:{math.sqrt(2.0 / math.pi)!r}|tanh|add:1.0|mul(v2,v9)|add:x1")
    assert [n.op for n in gm.graph.nodes] == ["placeholder"] * 4 + ["call_function", "output"], report
    leaves = [a.clone().requires_grad_() for a in args]
    got = gm(*leaves)
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and it is gelu(approximate="tanh"), computed independently
    torch.testing.assert_close(got, F.gelu(x_at_v(args) + args[2], approximate="tanh") + args[3], rtol=1e-5,
                               atol=1e-5)
    for name, t, w in zip(["x", "memory", "bias", "residual"], leaves, want_grads):
        torch.testing.assert_close(t.grad, w, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def x_at_v(args):
    return args[0] @ ops.materialize(args[1], MAP, 0.3)


def test_conv1d_views_residual_and_dropout_off_fold_as_gpt2_writes_them():
    """GPT-2's MLP: Conv1D flattens to (rows, K), addmm, views back to (B, T, N); eval dropout;
    the residual (B, T, N) is read after the view, so it is reshaped to the GEMM's layout."""
    B, T = 1, M

    def fn(x, memory, bias, res):
        h = linear(x.view(-1, K), memory, bias).view(B, T, N)
        h = F.dropout(h, 0.1, False, False)
        return h.contiguous() + res.view(B, T, N)

    args = inputs(10)
    gm = traced(fn, args)
    want = gm(*args)
    report = fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[5] == "add:x0|add:x1", report
    reshaped = fused.args[4][1]
    assert reshaped.op == "call_method" and reshaped.target == "reshape" and reshaped.args[1:] == (-1, N)
    (out,) = list(fused.users)
    assert out.target == "reshape"  # the trailing view, on the fused output
    got = gm(*args)
    assert got.shape == (B, T, N)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dropout_that_is_on_or_an_operand_built_from_the_output_stays():
    def fn(x, memory, bias, res):
        z = linear(x, memory) * 2.0
        return F.dropout(z, 0.5, True) + z.sum(), z.view(torch.int32)

    args = inputs(11)
    gm = traced(fn, args)
    fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[5] == "mul:2.0"  # dropout in training, the sum and the dtype view stay
    assert {u.target if u.op == "call_method" else u.target.__name__ for u in fused.users} == \
        {"dropout", "sum", "view"}


def test_gated_product_of_two_gemms_folds_into_one_of_them():
    """SwiGLU: silu(x @ Vg) * (x @ Vu); the second GEMM's output is an outside operand of the first's epilogue."""
    up_map = ops.mapping_args(dataclasses.replace(mapping(), a_row=12345, d=777))  # same window, other hash

    def fn(x, memory, bias, res):
        return F.silu(linear(x, memory)) * ROAST_LINEAR(x, memory, up_map, 0.7, None, "none")

    args = inputs(12)
    gm = traced(fn, args)
    want = gm(*args)
    fuse_epilogue(gm)
    (fused,) = nodes(gm, EPILOGUE_OP)
    assert fused.args[5] == "silu|mul:x0" and fused.args[4][0].target is ROAST_LINEAR
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_real_gpt2_mlp_and_residuals_fold_through_the_backend(dynamic, caplog):
    """Eval: token + position embeddings, attention output + residual, c_fc + gelu_new, c_proj + residual
    fold. With dynamic=True dynamo
    passes gelu_new's sqrt(2 / pi) as a symbolic float: it becomes a 0-dim tensor operand. Training with
    p=0 dropout (off, so folded): the same, and gradients equal eager."""
    import roastfx
    from transformers import GPT2Config, GPT2LMHeadModel

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101,
                                                        n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                                        attn_pdrop=0.0)), "8x", init="random")
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"}, dynamic=dynamic)
    gen = torch.Generator().manual_seed(1)
    for train in (False, True):
        model.train(train)
        ids = torch.randint(0, 101, (2, 9 if train else 7), generator=gen)
        want = model(input_ids=ids).logits
        want.square().mean().backward()
        grad = model.roast_memory.grad.clone()
        model.zero_grad()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="roastfx"):
            got = compiled(input_ids=ids).logits
        lines = [r.getMessage() for r in caplog.records]
        summaries = [line for line in lines if "epilogue chains folded" in line]
        # the token + position embeddings, then the layer's three
        assert summaries and all(" 4 epilogue chains" in line for line in summaries), summaries
        gelu = [line for line in lines if "-> epilogue" in line and "|tanh|add:1.0|mul(v2,v9)" in line]
        assert len(gelu) == len(summaries), lines
        embeddings = [line for line in lines if line.startswith("roast backend: roast_embedding_epilogue")]
        assert len(embeddings) == len(summaries) and all("-> epilogue add:x0;" in line for line in embeddings)
        got.square().mean().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.roast_memory.grad, grad, rtol=1e-4, atol=1e-6)
        model.zero_grad()


# -- epilogues after a conv ----------------------------------------------------------------
class ResidualBlock(torch.nn.Module):
    """ResNet's basic block: conv-BN-ReLU, conv-BN, + identity, ReLU."""

    def __init__(self, c=6, dims=2):
        super().__init__()
        Conv, BN = {1: (torch.nn.Conv1d, torch.nn.BatchNorm1d), 2: (torch.nn.Conv2d, torch.nn.BatchNorm2d),
                    3: (torch.nn.Conv3d, torch.nn.BatchNorm3d)}[dims]
        self.conv1, self.bn1 = Conv(c, c, 3, padding=1, bias=False), BN(c)
        self.conv2, self.bn2 = Conv(c, c, 3, padding=1), BN(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + x)


def _trained_stats(model, x):
    """Give the batch norms running statistics and affine parameters that are not the identity."""
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model


@pytest.mark.parametrize("dims", [2, 1, 3], ids=["conv2d", "conv1d", "conv3d"])
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_conv_bn_relu_residual_fold_into_conv_epilogues_in_eval(dims, path, monkeypatch, caplog):
    import roastfx

    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 6, *{1: (9,), 2: (7, 5), 3: (4, 5, 3)}[dims], generator=torch.Generator().manual_seed(1))
    model = _trained_stats(roastfx.compress(ResidualBlock(dims=dims), "3x", init="random"), x).eval()
    want = model(x)
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    import roastfx.codegen.triton_epilogue as triton_epilogue

    launches = []
    original = triton_epilogue.roast_conv_epilogue
    monkeypatch.setattr(triton_epilogue, "roast_conv_epilogue", lambda *a, **k: launches.append(1) or original(*a, **k))
    with caplog.at_level(logging.INFO, logger="roastfx"):
        got = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    assert len(launches) == (2 if path == "triton" else 0)  # one generated conv kernel per folded epilogue
    folded = [r.getMessage() for r in caplog.records if "-> epilogue" in r.getMessage()]
    # conv1 + bn1 + relu; conv2 + bias + bn2 + residual + relu
    assert len(folded) == 2, folded
    bn = "sub:x{m}|add(x{v},1e-05)|rsqrt|mul(v{a},v{b})|mul:x{w}|add:x{bb}"  # (z - mean) * rsqrt(var + eps) ...
    assert "-> epilogue " + bn.format(m=0, v=1, a=1, b=3, w=2, bb=3) + "|relu;" in folded[0]
    assert "-> epilogue add:x0|" + bn.format(m=1, v=2, a=2, b=4, w=3, bb=4) + "|add:x5|relu" in folded[1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_folded_batch_norm_keeps_its_inputs_dtype_under_autocast(path, monkeypatch, caplog):
    """Batch norm returns its input's dtype: a bfloat16 conv output under autocast, normalized with float32
    statistics, stays bfloat16. The folded epilogue ends with a cast back (without it, the float32 result made
    the next fused linear return float32 too; found by benchmarks/fuzz_models.py)."""
    import roastfx

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = ResidualBlock(), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.block(x), self.head(self.block(x).mean((2, 3)))

    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 5, generator=torch.Generator().manual_seed(1))
    model = _trained_stats(roastfx.compress(Block(), "3x", init="random"), x).eval()
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), caplog.at_level(logging.INFO, logger="roastfx"):
        want = model(x)
        got = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    folded = [r.getMessage() for r in caplog.records if "-> epilogue" in r.getMessage()]
    assert folded and all("|cast:bfloat16" in f for f in folded), folded
    # the block ends with the float32 input added (eager's float32), the head under autocast in bfloat16
    assert [g.dtype for g in got] == [w.dtype for w in want] == [torch.float32, torch.bfloat16]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=0.05, atol=0.05)


def test_conv_epilogue_gradients_in_eval_mode_match_eager():
    """Fine-tuning with frozen batch norm statistics (eval mode) trains through the folded epilogue."""
    import roastfx

    torch._dynamo.reset()
    x = torch.randn(2, 6, 7, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    model = _trained_stats(roastfx.compress(ResidualBlock(), "3x", init="random"), x).eval()
    eager = model(x)
    want = torch.autograd.grad(eager.square().sum(), (x, model.roast_memory, model.bn2.weight))
    got_out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    got = torch.autograd.grad(got_out.square().sum(), (x, model.roast_memory, model.bn2.weight))
    for name, g, w in zip(["x", "memory", "bn2.weight"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_batch_norm_in_training_stays():
    import roastfx

    torch._dynamo.reset()
    model = roastfx.compress(ResidualBlock(), "3x", init="random").train()
    x = torch.randn(2, 6, 7, 5, generator=torch.Generator().manual_seed(3))
    seen = []

    def backend(gm, example_inputs):
        from roastfx.passes.fuse_roast_ops import fuse_roast_ops

        fuse_roast_ops(gm)
        seen.extend(fuse_epilogue(gm))
        return gm.forward

    torch.compile(model, backend=backend)(x)
    assert seen == []  # batch statistics are a reduction: the conv outputs go to batch_norm unfused


# -- epilogues after an embedding lookup ----------------------------------------------------------
class EmbeddingSum(torch.nn.Module):
    def __init__(self, into_outside=False):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 16)
        self.pos = torch.nn.Parameter(torch.randn(5, 16))
        self.into_outside = into_outside

    def forward(self, ids):
        if self.into_outside:  # the lookup is added into a tensor from outside: folding would hide the write
            h = self.pos.repeat(ids.shape[0], 1, 1)
            h += self.emb(ids)
            return h * 2.0
        h = self.emb(ids)
        h += self.pos  # in place on the lookup's own output: foldable
        return h * 2.0


@pytest.mark.parametrize("into_outside", [False, True], ids=["into-lookup", "into-outside"])
def test_in_place_adds_fold_only_into_the_lookups_own_values(into_outside, caplog):
    import roastfx

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(EmbeddingSum(into_outside), "4x", init="random")
    ids = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(2))
    want = model(ids)
    want_grad = torch.autograd.grad(want.square().sum(), (model.roast_memory, model.pos))
    with caplog.at_level(logging.INFO, logger="roastfx"):
        got = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(ids)
    folded = [r.getMessage() for r in caplog.records if "-> epilogue" in r.getMessage()]
    if into_outside:
        assert folded == []
    else:
        assert len(folded) == 1 and "roast_embedding_epilogue" in folded[0] and folded[0].endswith(
            "-> epilogue add:x0|mul:2.0")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got_grad = torch.autograd.grad(got.square().sum(), (model.roast_memory, model.pos))
    for g, w in zip(got_grad, want_grad):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_eval_batch_norm_folds_after_a_linear_but_not_after_a_view():
    """BatchNorm1d on a linear's (N, C) output: its statistics are per column, extras as they are. After a
    view the channel dim is not the fused op's: the walk stops there."""
    import roastfx

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8)
            self.fc2, self.bn2 = torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.fc(x))), self.bn2(self.fc2(x).view(-1, 4, 2))

    torch._dynamo.reset()
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    model = _trained_stats(roastfx.compress(Head(), "2x", init="random"), x).eval()
    want = model(x)
    seen = []

    def backend(gm, example_inputs):
        from roastfx.passes.fuse_roast_ops import fuse_roast_ops

        fuse_roast_ops(gm)
        seen.extend(fuse_epilogue(gm))
        return gm.forward

    got = torch.compile(model, backend=backend)(x)
    assert len(seen) == 1 and "add:x0|sub:x1|add(x2,1e-05)|rsqrt|mul(v2,v4)|mul:x3|add:x4|relu" in seen[0], seen
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


class UpBlock(torch.nn.Module):
    """A decoder's upsampling: transposed conv (grouped) + batch norm + ReLU."""

    def __init__(self, dims=2):
        super().__init__()
        Up, BN = {1: (torch.nn.ConvTranspose1d, torch.nn.BatchNorm1d), 2: (torch.nn.ConvTranspose2d, torch.nn.BatchNorm2d),
                  3: (torch.nn.ConvTranspose3d, torch.nn.BatchNorm3d)}[dims]
        self.up, self.bn = Up(6, 4, 2, stride=2, groups=2), BN(4)

    def forward(self, x):
        return F.relu(self.bn(self.up(x)))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_transposed_conv_bias_bn_relu_fold_into_one_kernel(dims, path, monkeypatch, caplog):
    """In eval, a transposed conv's bias, batch norm and ReLU fold into roast_conv_transpose_epilogue (one
    generated kernel on the Triton path); outputs and gradients (input, memory, bn weight) equal eager."""
    import roastfx
    import roastfx.codegen.triton_epilogue as triton_epilogue

    torch._dynamo.reset()
    x = torch.randn(2, 6, *(3,) * dims, generator=torch.Generator().manual_seed(1), requires_grad=True)
    model = _trained_stats(roastfx.compress(UpBlock(dims), "2x", init="random"), x).eval()
    eager = model(x)
    want = torch.autograd.grad(eager.square().sum(), (x, model.roast_memory, model.bn.weight))
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    launches = []
    original = triton_epilogue.roast_transposed_conv_epilogue
    monkeypatch.setattr(triton_epilogue, "roast_transposed_conv_epilogue",
                        lambda *a, **k: launches.append(a[9].pattern) or original(*a, **k))
    with caplog.at_level(logging.INFO, logger="roastfx"):
        out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    got = torch.autograd.grad(out.square().sum(), (x, model.roast_memory, model.bn.weight))
    folded = [r.getMessage() for r in caplog.records if "-> epilogue" in r.getMessage()]
    assert len(folded) == 1 and "add:x0|sub:x1|add(x2,1e-05)|rsqrt|mul(v2,v4)|mul:x3|add:x4|relu" in folded[0], folded
    if path == "triton":  # the forward with the whole epilogue, then the backward's recomputed transposed conv
        assert launches[0] == Epilogue.parse("add:x0|sub:x1|add(x2,1e-05)|rsqrt|mul(v2,v4)|mul:x3|add:x4|relu").pattern
    else:
        assert not launches
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for name, g, w in zip(["x", "memory", "bn.weight"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_transposed_conv_epilogue_op_passes_opcheck_and_gradcheck():
    from roastfx.codegen.conv import roast_conv_transpose_epilogue

    gen = torch.Generator().manual_seed(3)
    mapping = ops.mapping_args(TileHash(4, 3 * 4, 1, 4, 1, 0, 60, 123457, 7654321, 99, 31337, 4242, 17))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    mem = torch.randn(70, dtype=torch.float64, generator=gen, requires_grad=True)
    extras = [torch.randn(6, 1, 1, dtype=torch.float64, generator=gen, requires_grad=True),
              torch.randn(2, 6, 6, 6, dtype=torch.float64, generator=gen, requires_grad=True)]
    conv = ([2, 2], [2, 2], [0, 0], [0, 0], [1, 1], 2)
    args = (x, mem, mapping, 0.4, extras, "add:x0|tanh|mul:x1", *conv, False)
    out = roast_conv_transpose_epilogue(*args)
    weight = ops.materialize(mem.detach(), mapping, 0.4).reshape(4, 3, 2, 2)
    want = torch.tanh(F.conv_transpose2d(x, weight, None, 2, 0, 0, 2) + extras[0]) * extras[1]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    torch.library.opcheck(roast_conv_transpose_epilogue, args)
    assert torch.autograd.gradcheck(lambda x, m, b, r: roast_conv_transpose_epilogue(
        x, m, mapping, 0.4, [b, r], "add:x0|tanh|mul:x1", *conv, False), (x, mem, *extras))
