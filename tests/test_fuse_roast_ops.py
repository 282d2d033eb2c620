"""The fuse_roast_ops pass and the roast custom ops."""
import math
import logging

import pytest
import torch
import torch.nn.functional as F

import roastfx
from roastfx.codegen import ops
from roastfx.codegen.hashing import TileHash
from roastfx.passes.fuse_roast_ops import fuse_roast_ops
from helpers import MLP, Mixed, mixed_inputs

MAPPING = TileHash(13, 6, 4, 3, 2, 4, 60, 123457, 7654321, 99, 31337, 4242, 17)


def test_ops_pass_opcheck_and_gradcheck():
    gen = torch.Generator().manual_seed(0)
    mem = torch.randn(70, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 5, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    args = ops.mapping_args(MAPPING)
    torch.library.opcheck(ops.materialize, (mem, args, 0.3))
    torch.library.opcheck(ops.roast_linear, (x, mem, args, 0.3, b))
    torch.library.opcheck(ops.roast_linear, (x, mem, args, 0.3, None))
    assert torch.autograd.gradcheck(lambda x, m, b: ops.roast_linear(x, m, args, 0.3, b), (x, mem, b))


def test_pass_alone_on_a_small_graph():
    args = ops.mapping_args(MAPPING)

    def f(x, memory, bias):
        w = ops.materialize(memory, args, 0.5).t().reshape(6, 13)
        return F.linear(x, w, bias).relu() + ops.materialize(memory, args, 0.5).sum()

    gm = torch.fx.symbolic_trace(f)
    for node in gm.graph.nodes:  # dynamo records example values; give the traced graph the same
        if node.op == "call_method" and node.target == "reshape":
            node.meta["example_value"] = torch.empty(6, 13)
    x, mem, bias = torch.randn(4, 13), torch.randn(70), torch.randn(6)
    expected = f(x, mem, bias)
    uses = fuse_roast_ops(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.roastfx.roast_linear.default in targets and F.linear not in targets
    assert [u.fused for u in uses] == [True, False]  # the .sum() read keeps its materialize
    assert torch.allclose(gm(x, mem, bias), expected, atol=1e-6)


def record_uses(monkeypatch) -> list:
    """Every SiteUse the backend's fuse_roast_ops returns from now on."""
    import roastfx.passes.fuse_roast_ops as pass_module

    uses, original = [], pass_module.fuse_roast_ops

    def recording(gm):
        mine = original(gm)
        uses.extend(mine)
        return mine

    monkeypatch.setattr(pass_module, "fuse_roast_ops", recording)
    return uses


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_compiled_matches_eager_on_every_site_kind(inner, monkeypatch):
    torch._dynamo.reset()
    model = roastfx.compress(Mixed(), "4x", example_inputs=mixed_inputs(), init="random")
    inputs = mixed_inputs(2, 5)
    eager = model(*inputs)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": inner})(*inputs)
    out.square().mean().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n
    # emb, bag, the grouped conv, w (h @ w), head in einsum and in F.linear: every read is one roast op
    assert sorted(u.why.split(" ")[0] for u in uses) == ["roast_conv", "roast_embedding", "roast_embedding",
                                                         "roast_linear", "roast_linear", "roast_linear"]
    assert all(u.fused for u in uses)


@pytest.mark.parametrize("path,dtype", [("reference", torch.float64), ("triton", torch.bfloat16)])
def test_weights_read_in_another_dtype_than_the_memory_fuse(path, dtype, monkeypatch):
    """A float64 or bfloat16 model over a float32 memory (memory_dtype='float32'): each weight read is the
    view cast to the model's dtype, which the roast ops fold (they compute in their input's dtype); every site
    kind is still one roast op, with eager's outputs and memory gradient (float64: to 1e-6; bfloat16 on the
    Triton kernels: to bf16's resolution)."""
    torch._dynamo.reset()
    model = roastfx.compress(Mixed().to(dtype), "4x", example_inputs=mixed_inputs(), init="random",
                             memory_dtype="float32")
    assert model.roast_memory.dtype == torch.float32 and model.head.weight.dtype == dtype
    inputs = mixed_inputs(2, 5)
    eager = model(*inputs)
    want = torch.autograd.grad(eager.float().square().mean(), model.roast_memory)[0]
    uses = record_uses(monkeypatch)
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(*inputs)
    got = torch.autograd.grad(out.float().square().mean(), model.roast_memory)[0]
    assert out.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(out, eager, **tol)
    assert (got - want).norm() <= (1e-5 if dtype == torch.float64 else 5e-2) * want.norm()
    assert sorted(u.why.split(" ")[0] for u in uses) == ["roast_conv", "roast_embedding", "roast_embedding",
                                                         "roast_linear", "roast_linear", "roast_linear"]
    assert all(u.fused for u in uses)


def test_new_batch_size_keeps_plan_and_matches():
    torch._dynamo.reset()
    model = roastfx.compress(MLP(), "20x", init="random")
    plan = roastfx.roast_state(model).plan
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})
    for batch in (3, 8, 11):
        x = torch.randn(batch, 64)
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    assert roastfx.roast_state(model).plan is plan


def test_training_through_the_backend_reduces_loss():
    from quickstart_data import digits_tensors

    torch._dynamo.reset()
    x, y = digits_tensors()
    model = roastfx.compress(MLP(64, 128, 10), "5x", init="random", seed=1)
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for step in range(40):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        opt.zero_grad()
        loss = F.cross_entropy(compiled(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_fused_op_runs_the_triton_kernels(inner, monkeypatch):
    """ROASTFX_KERNELS=triton: the backend's roast_linear launches the Triton kernels (interpreted on CPU)
    and still equals the eager reference path, gradients included."""
    torch._dynamo.reset()
    model = roastfx.compress(MLP(40, 48, 7), "6x", init="random", seed=4)
    x = torch.randn(9, 40)
    eager = model(x)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    import roastfx.codegen.kernels as kernels

    calls = []
    original = kernels.roast_matmul
    monkeypatch.setattr(kernels, "roast_matmul", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    out = torch.compile(model, backend="roast", options={"inner": inner})(x)
    out.square().mean().backward()
    assert len(calls) >= 5  # 3 forward launches and the dX launches of the hidden layers
    assert torch.allclose(out, eager, atol=1e-4)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-4), n


def test_embedding_op_matches_reference_and_gradcheck():
    gen = torch.Generator().manual_seed(2)
    mapping = TileHash(30, 10, 1, 8, 4, 0, 90, 5, 7, 11, 13, 17, 19)
    mem = torch.randn(90, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.randint(0, 30, (4, 3), generator=gen)
    args = ops.mapping_args(mapping)
    from roastfx.codegen.reference import materialize

    assert torch.equal(ops.roast_embedding(ids, mem, args, 0.4), F.embedding(ids, materialize(mem, mapping, 0.4)))
    torch.library.opcheck(ops.roast_embedding, (ids, mem, args, 0.4))
    assert torch.autograd.gradcheck(lambda m: ops.roast_embedding(ids, m, args, 0.4), (mem,))
    # padding_idx: the same rows, but that row's uses give the memory no gradient
    torch.library.opcheck(ops.roast_embedding, (ids, mem, args, 0.4, int(ids[0, 0])))
    grad = torch.autograd.grad(ops.roast_embedding(ids, mem, args, 0.4, int(ids[0, 0])).sum(), mem)[0]
    table = materialize(mem, mapping, 0.4).detach().requires_grad_()
    expected_rows = torch.autograd.grad(F.embedding(ids, table, padding_idx=int(ids[0, 0])).sum(), table)[0]
    index, sign = mapping.full_index()
    expected = torch.zeros(90, dtype=torch.float64).index_add_(0, index.reshape(-1),
                                                               (expected_rows * sign * 0.4).reshape(-1))
    assert torch.allclose(grad, expected)


def test_fused_embedding_runs_the_triton_kernels(monkeypatch):
    torch._dynamo.reset()
    model = roastfx.compress(torch.nn.Sequential(torch.nn.Embedding(30, 40), torch.nn.Linear(40, 6)), "3x",
                             init="random", seed=8)
    ids = torch.randint(0, 30, (5, 7), generator=torch.Generator().manual_seed(0))
    eager = model(ids)
    eager.square().mean().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(ids)
    out.square().mean().backward()
    assert torch.allclose(out, eager, atol=1e-4)
    assert torch.allclose(model.roast_memory.grad, grad, atol=1e-4)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=16))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=101,
                                                     max_position_embeddings=32, num_labels=3))


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_transformers_models_through_the_backend(build, monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(build(), "8x", init="random").eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    eager = model(input_ids=ids).logits
    eager.square().mean().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(input_ids=ids).logits
    out.square().mean().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(model.roast_memory.grad, grad, atol=1e-5, rtol=1e-4)
    # every read is fused: GPT-2's Conv1D (addmm), its tied lm_head (x @ V^T of the embedding's view),
    # BERT's word embeddings with padding_idx
    assert uses and all(u.fused for u in uses), [u for u in uses if not u.fused]
    if build is _gpt2:
        assert sum(u.why == "roast_linear (x @ V^T) from linear" for u in uses) == 1
        assert sum(u.why == "roast_linear from addmm" for u in uses) == 8


@pytest.mark.parametrize("act,module", [("relu", torch.nn.ReLU()), ("silu", torch.nn.SiLU()),
                                        ("gelu_tanh", torch.nn.GELU(approximate="tanh"))])
def test_activation_is_folded_into_a_generated_epilogue(act, module, monkeypatch, caplog):
    gen = torch.Generator().manual_seed(6)
    mapping = TileHash(13, 6, 4, 3, 2, 4, 60, 123457, 7654321, 99, 31337, 4242, 17)
    args = ops.mapping_args(mapping)
    mem = torch.randn(70, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(5, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.library.opcheck(ops.roast_linear, (x, mem, args, 0.3, b, act))
    assert torch.autograd.gradcheck(lambda x, m, b: ops.roast_linear(x, m, args, 0.3, b, act), (x, mem, b))

    torch._dynamo.reset()
    model = roastfx.compress(torch.nn.Sequential(torch.nn.Linear(20, 24), module, torch.nn.Linear(24, 3)), "3x",
                             init="random")
    xs = torch.randn(7, 20)
    eager = model(xs)
    eager.square().sum().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    uses = record_uses(monkeypatch)
    with caplog.at_level(logging.INFO, logger="roastfx"):
        out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(xs)
    out.square().sum().backward()
    assert [u.why for u in uses].count("roast_linear from linear") == 2
    # the bias and the activation after the first linear became one generated epilogue (fuse_epilogue)
    assert f"-> epilogue add:x0|{act}" in caplog.text
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(model.roast_memory.grad, grad, atol=1e-4, rtol=1e-4)


def test_linear_reading_the_view_transposed_passes_opcheck_and_gradcheck():
    gen = torch.Generator().manual_seed(3)
    args = ops.mapping_args(MAPPING)  # view 13 x 6: x @ V^T takes 6 inputs to 13 outputs
    mem = torch.randn(70, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, generator=gen, requires_grad=True)
    from roastfx.codegen.reference import materialize

    expected = x @ materialize(mem, MAPPING, 0.3).t() + b
    assert torch.allclose(ops.roast_linear(x, mem, args, 0.3, b, "none", True), expected)
    torch.library.opcheck(ops.roast_linear, (x, mem, args, 0.3, b, "relu", True))
    assert torch.autograd.gradcheck(lambda x, m, b: ops.roast_linear(x, m, args, 0.3, b, "silu", True), (x, mem, b))


def test_linear_reading_the_view_transposed_runs_the_triton_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    mapping = TileHash(40, 36, 8, 4, 4, 0, 600, 123457, 7654321, 99, 31337, 4242, 17)
    args = ops.mapping_args(mapping)
    mem = torch.randn(600, generator=gen, requires_grad=True)
    x = torch.randn(5, 36, generator=gen, requires_grad=True)
    b = torch.randn(40, generator=gen, requires_grad=True)
    expected = ops.roast_linear(x, mem, args, 0.2, b, "relu", True)
    want = torch.autograd.grad(expected.square().sum(), (x, mem, b))
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    out = ops.roast_linear(x, mem, args, 0.2, b, "relu", True)
    got = torch.autograd.grad(out.square().sum(), (x, mem, b))
    assert torch.allclose(out, expected, atol=1e-4)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-3, rtol=1e-4)


# (in, out, kernel, stride, padding, dilation, groups, spatial): odd shapes, 1-d and 2-d, grouped
CONVS = [
    (3, 5, (3, 2), (2, 2), (1, 1), (1, 2), 1, (7, 6)),
    (3, 5, (3, 2), (2, 1), (1, 0), (2, 1), 1, (9, 5)),
    (4, 6, (3, 2), (1, 2), (1, 0), (2, 1), 2, (7, 6)),
    (3, 5, (3,), (2,), (1,), (2,), 1, (9,)),
    (6, 6, (3,), (1,), (1,), (1,), 3, (8,)),
    (4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, (5, 6)),  # depthwise: 1-column groups split the 3-column tiles
    (4, 6, (2, 3, 1), (2, 1, 1), (1, 1, 0), (2, 1, 1), 2, (5, 4, 3)),  # conv3d
]


def _conv_case(case, dtype, gen):
    cin, cout, kernel, stride, padding, dilation, groups, spatial = case
    rows = cin // groups * math.prod(kernel)
    mapping = TileHash(rows, cout, 4, 3, 2, 4, 60, 123457, 7654321, 99, 31337, 4242, 17)
    mem = torch.randn(70, dtype=dtype, generator=gen, requires_grad=True)
    x = torch.randn(2, cin, *spatial, dtype=dtype, generator=gen, requires_grad=True)
    b = torch.randn(cout, dtype=dtype, generator=gen, requires_grad=True)
    conv_args = (list(kernel), list(stride), list(padding), list(dilation), groups)
    return mapping, mem, x, b, conv_args


def _dense_conv(x, mem, mapping, b, kernel, stride, padding, dilation, groups):
    from helpers import materialize_from_docs

    w = materialize_from_docs(mem, mapping.to_dict(), 0.3).to(x.dtype).t()
    w = w.reshape(mapping.cols, x.shape[1] // groups, *kernel)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    return conv(x, w, b, stride, padding, dilation, groups)


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"conv{len(c[2])}d-g{c[6]}-s{c[3]}-d{c[5]}")
def test_roast_conv_matches_dense_conv_and_passes_opcheck(case):
    mapping, mem, x, b, conv_args = _conv_case(case, torch.float64, torch.Generator().manual_seed(5))
    args = ops.mapping_args(mapping)
    out = ops.roast_conv(x, mem, args, 0.3, b, *conv_args)
    assert torch.allclose(out, _dense_conv(x, mem.detach(), mapping, b, *conv_args), atol=1e-12)
    torch.library.opcheck(ops.roast_conv, (x, mem, args, 0.3, b, *conv_args))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny convs: threads only contend on a shared machine
    try:
        assert torch.autograd.gradcheck(lambda x, m, b: ops.roast_conv(x, m, args, 0.3, b, *conv_args), (x, mem, b))
    finally:
        torch.set_num_threads(threads)


def test_column_windows_read_the_views_columns():
    from roastfx.codegen.ops import column_windows
    from roastfx.codegen.reference import materialize

    mapping = TileHash(20, 12, 4, 3, 2, 4, 60, 123457, 7654321, 99, 31337, 4242, 17)
    mem = torch.randn(70, dtype=torch.float64)
    view = materialize(mem, mapping, 0.3)
    windows = column_windows(ops.mapping_args(mapping), 4)  # 3 columns each: one hash tile wide
    for g, window in enumerate(windows):
        assert torch.equal(materialize(mem, TileHash(*window), 0.3), view[:, 3 * g:3 * g + 3])
    assert column_windows(ops.mapping_args(mapping), 2) is not None
    assert column_windows(ops.mapping_args(mapping), 6) is None  # 2 columns: windows start inside tiles


@pytest.mark.parametrize("mode", ["implicit", "im2col"])
@pytest.mark.parametrize("case", CONVS[:4] + CONVS[5:],
                         ids=["conv2d", "conv2d-dilated", "conv2d-groups", "conv1d", "depthwise", "conv3d"])
def test_roast_conv_triton_path_matches_reference(case, mode, monkeypatch):
    """The Triton path (interpreted on CPU): the implicit-GEMM kernels (forward, dX, dMemory; every group in one
    launch, whatever the hash tiles), or im2col with the ROAST GEMM kernels, one per group where groups start on
    hash-tile columns (the depthwise conv's do not, and F.unfold has no 3-D: the op takes the reference path
    then). Same output and gradients as the reference path."""
    monkeypatch.setenv("ROASTFX_CONV", mode)
    mapping, mem, x, b, conv_args = _conv_case(case, torch.float32, torch.Generator().manual_seed(6))
    args = ops.mapping_args(mapping)
    grad = torch.randn(ops.roast_conv(x, mem, args, 0.3, b, *conv_args).shape, generator=torch.Generator())
    expected = torch.autograd.grad((ops.roast_conv(x, mem, args, 0.3, b, *conv_args) * grad).sum(), (x, mem, b))
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    out = ops.roast_conv(x, mem, args, 0.3, b, *conv_args)
    got = torch.autograd.grad((out * grad).sum(), (x, mem, b))
    monkeypatch.setenv("ROASTFX_KERNELS", "reference")
    assert torch.allclose(out, ops.roast_conv(x, mem, args, 0.3, b, *conv_args), atol=1e-5)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-4)


class Functional(torch.nn.Module):
    """Weights read functionally, in every form dynamo records as a matmul-like op."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, dilation=(1, 2))
        self.conv1 = torch.nn.Conv1d(5, 4, 3, padding="same")
        self.w = torch.nn.Parameter(torch.randn(6, 4) / 2)  # (out, in): used as x @ w.t() and in einsum
        self.v = torch.nn.Parameter(torch.randn(4, 6) / 2)  # (out, in) of a 6 -> 4 map
        self.u = torch.nn.Parameter(torch.randn(4, 6) / 2)
        self.b = torch.nn.Parameter(torch.randn(6) / 2)

    def forward(self, x):
        h = self.conv1(self.conv(x).flatten(2)).transpose(1, 2)  # (N, T, 4)
        a = h @ self.w.t()
        e1 = torch.einsum("bti,oi->bto", h, self.w)
        e2 = torch.einsum("bto,io->bti", a, self.v)
        m = torch.matmul(a, self.u.t())
        bm = torch.bmm(a, self.u.t().expand(a.shape[0], 6, 4))
        lin = F.linear(h, self.v.t())
        mm = torch.addmm(self.b, h.reshape(-1, 4), self.v).reshape(a.shape)
        return torch.cat([a + e1 + lin + mm, e2 + m + bm], -1)


def test_functional_reads_fuse_and_match_eager(monkeypatch):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    model = roastfx.compress(Functional(), "3x", example_inputs=(x,), init="random", seed=2)
    eager = model(x)
    gx, gm = torch.autograd.grad(eager.square().sum(), (x, model.roast_memory))
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    cx, cm = torch.autograd.grad(out.square().sum(), (x, model.roast_memory))
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(cx, gx, atol=1e-4) and torch.allclose(cm, gm, atol=1e-4, rtol=1e-4)
    assert all(u.fused for u in uses), [u for u in uses if not u.fused]
    kinds = sorted(u.why.split(" from ")[-1].split(" ")[0] for u in uses)
    assert kinds == ["addmm", "bmm", "einsum", "einsum", "linear", "matmul", "matmul",
                     "roast_conv", "roast_conv"], kinds


def test_unfusable_reads_fall_back_with_a_reason():
    args = ops.mapping_args(MAPPING)  # view 13 x 6

    def f(x, y, memory):
        w = ops.materialize(memory, args, 0.5)
        swapped = torch.einsum("bk,kn->nb", x, ops.materialize(memory, args, 0.5))  # output dims reordered
        left = ops.materialize(memory, args, 0.5).t() @ y  # W @ y: the weight on the left
        return swapped.sum() + left.sum() + w.sum()

    gm = torch.fx.symbolic_trace(f)
    x, y, mem = torch.randn(4, 13), torch.randn(13, 2), torch.randn(70)
    expected = f(x, y, mem)
    uses = fuse_roast_ops(gm)
    assert not any(u.fused for u in uses) and len(uses) == 3
    whys = sorted(u.why for u in uses)
    assert "einsum 'bk,kn->nb' is not x @ W or x @ W.T on x's last dim" in whys
    assert "matmul reads the weight as its left operand (W @ x) and x is of unknown shape" in whys
    assert any(w.startswith("materialized for sum") for w in whys)
    assert torch.allclose(gm(x, y, mem), expected, atol=1e-5)


class WeightOnTheLeft(torch.nn.Module):
    """Weights multiplied from the left, as Mamba's dt_proj and channels-first code write it: W @ x over a
    batch of (in, L) inputs, W^T @ x of a 2-D x, and W @ v of a vector (the one left unfused)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 5))
        self.u = torch.nn.Parameter(torch.randn(5, 7))

    def forward(self, x):
        a = self.w @ x  # (6, 5) @ (B, 5, L) -> (B, 6, L)
        b = torch.mm(self.u.t(), x[0])  # (7, 5) @ (5, L)
        c = self.w @ x[0, :, 0]  # a vector: matmul of a matrix and a vector
        return a.square().sum() + b.square().sum() + c.sum()


def test_weight_on_the_left_fuses_as_transposed_products(monkeypatch):
    torch._dynamo.reset()
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    model = roastfx.compress(WeightOnTheLeft(), "2x", example_inputs=(x,), init="random", seed=3)
    eager = model(x)
    gx, gm = torch.autograd.grad(eager, (x, model.roast_memory))
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    cx, cm = torch.autograd.grad(out, (x, model.roast_memory))
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cx, gx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cm, gm, rtol=1e-4, atol=1e-4)
    fused = sorted(u.why for u in uses if u.fused)
    assert len(fused) == 2 and all("with the weight on the left (W @ x, as (x^T @ W^T)^T)" in w for w in fused), fused
    assert [u.why for u in uses if not u.fused] == [
        "matmul reads the weight as its left operand (W @ x) and x is a vector"]


def test_conv_same_padding_with_even_kernel_falls_back():
    torch._dynamo.reset()
    model = roastfx.compress(torch.nn.Conv1d(3, 4, 4, padding="same"), "2x", init="random")
    x = torch.randn(2, 3, 9)
    uses = []

    def backend(gm, example_inputs):
        uses.extend(fuse_roast_ops(gm))
        return gm.forward

    assert torch.allclose(torch.compile(model, backend=backend)(x), model(x), atol=1e-6)
    assert [(u.fused, u.why) for u in uses] == [
        (False, "padding='same' with an even kernel extent pads one side more (not fused)")]


def test_embedding_padding_idx_and_bag_fuse_with_eager_gradients(monkeypatch):
    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 8, padding_idx=0)
            self.bag = torch.nn.EmbeddingBag(20, 8, mode="sum")

        def forward(self, ids, bag_ids, offsets, weights):
            return self.emb(ids).sum(1) + self.bag(bag_ids, offsets, per_sample_weights=weights)

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    inputs = (torch.tensor([[0, 3, 0], [5, 0, 7]]), torch.randint(0, 20, (7,), generator=gen), torch.tensor([0, 4]),
              torch.rand(7, generator=gen))
    model = roastfx.compress(Lookup(), "2x", init="random")
    eager = model(*inputs)
    grad = torch.autograd.grad(eager.square().sum(), model.roast_memory)[0]
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(*inputs)
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(out.square().sum(), model.roast_memory)[0], grad, atol=1e-5)
    assert sorted(u.why for u in uses) == ["roast_embedding", "roast_embedding + bag reduce over the looked-up rows"]


def test_conv_model_runs_the_triton_kernels_through_the_backend(monkeypatch):
    torch._dynamo.reset()
    model = roastfx.compress(torch.nn.Sequential(torch.nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, dilation=2),
                                                 torch.nn.ReLU(), torch.nn.Conv2d(5, 6, 3, groups=1)),
                             "2x", init="random", seed=3)
    x = torch.randn(2, 3, 11, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
    eager = model(x)
    gx, gm = torch.autograd.grad(eager.square().sum(), (x, model.roast_memory))
    import roastfx.codegen.kernels as kernels

    import roastfx.codegen.triton_conv as triton_conv

    launches = {name: [] for name in ("roast_conv_forward", "roast_conv_grad_input", "roast_conv_grad_memory")}
    for name, calls in launches.items():
        original = getattr(triton_conv, name)
        monkeypatch.setattr(triton_conv, name, lambda *a, _f=original, _c=calls, **k: _c.append(1) or _f(*a, **k))
    matmuls = []
    original_matmul = kernels.roast_matmul
    monkeypatch.setattr(kernels, "roast_matmul", lambda *a, **k: matmuls.append(1) or original_matmul(*a, **k))
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    cx, cm = torch.autograd.grad(out.square().sum(), (x, model.roast_memory))
    # one implicit-GEMM launch per conv for each of the forward, dX and dMemory; no GEMM over im2col columns
    assert {name: len(calls) for name, calls in launches.items()} == dict.fromkeys(launches, 2)
    assert not matmuls
    assert torch.allclose(out, eager, atol=1e-4)
    assert torch.allclose(cx, gx, atol=1e-4) and torch.allclose(cm, gm, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("inputs", ["self", "shared-kv", "distinct", "unbatched"])
@pytest.mark.parametrize("tile_cols", [3, 4], ids=["windows", "sliced"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "fused-attention"])
def test_roast_attention_matches_multi_head_attention_forward(inputs, tile_cols, need_weights):
    """The decomposed attention against torch's own, on dense weights materialized from the same memory:
    boolean and float masks, weights averaged or per head, and q/k/v read as tile-aligned windows or sliced;
    without weights to return, through F.scaled_dot_product_attention."""
    from roastfx.codegen.attention import roast_attention
    from roastfx.codegen.reference import materialize

    gen = torch.Generator().manual_seed(9)
    E, H, L, S, N = 6, 2, 4, 5, 3
    in_map = TileHash(E, 3 * E, 2, tile_cols, 1, 0, 90, 123457, 7654321, 99, 31337, 4242, 17)
    out_map = TileHash(E, E, 2, 3, 1, 0, 90, 7654321, 123457, 5, 17, 31337, 8)
    mem = torch.randn(90, dtype=torch.float64, generator=gen, requires_grad=True)
    in_bias, out_bias = torch.randn(3 * E, dtype=torch.float64, generator=gen), torch.randn(E, dtype=torch.float64,
                                                                                             generator=gen)
    batch = () if inputs == "unbatched" else (N,)
    q = torch.randn(L, *batch, E, dtype=torch.float64, generator=gen, requires_grad=True)
    k = q if inputs == "self" else torch.randn(S, *batch, E, dtype=torch.float64, generator=gen)
    v = k if inputs in ("self", "shared-kv") else torch.randn(S, *batch, E, dtype=torch.float64, generator=gen)
    src = k.shape[0]
    padding = torch.rand(*batch, src, generator=gen) < 0.3
    padding[..., 0] = False  # every query sees at least one key
    if inputs == "distinct":  # boolean masks (True: may not attend), a causal one
        attn_mask = torch.ones(L, src, dtype=torch.bool).triu(1)
    else:  # additive float masks
        attn_mask = torch.randn(L, src, dtype=torch.float64, generator=gen)
        padding = torch.zeros(padding.shape, dtype=torch.float64).masked_fill(padding, float("-inf"))
    average = inputs != "shared-kv"

    def ours(mem):
        return roast_attention(q, k, v, H, mem, ops.mapping_args(in_map), 0.4, in_bias, ops.mapping_args(out_map),
                               0.7, out_bias, 0.0, True, padding, need_weights, attn_mask, average)

    def torchs(mem):
        w_in = materialize(mem, in_map, 0.4).t()
        w_out = materialize(mem, out_map, 0.7).t()
        return F.multi_head_attention_forward(q, k, v, E, H, w_in, in_bias, None, None, False, 0.0, w_out, out_bias,
                                              training=True, key_padding_mask=padding, need_weights=True,
                                              attn_mask=attn_mask, average_attn_weights=average)

    (out, weights), (want, want_weights) = ours(mem), torchs(mem)
    assert torch.allclose(out, want, atol=1e-10)
    assert torch.allclose(weights, want_weights, atol=1e-10) if need_weights else weights is None
    got = torch.autograd.grad(out.square().sum(), (q, mem))
    expected = torch.autograd.grad(want.square().sum(), (q, mem))
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_fuses_through_the_backend(batch_first, monkeypatch):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)

        def forward(self, x, y, mask):
            out, weights = self.attn(x, y, y, key_padding_mask=mask)
            return out + self.attn(x, x, x, need_weights=False)[0], weights

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    y = torch.randn(2, 7, 16, generator=gen)
    if not batch_first:
        x, y = x.detach().transpose(0, 1).requires_grad_(), y.transpose(0, 1)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    model = roastfx.compress(Block(), "3x", init="random", seed=5)
    eager, eager_weights = model(x, y, mask)
    gx, gm = torch.autograd.grad(eager.square().sum() + eager_weights.sum(), (x, model.roast_memory))
    uses = record_uses(monkeypatch)
    out, weights = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x, y, mask)
    cx, cm = torch.autograd.grad(out.square().sum() + weights.sum(), (x, model.roast_memory))
    assert torch.allclose(out, eager, atol=1e-5) and torch.allclose(weights, eager_weights, atol=1e-6)
    assert torch.allclose(cx, gx, atol=1e-4) and torch.allclose(cm, gm, atol=1e-4, rtol=1e-4)
    assert len(uses) == 4 and all(u.fused and u.why.startswith("roast_attention") for u in uses)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16], ids=["fp32-query", "bf16-query"])
def test_multihead_attention_under_autocast_keeps_eagers_dtypes(query_dtype, need_weights, monkeypatch):
    """Under autocast nn.MultiheadAttention's F.linear casts the query and the float32 biases to bfloat16;
    roast_attention gets them cast the same way (a bfloat16 query from the layer before, with float32 biases,
    had failed in the compiled backward; found by benchmarks/fuzz_models.py). Compiled equals eager in dtype
    and value, and trains."""
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = torch.nn.MultiheadAttention(8, 2, batch_first=True), torch.nn.Linear(8, 3)

        def forward(self, x):
            x = x.to(query_dtype)
            out, weights = self.attn(x, x, x, need_weights=need_weights)
            return self.head(x + out), weights

    model = roastfx.compress(Block(), "2x", init="random")
    x = torch.randn(2, 5, 8)
    uses = record_uses(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    assert [u.fused for u in uses] == [True] * 3, uses  # in- and out-projection, head
    for c, e in zip(compiled, eager):
        if e is None:
            assert c is None
            continue
        assert c.dtype == e.dtype, (c.dtype, e.dtype)
        torch.testing.assert_close(c.float(), e.float(), rtol=0.05, atol=0.05)
    compiled[0].float().square().mean().backward()
    assert model.roast_memory.grad is not None and model.roast_memory.grad.isfinite().all()


@pytest.mark.parametrize("grad_scaling", ["none", "site"])
def test_multihead_attention_with_separate_qkv_weights_fuses(grad_scaling, monkeypatch):
    """kdim/vdim give nn.MultiheadAttention q, k and v projection weights of their own (WavLM passes its
    Linears' weights the same way): each is a site and a roast_linear of its own inside roast_attention, each
    normalizing its own gradient with grad_scaling="site"; compiled equals eager, gradients included."""

    class Cross(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 4, kdim=10, vdim=6, batch_first=True)

        def forward(self, x, k, v):
            out, weights = self.attn(x, k, v)
            return out, weights

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    x, k, v = (torch.randn(2, n, d, generator=gen, dtype=torch.float64) for n, d in ((5, 16), (7, 10), (7, 6)))
    x.requires_grad_()
    model = roastfx.compress(Cross().double(), "3x", init="random", seed=2, grad_scaling=grad_scaling,
                             memory_dtype="float64")
    assert [s.name for s in roastfx.roast_state(model).plan.sites] == [
        "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"]
    eager, eager_weights = model(x, k, v)
    gx, gm = torch.autograd.grad(eager.square().sum() + eager_weights.sum(), (x, model.roast_memory))
    uses = record_uses(monkeypatch)
    out, weights = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x, k, v)
    cx, cm = torch.autograd.grad(out.square().sum() + weights.sum(), (x, model.roast_memory))
    torch.testing.assert_close(out, eager, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(weights, eager_weights, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cx, gx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cm, gm, atol=1e-12, rtol=1e-12)
    assert [u.why for u in uses] == [f"roast_attention: {p} projection (its own weight) as roast_linear"
                                     for p in "qkv"] + ["roast_attention: out-projection as roast_linear"]


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_inference_fast_path_fuses(norm_first, activation, monkeypatch):
    """In eval under no_grad, nn.TransformerEncoderLayer runs one aten op on dense weights; the backend
    decomposes it, and the eager fast path is the oracle."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, activation=activation, batch_first=True,
                                             norm_first=norm_first)
    model = roastfx.compress(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), "3x",
                             init="random").eval()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    uses = record_uses(monkeypatch)
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    assert torch.allclose(out, eager, atol=1e-5)
    assert len(uses) == 8 and all(u.fused and u.why.startswith("roast_encoder_layer") for u in uses)


TRANSPOSED = [  # (in, out, kernel, stride, padding, output_padding, dilation, spatial, groups)
    (3, 4, (3, 2), (2, 1), (1, 0), (1, 0), (1, 2), (4, 5), 1),
    (3, 5, (4,), (2,), (1,), (1,), (1,), (6,), 1),
    (2, 3, (1, 1), (1, 1), (0, 0), (0, 0), (1, 1), (3, 3), 1),
    (4, 6, (2, 3), (1, 2), (0, 1), (0, 1), (2, 1), (5, 4), 2),
    (4, 6, (2, 1, 2), (2, 1, 1), (0, 0, 1), (1, 0, 0), (1, 1, 2), (3, 4, 3), 2),
    # output_padding >= stride (allowed as dilation > stride), with padding: the output reaches past the
    # folded columns' crop (F.fold at the padded size counted one block too many)
    (2, 4, (2, 3), (1, 2), (1, 1), (1, 2), (2, 3), (5, 4), 1),
]


@pytest.mark.parametrize("mode", ["implicit", "im2col"])
@pytest.mark.parametrize("case", TRANSPOSED, ids=["2d-strided-dilated", "1d", "1x1", "2d-groups", "3d-groups",
                                                  "2d-output-padding-over-stride"])
def test_roast_conv_transpose_matches_dense_and_passes_opcheck(case, mode, monkeypatch):
    """Reference path in float64 against F.conv_transpose on the materialized weight (opcheck, gradcheck);
    the Triton path (interpreted on CPU: the implicit-GEMM kernels, or the ROAST GEMM's columns + F.fold,
    one launch per group) against the reference, values and grads."""
    cin, cout, kernel, stride, padding, output_padding, dilation, spatial, groups = case
    gen = torch.Generator().manual_seed(7)
    mapping = TileHash(cin, cout // groups * math.prod(kernel), 1, 4, 1, 0, 60, 123457, 7654321, 99, 31337, 4242, 17)
    args = ops.mapping_args(mapping)
    mem = torch.randn(70, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, cin, *spatial, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=gen, requires_grad=True)
    conv = (list(kernel), list(stride), list(padding), list(output_padding), list(dilation), groups)
    out = ops.roast_conv_transpose(x, mem, args, 0.3, b, *conv)
    weight = ops.materialize(mem.detach(), args, 0.3).reshape(cin, cout // groups, *kernel)
    dense = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(kernel)]
    torch.testing.assert_close(out, dense(x, weight, b, stride, padding, output_padding, groups, dilation), rtol=0,
                               atol=1e-12)
    if mode == "implicit":  # the reference path does not depend on the mode
        torch.library.opcheck(ops.roast_conv_transpose, (x, mem, args, 0.3, b, *conv))
        assert torch.autograd.gradcheck(lambda x, m, b: ops.roast_conv_transpose(x, m, args, 0.3, b, *conv),
                                        (x, mem, b))
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad((out * grad).sum(), (x, mem, b))
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    monkeypatch.setenv("ROASTFX_CONV", mode)
    leaves = [t.detach().float().requires_grad_() for t in (x, mem, b)]
    got_out = ops.roast_conv_transpose(*leaves[:2], args, 0.3, leaves[2], *conv)
    got = torch.autograd.grad((got_out * grad.float()).sum(), leaves)
    torch.testing.assert_close(got_out.double(), out, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["implicit", "im2col"])
def test_groups_that_split_the_hash_tiles(mode, monkeypatch):
    """An explicit tile is the user's: where it splits a group's rows, the implicit kernels still run every
    group (in one launch), and under ROASTFX_CONV=im2col the op materializes W, as the pass's note says."""
    torch._dynamo.reset()
    model = roastfx.compress(torch.nn.ConvTranspose2d(6, 4, 2, groups=2), "2x", init="random", tile=(2, 4))
    x = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(5), requires_grad=True)
    want = torch.autograd.grad(model(x).square().sum(), (x, model.roast_memory))
    uses = record_uses(monkeypatch)
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    monkeypatch.setenv("ROASTFX_CONV", mode)
    got = torch.autograd.grad(torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x).square().sum(),
                              (x, model.roast_memory))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert [u.why for u in uses] == ["roast_conv_transpose (2-d, groups=2 in one launch; groups of 3 in channels "
                                     "split the hash tiles (2 rows), so under ROASTFX_CONV=im2col the op "
                                     "materializes W)"]


class Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(4, 32, 3, stride=2, padding=1, output_padding=1, dilation=1)
        self.grouped = torch.nn.ConvTranspose2d(32, 6, 2, groups=2)
        self.up1d = torch.nn.ConvTranspose1d(6, 6, 2, stride=2, groups=6)  # depthwise

    def forward(self, x):
        h = F.relu(self.up(x))
        return self.up1d(self.grouped(h).flatten(2))


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_transposed_convs_fuse_through_the_backend(path, monkeypatch):
    torch._dynamo.reset()
    model = roastfx.compress(Decoder(), "2x", init="random", seed=4)
    x = torch.randn(2, 4, 3, 4, generator=torch.Generator().manual_seed(5))
    eager = model(x)
    want = torch.autograd.grad(eager.square().sum(), model.roast_memory)[0]
    uses = record_uses(monkeypatch)
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    got = torch.autograd.grad(out.square().sum(), model.roast_memory)[0]
    whys = sorted(u.why for u in uses)
    assert [w.split(";")[0] for w in whys] == ["roast_conv_transpose (1-d, groups=6 in one launch",
                                               "roast_conv_transpose (2-d)",
                                               "roast_conv_transpose (2-d, groups=2 in one launch"], whys
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_conv_ops_name_bad_geometry():
    mapping = ops.mapping_args(TileHash(2 * 16, 3, 4, 3, 1, 0, 60, 123457, 7654321, 99, 31337, 4242, 17))
    x, mem = torch.randn(1, 2, 3, 3, 3, 3), torch.randn(70)
    with pytest.raises(ValueError, match=r"roast_conv takes 1, 2 or 3 spatial dims .* kernel=\[2, 2, 2, 2\]"):
        ops.roast_conv(x, mem, mapping, 0.3, None, [2, 2, 2, 2], [1] * 4, [0] * 4, [1] * 4, 1)
    with pytest.raises(ValueError, match=r"roast_conv_transpose takes .* kernel=\[2, 2\] and \[\[1, 1\], \[0\]"):
        ops.roast_conv_transpose(x[0], mem, mapping, 0.3, None, [2, 2], [1, 1], [0], [0, 0], [1, 1])


class GroupedExperts(torch.nn.Module):
    """Top-1 mixture of experts read by torch's grouped GEMM over stacked weights: ``up`` stored (experts, out,
    in) and read transposed, as transformers' experts are; ``down`` stored (experts, in, out) and read as is."""

    def __init__(self, experts=3, d=16, h=24, grouped_mm=torch._grouped_mm):
        super().__init__()
        self.router = torch.nn.Linear(d, experts)
        self.up = torch.nn.Parameter(torch.randn(experts, h, d) / 4)
        self.down = torch.nn.Parameter(torch.randn(experts, h, d) / 5)
        self.experts, self.grouped_mm = experts, grouped_mm
        if grouped_mm is _transformers_grouped_mm:  # registers the op; not in forward: torch 2.11's dynamo breaks
            import transformers.integrations.moe  # noqa: F401  the graph at an import of transformers' lazy modules

    def forward(self, x):
        prob, expert = torch.softmax(self.router(x), -1).max(-1)
        order = torch.argsort(expert, stable=True)
        counts = torch.histc(expert.float(), bins=self.experts, min=0, max=self.experts - 1)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch.relu(self.grouped_mm(x[order], self.up.transpose(-2, -1), offs=offs))
        y = self.grouped_mm(h, self.down, offs=offs)
        return torch.empty_like(y).index_copy(0, order, y) * prob.unsqueeze(-1)


def _transformers_grouped_mm(x, w, offs):
    return torch.ops.transformers.grouped_mm_fallback(x, w, offs=offs)


_transformers_grouped_mm.__name__ = "grouped_mm_fallback"


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("grouped_mm,dtype", [(torch._grouped_mm, torch.bfloat16), (F.grouped_mm, torch.bfloat16),
                                              (_transformers_grouped_mm, torch.float64)],
                         ids=["_grouped_mm", "F.grouped_mm", "transformers"])
def test_grouped_gemm_over_stacked_experts_fuses(grouped_mm, dtype, path, monkeypatch):
    """Both stacked weights become grouped sites (view (in, experts * out), each expert whole hash tiles) and
    each grouped GEMM one roast_grouped_mm; compiled equals eager, gradients included (torch's grouped GEMM
    traces in bfloat16 only; transformers' fallback op in float64, to 1e-9)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if dtype == torch.float64 and path == "triton":  # the kernels take 32 bits at most
        dtype = torch.float32
    x = torch.randn(29, 16, dtype=dtype)
    model = roastfx.compress(GroupedExperts(grouped_mm=grouped_mm).to(dtype), "2x", example_inputs=(x,),
                             init="random", memory_dtype="float32" if dtype == torch.bfloat16 else str(dtype)[6:])
    plan = roastfx.roast_state(model).plan
    sites = {s.name: s for s in plan.sites}
    assert (sites["up"].op, sites["up"].transposed, sites["down"].op, sites["down"].transposed) == (
        "grouped", True, "grouped", False)
    for s in (sites["up"], sites["down"]):
        assert s.mapping.rows * s.mapping.cols == math.prod(s.shape) and s.mapping.cols % 3 == 0
        assert ops.column_windows(ops.mapping_args(s.mapping), 3) is not None
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    eager = model(x)
    eager.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    out.float().square().mean().backward()
    # bfloat16: GEMMs of different kernels and summation orders
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out, eager, atol=tol, rtol=tol)
    assert (model.roast_memory.grad - grads["roast_memory"]).norm() <= tol * grads["roast_memory"].norm()
    for n, p in model.named_parameters():  # the router's: small sums of many bfloat16 terms
        torch.testing.assert_close(p.grad.float(), grads[n].float(), atol=min(tol, 1e-3), rtol=tol)
    source = "_grouped_mm" if grouped_mm is not _transformers_grouped_mm else "grouped_mm_fallback"  # dynamo: F's
    assert sorted(u.why for u in uses if "grouped" in u.why) == [f"roast_grouped_mm (3 groups) from {source}"] * 2
    assert all(u.fused for u in uses), [u.why for u in uses]


def _compiled_matches_eager(model, x, path: str, dtype, monkeypatch) -> list:
    """Compiled (roast backend, aot_eager inside) equals eager on the ``path`` kernels, outputs and every
    parameter's gradient of the mean square; the backend's SiteUses."""
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    eager = model(x)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    out.square().mean().backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out, eager, atol=tol, rtol=tol)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=tol, rtol=tol)
    return uses


class PickedExperts(torch.nn.Module):
    """Top-2 mixture of experts that picks each row's stacked weight by index and multiplies in one bmm, as
    transformers' ``batched_mm`` experts do: ``up`` stored (experts, out, in) and multiplied from the left
    (W[ids] @ x), ``down`` stored (experts, in, out) and from the right (x @ W[ids]); ``rows`` rows per pick."""

    def __init__(self, experts=3, d=16, h=24, rows=1):
        super().__init__()
        self.router = torch.nn.Linear(d, experts)
        self.up = torch.nn.Parameter(torch.randn(experts, h, d) / 4)
        self.down = torch.nn.Parameter(torch.randn(experts, h, d) / 5)
        self.rows = rows

    def forward(self, x):  # x: (tokens, rows, d)
        prob, expert = torch.softmax(self.router(x.mean(1)), -1).topk(2, -1)
        ids = expert.reshape(-1)
        picked = x.repeat_interleave(2, dim=0)  # (tokens * 2, rows, d)
        h = torch.relu(torch.bmm(self.up[ids], picked.transpose(1, 2)))  # (tokens * 2, h, rows)
        y = torch.bmm(h.transpose(1, 2), self.down.index_select(0, ids))  # (tokens * 2, rows, d)
        return (y.reshape(x.shape[0], 2, self.rows, -1) * prob[:, :, None, None]).sum(1)


@pytest.mark.parametrize("path,dtype", [("reference", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("rows", [1, 3])
def test_weights_picked_per_row_fuse_into_a_grouped_gemm(path, dtype, rows, monkeypatch):
    """``bmm(W[ids], x)`` and ``bmm(x, W.index_select(0, ids))`` over a grouped site become one roast_grouped_mm
    each (the rows sorted by expert, then put back), with no weight gathered per row; compiled equals eager,
    gradients included. Both stacked weights get the grouped GEMM's layout: each expert's view block contracts
    with x, whichever side the expert multiplies from."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(11, rows, 16, dtype=dtype)  # 22 picks over 3 experts: uneven groups
    model = roastfx.compress(PickedExperts(rows=rows).to(dtype), "2x", example_inputs=(x,), init="random",
                             memory_dtype=str(dtype)[6:])
    sites = {s.name: s for s in roastfx.roast_state(model).plan.sites}
    assert [(sites[n].op, sites[n].transposed, sites[n].mapping.rows) for n in ("up", "down")] == [
        ("grouped", True, 16), ("grouped", False, 24)]
    uses = _compiled_matches_eager(model, x, path, dtype, monkeypatch)
    assert sorted(u.why for u in uses if "picked" in u.why) == [
        "roast_picked_mm (3 groups) from bmm of weights picked per row: the rows sorted by group, one "
        "roast_grouped_mm"] * 2
    assert all(u.fused for u in uses), [u.why for u in uses]


class PerHead(torch.nn.Module):
    """Stacked per-head weights read whole by batched GEMMs, entry h times W_h: baddbmm with a bias, beta and
    alpha (RecurrentGemma's gates), bmm with the weight on the left, and ``@`` (matmul) on 3-D operands."""

    def __init__(self, heads=3, k=10, n=7):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.randn(heads, k, n) / 3)  # (heads, in, out), x @ W_h
        self.gate_bias = torch.nn.Parameter(torch.randn(heads, n) / 3)
        self.mix = torch.nn.Parameter(torch.randn(heads, k, n) / 3)  # (heads, out, in), W_h @ y
        self.out = torch.nn.Parameter(torch.randn(heads, k, 5) / 3)

    def forward(self, x):  # x: (heads, tokens, k)
        g = torch.sigmoid(torch.baddbmm(self.gate_bias[:, None, :], x, self.gate, beta=0.5, alpha=2.0))
        h = torch.bmm(self.mix, g.transpose(1, 2)).transpose(1, 2)  # (heads, tokens, k)
        return torch.tanh(h) @ self.out


@pytest.mark.parametrize("path,dtype", [("reference", torch.float64), ("triton", torch.float32)])
def test_stacked_weights_read_whole_by_batched_gemms_fuse(path, dtype, monkeypatch):
    """A 3-D weight read whole by bmm / baddbmm / matmul is a grouped site (one group per batch entry) and each
    such GEMM one roast_grouped_mm (baddbmm's bias, beta and alpha applied after it); compiled equals eager in
    outputs and gradients, 13 tokens per head (not a multiple of any block)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(3, 13, 10, dtype=dtype)
    model = roastfx.compress(PerHead().to(dtype), "2x", example_inputs=(x,), init="random",
                             memory_dtype=str(dtype)[6:])
    sites = {s.name: s for s in roastfx.roast_state(model).plan.sites}
    assert {n: (sites[n].op, sites[n].transposed) for n in ("gate", "mix", "out")} == {
        "gate": ("grouped", False), "mix": ("grouped", True), "out": ("grouped", False)}
    uses = _compiled_matches_eager(model, x, path, dtype, monkeypatch)
    assert sorted(u.why.split(" from ")[1] for u in uses) == [
        f"{op} over the whole stack (entry s times group s), one roast_grouped_mm" for op in ("baddbmm", "bmm",
                                                                                          "matmul")]


def test_weights_picked_per_row_and_read_again_keep_their_materialize(monkeypatch):
    """A picked weight with a second reader is not rewritten (the fused op would not replace it): it keeps the
    materialize, and says why."""

    class Twice(PickedExperts):
        def forward(self, x):
            ids = self.router(x.mean(1)).argmax(-1)
            w = self.up[ids]
            return torch.bmm(w, x.transpose(1, 2)).sum() + w.sum()

    torch._dynamo.reset()
    x = torch.randn(7, 1, 16, dtype=torch.float64)
    model = roastfx.compress(Twice().double(), "2x", example_inputs=(x,), init="random", memory_dtype="float64")
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    torch.testing.assert_close(out, model(x))
    assert [u.why for u in uses if not u.fused] == ["bmm: the picked weights have other users"]


def _compiled_equals_eager(model, inputs: tuple, monkeypatch, tol: float) -> list:
    """The mean square of ``model(*inputs)`` forward and backward in eager, then through the roast backend
    (inner aot_eager): outputs and memory gradients agree to ``tol``. Returns the compile's SiteUses."""
    eager = model(*inputs)
    eager.square().mean().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(*inputs)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, atol=tol, rtol=tol)
    torch.testing.assert_close(model.roast_memory.grad, grad, atol=tol, rtol=tol)
    return uses


class PropertyReads(torch.nn.Module):
    """Weights read through the transposing properties (``w.T``, ``w.mT``: getattr calls in dynamo's graph) and
    cast by tensor methods (``.float()``, ``.type(dtype)``), as Falcon's linear layers and DeepSeek's router
    read theirs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(24, 16) / 4)
        self.v = torch.nn.Parameter(torch.randn(20, 24) / 5)
        self.r = torch.nn.Parameter(torch.randn(5, 20) / 4)
        self.s = torch.nn.Parameter(torch.randn(20, 3) / 4)

    def forward(self, x):
        h = torch.tanh(x @ self.w.T)
        h = torch.tanh(h @ self.v.mT)
        logits = F.linear(h.float(), self.r.float()).double()
        return logits.sum(-1, keepdim=True) + torch.matmul(h.type(torch.float32), self.s.type(torch.float32))


def test_weights_read_through_properties_and_cast_methods_fuse(monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    model = roastfx.compress(PropertyReads().double(), "2x", example_inputs=(x,), init="random",
                             memory_dtype="float64")
    assert [(s.name, s.transposed) for s in roastfx.roast_state(model).plan.sites] == [
        ("w", True), ("v", True), ("r", True), ("s", False)]
    uses = _compiled_equals_eager(model, (x,), monkeypatch, 1e-5)  # two GEMMs in float32
    # w and v are laid out transposed (V = W^T), so x @ W.T and x @ W.mT read V as it is
    assert sorted(u.why for u in uses) == ["roast_linear from linear"] + ["roast_linear from matmul"] * 3


class HeadProjections(torch.nn.Module):
    """Attention projections stored (d_model, heads, head_dim) and applied by einsum, as XLNet's and Funnel's
    are: q by ``ibh,hnd->ibnd``, the output by ``ibnd,hnd->ibh``, and one through an ellipsis."""

    def __init__(self, d=12, heads=3, head=5):
        super().__init__()
        self.q = torch.nn.Parameter(torch.randn(d, heads, head) / 4)
        self.o = torch.nn.Parameter(torch.randn(d, heads, head) / 4)
        self.k = torch.nn.Parameter(torch.randn(d, heads, head) / 4)
        self.seg = torch.nn.Parameter(torch.randn(2, heads, head) / 4)  # per-head: no single GEMM

    def forward(self, x):
        q = torch.einsum("ibh,hnd->ibnd", x, self.q)
        k = torch.einsum("...h,hnd->...nd", x, self.k)
        mixed = torch.tanh(q) * k
        out = torch.einsum("ibnd,hnd->ibh", mixed, self.o)
        return out + torch.einsum("ibnd,snd->ibns", mixed, self.seg).sum((-1, -2)).unsqueeze(-1)


def test_einsum_over_a_weight_of_several_dims_is_one_gemm(monkeypatch):
    """An einsum contracting all of a 3-D weight's leading dim, or all of its trailing dims, is x (its contracted
    dims flattened) times the weight as a matrix: roast_linear, the result unflattened; compiled equals eager,
    gradients included. An einsum batched over the weight's heads stays materialized, and says why."""
    from roastfx.passes.weight_reads import einsum_blocks

    assert einsum_blocks("ibh,hnd->ibnd", 1, (12, 3, 5), 1).kept == (3, 5)
    assert einsum_blocks("ibnd,hnd->ibh", 1, (12, 3, 5), 1).transposed
    assert einsum_blocks("ibnd,snd->ibns", 1, (2, 3, 5), 1) is None  # n is in x, W and the output
    assert einsum_blocks("ibh,hnd->ibdn", 1, (12, 3, 5), 1) is None  # the kept dims out of W's order
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(7, 2, 12, dtype=torch.float64)
    model = roastfx.compress(HeadProjections().double(), "2x", example_inputs=(x,), init="random",
                             memory_dtype="float64")
    uses = _compiled_equals_eager(model, (x,), monkeypatch, 1e-12)
    assert sorted(u.why for u in uses) == [
        "einsum 'ibnd,snd->ibns' is not x @ W or x @ W.T on x's last dim",
        "roast_linear (x @ V^T) from einsum 'ibnd,hnd->ibh', the 3-D weight as a matrix",
        "roast_linear from einsum '...h,hnd->...nd', the 3-D weight as a matrix",
        "roast_linear from einsum 'ibh,hnd->ibnd', the 3-D weight as a matrix"], [u.why for u in uses]


class Bilinears(torch.nn.Module):
    """nn.Bilinear (over inputs with an extra leading dim), and F.bilinear on a plain Parameter without bias."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Bilinear(10, 6, 4)
        self.w = torch.nn.Parameter(torch.randn(3, 4, 6) / 4)

    def forward(self, x, y):
        return F.bilinear(torch.tanh(self.b(x, y)), y, self.w)


def test_bilinear_weights_fuse_over_the_outer_product(monkeypatch):
    """A bilinear weight (out, in1, in2) is a site laid out as the (in1 * in2, out) matrix; F.bilinear over it is
    roast_linear over x1 and x2's flattened outer product; compiled equals eager, gradients included."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 10, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    model = roastfx.compress(Bilinears().double(), "2x", example_inputs=(x, y), init="random",
                             memory_dtype="float64")
    assert sorted((s.name, s.transposed, s.mapping.rows, s.mapping.cols) for s in
                  roastfx.roast_state(model).plan.sites) == [("b.weight", True, 60, 4), ("w", True, 24, 3)]
    uses = _compiled_equals_eager(model, (x, y), monkeypatch, 1e-12)
    assert [u.why for u in uses] == ["roast_linear from bilinear, over x1 and x2's flattened outer product"] * 2


class DotForms(torch.nn.Module):
    """Weights read by tensordot (dims=1, ([-1], [0]) and ([-1], [1])) and by torch.inner."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(16, 12) / 4)
        self.b = torch.nn.Parameter(torch.randn(12, 12) / 4)
        self.c = torch.nn.Parameter(torch.randn(9, 12) / 4)
        self.d = torch.nn.Parameter(torch.randn(7, 9) / 4)

    def forward(self, x):
        h = torch.tanh(torch.tensordot(x, self.a, dims=1))
        h = torch.tanh(torch.tensordot(h, self.b, dims=([-1], [0])))
        h = torch.tanh(torch.tensordot(h, self.c, dims=([2], [1])))  # h @ c.T
        return torch.inner(h, self.d)  # h @ d.T


def test_tensordot_and_inner_reads_fuse(monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    model = roastfx.compress(DotForms().double(), "2x", example_inputs=(x,), init="random", memory_dtype="float64")
    assert [s.name for s in roastfx.roast_state(model).plan.sites] == ["a", "b", "c", "d"]
    uses = _compiled_equals_eager(model, (x,), monkeypatch, 1e-12)
    assert all(u.fused for u in uses) and sorted(u.why.split(" from ")[1] for u in uses) == [
        "inner", "tensordot", "tensordot", "tensordot"], [u.why for u in uses]


def test_roast_picked_mm_equals_picking_each_rows_weight_and_refuses_bad_ids():
    """roast_picked_mm against ``bmm(W[ids], x)`` over the site's dense weights in float64 (odd sizes, uneven and
    empty groups, a negative id read as Python indexing reads it), and an id past the groups refused, as
    ``W[ids]`` refuses it, rather than leaving its row zero."""
    torch.manual_seed(0)
    x = torch.randn(11, 1, 16, dtype=torch.float64)
    model = roastfx.compress(PickedExperts().double(), "2x", example_inputs=(x,), init="random",
                             memory_dtype="float64")
    site = next(s for s in roastfx.roast_state(model).plan.sites if s.name == "up")
    rows = torch.randn(13, 16, dtype=torch.float64)
    ids = torch.tensor([2, 0, 2, -1, 0, 2, 2, 0, -3, 2, 0, 2, 2])  # -1 is expert 2, -3 expert 0; expert 1 has none
    want = torch.bmm(model.up[ids], rows.unsqueeze(-1)).squeeze(-1)
    got = ops.roast_picked_mm(rows, ids, model.roast_memory, ops.mapping_args(site.mapping), site.scale, 3)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    with pytest.raises(RuntimeError, match="roast_picked_mm: an id is out of range for 3 groups"):
        ops.roast_picked_mm(rows, ids.clamp(max=1) + 2, model.roast_memory, ops.mapping_args(site.mapping),
                            site.scale, 3)


def test_weights_picked_per_row_with_x_broadcast_keep_their_materialize(monkeypatch):
    """matmul broadcasting one x over the picked weights is not one row per pick: it keeps its materialize (and
    says so), and the compiled model computes what eager does."""

    class Broadcast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 8, 6))
            self.router = torch.nn.Linear(6, 3)

        def forward(self, x):  # x (1, 6, 1), the picks (4, 8, 6)
            return torch.matmul(self.w[self.router(x[0, :, 0]).argmax(-1).repeat(4)], x)

    torch._dynamo.reset()
    x = torch.randn(1, 6, 1, dtype=torch.float64)
    model = roastfx.compress(Broadcast().double(), "2x", example_inputs=(x,), init="random",
                             memory_dtype="float64")
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    torch.testing.assert_close(out, model(x))
    assert [u.why for u in uses if not u.fused] == ["matmul broadcasts x over the weights picked per row"]


def test_a_weight_returned_by_the_graph_stays_materialized_and_says_why(monkeypatch):
    """A read whose dense weight is an output of the graph (what dynamo compiles for a weight read by code it
    runs eagerly) keeps its materialize, and the reason names the usual cause."""
    class Returns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(x), self.lin.weight

    torch._dynamo.reset()
    model = roastfx.compress(Returns(), "2x", init="random")
    x = torch.randn(3, 6)
    uses = record_uses(monkeypatch)
    out, weight = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    eager_out, eager_weight = model(x)
    assert torch.allclose(out, eager_out, atol=1e-6) and torch.equal(weight, eager_weight)
    assert sorted(u.fused for u in uses) == [False, True]
    (kept,) = [u for u in uses if not u.fused]
    assert "itself an output of the graph" in kept.why and "experts_implementation" in kept.why


class _WeightNormed(torch.nn.Module):
    """Weight norm (torch's parametrization) over every kind of op it can scale from outside: dim 0 (per output
    channel or feature; a conv transpose's dim 0 is its input channel) and dim=None (one norm)."""

    def __init__(self, conv_dim=0):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        nn = torch.nn
        self.conv = weight_norm(nn.Conv1d(4, 6, 3, groups=2, padding=1), dim=conv_dim)
        self.up = weight_norm(nn.ConvTranspose1d(6, 5, 3, stride=2))
        self.lin = weight_norm(nn.Linear(11, 9), dim=None)
        self.head = weight_norm(nn.Linear(9, 7))
        self.conv2 = weight_norm(nn.Conv2d(2, 3, 3, bias=False), dim=None)

    def forward(self, x, y):
        h = self.head(torch.tanh(self.lin(self.up(torch.relu(self.conv(x))))))
        return h.square().mean() + self.conv2(y).square().mean()


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_weight_norm_over_a_site_fuses(inner, monkeypatch):
    """passes/split_weight_norm.py moves weight norm's scale out of the op (the squared norms from
    roastfx::slice_sumsq), so every read fuses; compiled equals eager in the loss and in the gradients of the
    memory, of weight norm's magnitudes g and of the biases."""
    torch.manual_seed(0)
    model = roastfx.compress(_WeightNormed(), "2x", init="random")
    x, y = torch.randn(2, 4, 5), torch.randn(2, 2, 6, 6)
    eager = model(x, y)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    uses = record_uses(monkeypatch)
    compiled = torch.compile(model, backend="roast", options={"inner": inner})(x, y)
    compiled.backward()
    assert [u.fused for u in uses] == [True] * 5, uses
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert set(grads) >= {"conv.parametrizations.weight.original0", "head.bias", "roast_memory"}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_weight_norm_split_keeps_the_ops_dtype_under_autocast():
    """Under autocast the op computes in bfloat16 while g and the bias stay float32: the split multiplies in
    the op's dtype, so the compiled model's outputs have eager's dtypes (not promoted to float32)."""
    torch.manual_seed(0)
    model = roastfx.compress(_WeightNormed(), "2x", init="random")
    x, y = torch.randn(2, 4, 5), torch.randn(2, 2, 6, 6)
    compiled = torch.compile(model, backend="roast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = (model.head(torch.tanh(model.lin(model.up(torch.relu(model.conv(x)))))), model.conv2(y))
        parts = torch.compile(lambda x, y: (model.head(torch.tanh(model.lin(model.up(torch.relu(model.conv(x)))))),
                                            model.conv2(y)), backend="roast")(x, y)
        total = compiled(x, y)
    assert [p.dtype for p in parts] == [e.dtype for e in eager] == [torch.bfloat16] * 2
    for p, e in zip(parts, eager):
        torch.testing.assert_close(p.float(), e.float(), rtol=0.05, atol=0.02)
    total.backward()
    assert model.roast_memory.grad is not None and model.roast_memory.grad.isfinite().all()


class _TapNormed(torch.nn.Module):
    """Weight norm inside a conv's reduction: Wav2Vec2's positional conv (grouped conv1d, padding, norm per
    kernel tap: dim=2), a conv2d normed per input channel (dim=1) and a conv3d per kernel column (dim=4)."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        nn = torch.nn
        self.pos = weight_norm(nn.Conv1d(6, 9, 5, padding=2, groups=3), dim=2)
        self.conv2 = weight_norm(nn.Conv2d(3, 5, (3, 2), stride=(1, 2)), dim=1)
        self.conv3 = weight_norm(nn.Conv3d(2, 4, (2, 3, 2), bias=False), dim=4)

    def forward(self, x, y, z):
        return (torch.nn.functional.gelu(self.pos(x)).square().mean() + self.conv2(y).square().mean()
                + self.conv3(z).square().mean())


def _loss_and_gradients_match_eager(model, inputs, monkeypatch) -> list:
    """The SiteUses of compiling ``model`` (a scalar loss of ``inputs``), after checking that compiled equals
    eager in the loss and in every parameter's gradient."""
    eager = model(*inputs)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    uses = record_uses(monkeypatch)
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(*inputs)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return uses


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_weight_norm_inside_a_convs_reduction_fuses(kernels, monkeypatch):
    """A norm per kernel tap or input channel scales the weight along the conv's reduction: split_weight_norm
    writes the conv over the site's view with one scale per view row (the rows' squared norms from
    slice_sumsq), which fuses into roastfx::roast_conv_row_scaled, the Triton kernels scaling each B row as
    they read it (interpreted on CPU). Compiled equals eager in the loss and in the gradients of the memory,
    of g (the row scale's gradient) and of the biases."""
    monkeypatch.setenv("ROASTFX_KERNELS", kernels)
    torch.manual_seed(0)
    model = roastfx.compress(_TapNormed(), "2x", init="random")
    inputs = torch.randn(2, 6, 11), torch.randn(2, 3, 6, 7), torch.randn(1, 2, 4, 5, 4)
    assert {"pos.parametrizations.weight.original0", "conv2.bias", "roast_memory"} <= dict(model.named_parameters()).keys()
    uses = _loss_and_gradients_match_eager(model, inputs, monkeypatch)
    assert [u.fused for u in uses] == [True] * 3, uses
    assert all("roast_conv_row_scaled" in u.why for u in uses), uses


class _InputNormed(torch.nn.Module):
    """Weight norm over dim 1 of a linear (per input feature: the scale moves onto x) and of transposed convs
    (per output channel within a group: onto the output, repeated per group), and one per kernel tap of a
    transposed conv (dim 2, inside its reduction: stays materialized)."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        nn = torch.nn
        self.lin = weight_norm(nn.Linear(7, 9), dim=1)
        self.up = weight_norm(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), dim=1)
        self.up2 = weight_norm(nn.ConvTranspose2d(3, 5, (2, 3), bias=False), dim=1)
        self.taps = weight_norm(nn.ConvTranspose1d(4, 3, 3), dim=2)

    def forward(self, x, y, z):
        return (torch.tanh(self.lin(x)).square().mean() + self.up(y).square().mean()
                + self.up2(z).square().mean() + self.taps(y).square().mean())


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_weight_norm_over_input_features_and_output_channels_fuses(kernels, monkeypatch):
    """A linear's norm per input feature (``linear(x * s, v, b)``, the squared norms per column of the weight)
    and a transposed conv's per output channel (``conv_transpose(x, v) * s + b``) fuse; per kernel tap of a
    transposed conv stays materialized with its reason. Compiled equals eager in the loss and the gradients
    of the memory, of every g and of the biases."""
    monkeypatch.setenv("ROASTFX_KERNELS", kernels)
    torch.manual_seed(0)
    model = roastfx.compress(_InputNormed(), "2x", init="random")
    inputs = torch.randn(3, 5, 7), torch.randn(2, 4, 6), torch.randn(2, 3, 4, 5)
    assert {"lin.parametrizations.weight.original0", "up.parametrizations.weight.original0", "up.bias",
            "roast_memory"} <= dict(model.named_parameters()).keys()
    uses = _loss_and_gradients_match_eager(model, inputs, monkeypatch)
    assert [u.fused for u in uses] == [True, True, True, False], uses
    assert "per kernel tap" in uses[3].why and "transposed conv" in uses[3].why, uses[3].why


@pytest.mark.parametrize("build,shapes,names", [
    (_TapNormed, [(2, 6, 11), (2, 3, 6, 7), (1, 2, 4, 5, 4)], ("pos", "conv2", "conv3")),
    (_InputNormed, [(3, 5, 7), (2, 4, 6), (2, 3, 4, 5)], ("lin", "up", "up2")),
], ids=["inside-a-convs-reduction", "input-features-and-output-channels"])
def test_split_weight_norm_keeps_eagers_dtypes_under_autocast(build, shapes, names):
    """Under CPU autocast the row-scaled convs, and the linear and transposed convs with the scale moved onto
    their input or output, compute in bfloat16 as eager's ops do (the scales stay float32): eager's dtypes,
    and its values up to bfloat16 rounding."""
    torch.manual_seed(0)
    model = roastfx.compress(build(), "2x", init="random")
    inputs = [torch.randn(*shape) for shape in shapes]

    def parts(*inputs):
        return tuple(getattr(model, name)(x) for name, x in zip(names, inputs))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = parts(*inputs)
        compiled = torch.compile(parts, backend="roast")(*inputs)
    assert [c.dtype for c in compiled] == [e.dtype for e in eager] == [torch.bfloat16] * 3
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c.float(), e.float(), rtol=0.05, atol=0.03)


def test_weight_norm_that_cannot_be_split_stays_materialized_with_its_reason(monkeypatch):
    """Site gradient scaling would be bypassed by the norms: those reads keep _weight_norm on the view,
    compiled still equals eager."""
    torch.manual_seed(0)
    model = roastfx.compress(_WeightNormed(conv_dim=2), "2x", init="random", grad_scaling="site")
    x, y = torch.randn(2, 4, 5), torch.randn(2, 2, 6, 6)
    eager = model(x, y)
    eager.backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    uses = record_uses(monkeypatch)
    compiled = torch.compile(model, backend="roast")(x, y)
    compiled.backward()
    left = [u.why for u in uses if not u.fused]
    assert left and all("grad_scaling='site'" in why for why in left), left
    assert len(left) == 5
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.roast_memory.grad, grad, rtol=1e-4, atol=1e-7)


class _AddedProducts(torch.nn.Module):
    """addmm / baddbmm over weights, in the forms roast_linear does not take whole: a batched product over a
    weight expanded over the batch with beta and alpha, addmm with a matrix added and alpha, and the method
    form with the weight on the left and beta=0 (torch then ignores the input, NaNs included)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 6))
        self.b = torch.nn.Parameter(torch.randn(6))
        self.v = torch.nn.Parameter(torch.randn(8, 6))
        self.u = torch.nn.Parameter(torch.randn(6, 8))

    def forward(self, x):
        flat = x.reshape(-1, 8)
        return (torch.baddbmm(self.b.expand(x.shape[0], x.shape[1], 6), x, self.w.expand(x.shape[0], 8, 6),
                              beta=0.5, alpha=2.0),
                torch.addmm(torch.ones(flat.shape[0], 6), flat, self.v, alpha=3.0),
                torch.full((6, flat.shape[0]), float("nan")).addmm(self.u, flat.t(), beta=0))


def test_added_products_over_a_weight_fuse(monkeypatch):
    """fuse_roast_ops rewrites addmm / baddbmm as beta * input + alpha * (the product), and the product fuses
    as any mm / bmm: compiled equals eager, outputs and memory gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    model = roastfx.compress(_AddedProducts(), "2x", example_inputs=(x,))
    uses = record_uses(monkeypatch)
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x)
    eager = model(x)
    assert [u.fused for u in uses] == [True] * 3, uses
    assert all(c.isfinite().all() for c in compiled)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    sum(c.sum() for c in compiled).backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    sum(e.sum() for e in eager).backward()
    torch.testing.assert_close(grad, model.roast_memory.grad, rtol=1e-5, atol=1e-5)


def test_added_products_keep_eagers_dtypes_under_autocast():
    """Under autocast torch casts addmm's / baddbmm's added input (a float32 bias) to bfloat16 with the
    product: the split casts it too, so compiled outputs have eager's dtypes (found by
    benchmarks/fuzz_models.py: the float32 sum had made the next linear return float32 as well)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    model = roastfx.compress(_AddedProducts(), "2x", example_inputs=(x,))
    head = torch.nn.Linear(6, 4)

    def run(x):
        a, b, c = model(x)
        return a, b, c, head(b)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = run(x)
        compiled = torch.compile(run, backend="roast", options={"inner": "aot_eager"})(x)
    assert [c.dtype for c in compiled] == [e.dtype for e in eager] == [torch.bfloat16] * 4
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c.float(), e.float(), rtol=0.05, atol=0.1)


class _ConcatenatedWeights(torch.nn.Module):
    """Weights concatenated before a matmul: MobileBERT's head (``x @ cat([embedding.weight.t(),
    dense.weight], 0)``, the tied table read transposed) and two functional weights side by side (dim 1)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 5)
        self.dense = torch.nn.Linear(12, 3, bias=False)
        self.a = torch.nn.Parameter(torch.randn(8, 4))
        self.b = torch.nn.Parameter(torch.randn(8, 6))

    def forward(self, ids, x):
        h = self.emb(ids)
        h = torch.cat([h, torch.tanh(h[..., :3])], -1)
        return h.matmul(torch.cat([self.emb.weight.t(), self.dense.weight], dim=0)), x @ torch.cat([self.a, self.b], 1)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_concatenated_weights_fuse_part_by_part(path, monkeypatch):
    """A weight concatenated with others before a matmul is a site (capture_sites follows the cat) and the
    product splits per part (along the contraction: x's slices times each part, summed; along the output: the
    products concatenated), each part one roast_linear; compiled equals eager, outputs and memory gradient."""
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    torch._dynamo.reset()
    torch.manual_seed(0)
    ids, x = torch.randint(0, 12, (2, 3)), torch.randn(2, 3, 8)
    model = roastfx.compress(_ConcatenatedWeights(), "2x", example_inputs=(ids, x), init="random")
    assert {s.name for s in roastfx.roast_state(model).plan.sites} == {"emb.weight", "dense.weight", "a", "b"}
    uses = record_uses(monkeypatch)
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(ids, x)
    eager = model(ids, x)
    assert [u.fused for u in uses] == [True] * 5, uses
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    sum(c.square().sum() for c in compiled).backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    sum(e.square().sum() for e in eager).backward()
    torch.testing.assert_close(grad, model.roast_memory.grad, rtol=1e-5, atol=1e-5)
