"""grad_scaling="site" in the fused roast ops: each op's ``grad_norm`` flag gives the memory the gradient
that the eager path (materialize, then ``roastfx::site_grad_norm``, then the dense op) gives it, and the
roast backend fuses every read of such a model as it does without the option."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import roastfx
from helpers import MLP, Mixed, mixed_inputs
from roastfx.codegen import ops
from roastfx.codegen.attention import roast_attention
from roastfx.codegen.epilogue_op import roast_linear_epilogue
from roastfx.codegen.grad_norm import site_grad_norm
from roastfx.codegen.hashing import TileHash
from test_fuse_roast_ops import record_uses

# odd shapes: 13x22 view in 4x5 tiles (partial tiles on both edges)
MAPPING = TileHash(13, 22, 4, 5, 2, 0, 97, 123457, 7654321, 99, 31337, 4242, 17)
ARGS = ops.mapping_args(MAPPING)
# a conv2d's view: in/groups * kh * kw = 3 * 3 * 2 = 18 rows, 10 out channels
CONV = ops.mapping_args(TileHash(18, 10, 3, 5, 1, 0, 70, 5, 7, 11, 13, 17, 19))


def rand(*shape, seed, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def view(memory, mapping, scale, norm=True):
    """The eager path's weight view: materialize, then the per-site gradient normalization."""
    v = ops.materialize(memory, mapping, scale)
    return site_grad_norm(v) if norm else v


def memory_grads(fused, eager, memory, upstream):
    """d(sum(out * upstream))/d(memory) of both paths, and their outputs."""
    out, want = fused(memory), eager(memory)
    got = torch.autograd.grad((out * upstream).sum(), memory)[0]
    expected = torch.autograd.grad((want * upstream).sum(), memory)[0]
    return out, want, got, expected


def linear_case(dtype):
    x, bias = rand(3, 4, 13, seed=1, dtype=dtype), rand(22, seed=2, dtype=dtype)
    return x, bias, rand(97, seed=3, dtype=dtype).requires_grad_(), rand(3, 4, 22, seed=4, dtype=dtype, scale=1e3)


@pytest.mark.parametrize("flip", [False, True], ids=["x@V", "x@V^T"])
def test_linear_and_epilogue_memory_gradient_equals_the_eager_path(flip):
    x, bias, mem, up = linear_case(torch.float64)
    if flip:
        x, up = rand(3, 4, 22, seed=1), rand(3, 4, 13, seed=4, scale=1e3)
        bias = None

    def eager(m):
        v = view(m, ARGS, 0.3)
        out = x @ (v.t() if flip else v)
        return torch.relu(out + bias if bias is not None else out)

    def fused(m):
        return ops.roast_linear(x, m, ARGS, 0.3, bias, "relu", flip, True)

    out, want, got, expected = memory_grads(fused, eager, mem, up)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    # the flag changes the gradient: here by a factor of ~1e3
    plain = torch.autograd.grad((ops.roast_linear(x, mem, ARGS, 0.3, bias, "relu", flip) * up).sum(), mem)[0]
    assert float(plain.abs().max()) > 100 * float(got.abs().max())

    extras = [bias] if bias is not None else []
    signature = "add:x0|gelu|mul:0.5" if bias is not None else "gelu|mul:0.5"
    epi = roast_linear_epilogue(x, mem, ARGS, 0.3, signature, extras, flip, grad_norm=True)
    want = F.gelu((x @ (view(mem, ARGS, 0.3).t() if flip else view(mem, ARGS, 0.3))) + (bias if extras else 0)) * 0.5
    got = torch.autograd.grad((epi * up).sum(), mem)[0]
    expected = torch.autograd.grad((want * up).sum(), mem)[0]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_memory_gradient_equals_the_eager_path(dims):
    kernel = [6] if dims == 1 else [3, 2]
    x = rand(2, 3, 9, seed=5) if dims == 1 else rand(2, 3, 7, 6, seed=5)
    mem, bias = rand(70, seed=6).requires_grad_(), rand(10, seed=7)
    conv = F.conv1d if dims == 1 else F.conv2d
    stride, padding, dilation = [1] * dims, [1] * dims, [1] * dims

    def eager(m):
        return conv(x, view(m, CONV, 0.4).t().reshape(10, 3, *kernel), bias, stride, padding, dilation)

    def fused(m):
        return ops.roast_conv(x, m, CONV, 0.4, bias, kernel, stride, padding, dilation, 1, True)

    up = rand(*eager(mem).shape, seed=8, scale=1e-3)
    out, want, got, expected = memory_grads(fused, eager, mem, up)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_embedding_and_bag_memory_gradient_equals_the_eager_path():
    """The table's RMS counts the rows no id looked up as zeros, and sums repeated ids first."""
    ids = torch.tensor([[0, 5, 5, 12], [3, 5, 0, 7]])
    mem = rand(97, seed=9).requires_grad_()
    up = rand(2, 4, 22, seed=10, scale=50.0)

    def eager(m):
        return F.embedding(ids, view(m, ARGS, 0.7), padding_idx=3)

    def fused(m):
        return ops.roast_embedding(ids, m, ARGS, 0.7, 3, True)

    out, want, got, expected = memory_grads(fused, eager, mem, up)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)

    flat, offsets = ids.reshape(-1), torch.tensor([0, 3, 6])
    up = rand(3, 22, seed=11, scale=1e-4)

    def eager_bag(m):
        return F.embedding_bag(flat, view(m, ARGS, 0.7), offsets, mode="mean")

    def fused_bag(m):
        return ops.embedding_bag_of_rows(ops.roast_embedding(flat, m, ARGS, 0.7, None, True), flat, offsets,
                                         "mean", None, False)

    out, want, got, expected = memory_grads(fused_bag, eager_bag, mem, up)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_self_attention_memory_gradient_equals_the_eager_path():
    embed, heads = 8, 2
    in_map = ops.mapping_args(TileHash(embed, 3 * embed, 4, 4, 2, 0, 60, 5, 7, 11, 13, 17, 19))
    out_map = ops.mapping_args(TileHash(embed, embed, 4, 4, 2, 60, 30, 23, 29, 31, 37, 41, 43))
    q = rand(5, 2, embed, seed=12)
    in_bias, out_bias = rand(3 * embed, seed=13), rand(embed, seed=14)
    mem = rand(90, seed=15).requires_grad_()
    up = rand(5, 2, embed, seed=16, scale=1e2)

    def eager(m):
        return F.multi_head_attention_forward(q, q, q, embed, heads, view(m, in_map, 0.5).t(), in_bias, None, None,
                                              False, 0.0, view(m, out_map, 0.6).t(), out_bias, need_weights=False)[0]

    def fused(m):
        return roast_attention(q, q, q, heads, m, in_map, 0.5, in_bias, out_map, 0.6, out_bias, 0.0, False,
                               need_weights=False, in_grad_norm=True, out_grad_norm=True)[0]

    out, want, got, expected = memory_grads(fused, eager, mem, up)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="in_grad_norm=True needs self-attention"):
        roast_attention(q, q.clone(), q, heads, mem, in_map, 0.5, in_bias, out_map, 0.6, out_bias, 0.0, False,
                        in_grad_norm=True)


def test_zero_and_non_finite_gradients_pass_unchanged():
    x, bias, mem, _ = linear_case(torch.float64)
    zero = torch.autograd.grad(ops.roast_linear(x, mem, ARGS, 0.3, bias, "none", False, True).sum() * 0, mem)[0]
    assert torch.equal(zero, torch.zeros_like(mem))
    inf = torch.autograd.grad((ops.roast_linear(x, mem, ARGS, 0.3, None, "none", False, True)
                               * torch.full((22,), float("inf"), dtype=torch.float64)).sum(), mem)[0]
    eager = torch.autograd.grad((x @ view(mem, ARGS, 0.3) * torch.full((22,), float("inf"),
                                                                        dtype=torch.float64)).sum(), mem)[0]
    assert torch.equal(inf.isnan(), eager.isnan()) and torch.equal(inf.isinf(), eager.isinf())


def test_ops_with_the_flag_pass_opcheck():
    x, bias, mem, _ = linear_case(torch.float64)
    torch.library.opcheck(site_grad_norm, (rand(13, 22, seed=17).requires_grad_(),))
    torch.library.opcheck(ops.roast_linear, (x.requires_grad_(), mem, ARGS, 0.3, bias, "relu", False, True))
    torch.library.opcheck(ops.roast_embedding, (torch.tensor([[1, 4, 4]]), mem, ARGS, 0.3, None, True))
    conv_mem = rand(70, seed=18).requires_grad_()
    torch.library.opcheck(ops.roast_conv, (rand(2, 3, 9, seed=19).requires_grad_(), conv_mem, CONV, 0.4, None, [6],
                                           [1], [0], [1], 1, True))


@pytest.mark.parametrize("kind", ["linear", "epilogue", "conv", "conv-groups", "conv-groups-im2col", "embedding"])
def test_triton_path_equals_the_reference_path(kind, monkeypatch):
    """The kernels' sum of squares (linear, conv: implicit GEMM or im2col) and the per-id row sums (embedding)
    under ROASTFX_KERNELS=triton (the Triton interpreter on CPU) against the reference path, float32."""
    monkeypatch.setenv("ROASTFX_CONV", "im2col" if kind.endswith("im2col") else "implicit")
    x, bias, mem, up = linear_case(torch.float32)
    if kind == "linear":
        def run(m):
            return ops.roast_linear(x, m, ARGS, 0.3, bias, "none", False, True)
    elif kind == "epilogue":
        def run(m):
            return roast_linear_epilogue(x, m, ARGS, 0.3, "add:x0|relu", [bias], False, True)
    elif kind.startswith("conv"):
        groups = 2 if kind.startswith("conv-groups") else 1  # two 5-column windows of the view: one GEMM each
        x2, mem = rand(2, 3 * groups, 7, 6, seed=20, dtype=torch.float32), rand(70, seed=21, dtype=torch.float32)
        mem.requires_grad_()
        up = rand(2, 10, 5, 5, seed=22, dtype=torch.float32, scale=1e3)

        def run(m):
            return ops.roast_conv(x2, m, CONV, 0.4, None, [3, 2], [1, 1], [0, 0], [1, 1], groups, True)
    else:
        ids = torch.tensor([[0, 5, 5, 12], [3, 5, 0, 7], [1, 1, 1, 2]])

        def run(m):
            return ops.roast_embedding(ids, m, ARGS, 0.7, None, True)

    results = []
    for path in ("reference", "triton"):
        monkeypatch.setenv("ROASTFX_KERNELS", path)
        out = run(mem)
        upstream = up if kind != "embedding" else rand(*out.shape, seed=23, dtype=torch.float32, scale=1e3)
        results.append((out, torch.autograd.grad((out * upstream).sum(), mem)[0]))
    (out_ref, grad_ref), (out_tri, grad_tri) = results
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_tri, grad_ref, rtol=1e-4, atol=1e-5)
    assert float(grad_ref.abs().max()) < 10  # normalized: not the 1e3 of the upstream gradient


def compiled_against_eager(model, inputs, monkeypatch, loss=lambda out: out.square().mean()):
    """(fused uses, their reasons) after checking that compiled output and memory gradient equal eager."""
    torch._dynamo.reset()
    eager = model(*inputs)
    loss(eager).backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    uses = record_uses(monkeypatch)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(*inputs)
    loss(out).backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.roast_memory.grad, grad, rtol=1e-4, atol=1e-6)
    return uses


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("build", ["mlp", "conv", "mixed"])
def test_compiled_site_scaled_models_fuse_every_read_and_match_eager(build, monkeypatch):
    """MLP (with the epilogue folded), a conv net, and Mixed (embedding, bag, grouped conv, x @ w, einsum and
    F.linear on one weight read twice)."""
    torch.manual_seed(0)
    model, inputs = {"mlp": (MLP(20, 24, 7), (rand(6, 20, seed=1, dtype=torch.float32),)),
                     "conv": (ConvNet(), (rand(2, 3, 8, 8, seed=2, dtype=torch.float32),)),
                     "mixed": (Mixed(), mixed_inputs(2, 5))}[build]
    model = roastfx.compress(model, "3x", init="random", seed=3, grad_scaling="site",
                             example_inputs=inputs if build == "mixed" else None)
    uses = compiled_against_eager(model, inputs, monkeypatch)
    assert uses and all(u.fused and u.why.endswith("gradient normalized") for u in uses), uses


def test_compiled_site_scaled_model_on_the_triton_path_matches_eager(monkeypatch):
    """ROASTFX_KERNELS=triton (the interpreter on CPU): the traced backward takes the kernel's sum of squares."""
    torch.manual_seed(0)
    inputs = mixed_inputs(2, 5)
    model = roastfx.compress(Mixed(), "3x", init="random", seed=3, grad_scaling="site", example_inputs=inputs)
    monkeypatch.setenv("ROASTFX_KERNELS", "triton")
    uses = compiled_against_eager(model, inputs, monkeypatch)
    assert uses and all(u.fused and u.why.endswith("gradient normalized") for u in uses), uses


def test_compiled_site_scaled_bert_fuses_every_read_and_matches_eager(monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=101,
                                                    max_position_embeddings=32, num_labels=3))
    model = roastfx.compress(bert, "8x", init="random", grad_scaling="site").eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))

    class Logits(nn.Module):  # roast_memory and a tensor output, for the shared helper
        def __init__(self):
            super().__init__()
            self.bert = model

        @property
        def roast_memory(self):
            return model.roast_memory

        def forward(self, ids):
            return self.bert(input_ids=ids).logits

    uses = compiled_against_eager(Logits(), (ids,), monkeypatch)
    assert len(uses) >= 9 and all(u.fused and u.why.endswith("gradient normalized") for u in uses), uses


class TiedOnce(nn.Module):
    """One read of a weight used twice: eager normalizes the sum of both uses' gradients."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)

    def forward(self, ids):
        table = self.emb.weight
        return F.embedding(ids, table) @ table.t()


class TiedModules(nn.Module):
    """A tied head (two modules bound to one parameter): each module reads (and normalizes) on its own."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.head = nn.Linear(12, 30, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_tied_weights_fuse_only_where_each_read_is_normalized_alone(monkeypatch):
    ids = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    once = roastfx.compress(TiedOnce(), "2x", init="random", grad_scaling="site")
    uses = compiled_against_eager(once, (ids,), monkeypatch)
    assert len(uses) == 1 and not uses[0].fused and "normalized together" in uses[0].why
    torch.manual_seed(0)
    tied = roastfx.compress(TiedModules(), "2x", init="random", grad_scaling="site")
    assert len(roastfx.roast_state(tied).plan.sites) == 1
    uses = compiled_against_eager(tied, (ids,), monkeypatch)
    assert [u.why for u in uses] == ["roast_embedding, gradient normalized",
                                     "roast_linear (x @ V^T) from linear, gradient normalized"]


class CalledTwice(nn.Module):
    """One linear called twice in a forward: two reads of its weight, each normalized on its own."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 10)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def test_a_weight_read_twice_is_normalized_per_read_in_every_forward(monkeypatch):
    """Eager shares a weight that the previous forward read more than once (RoastState.kept_read), but not a
    site-scaled one in training: sharing would normalize the sum of both reads' gradients from the second
    forward on, while the first forward and compiled graphs normalize each read (found by
    benchmarks/fuzz_models.py). First and second eager forwards, and compiled, give one memory gradient."""
    torch.manual_seed(0)
    model = roastfx.compress(CalledTwice(), "2x", init="random", grad_scaling="site")
    x = torch.randn(4, 10)
    grads = []
    for _ in range(2):
        model(x).square().mean().backward()
        grads.append(model.roast_memory.grad.clone())
        model.zero_grad()
    assert roastfx.roast_state(model).repeated == {"lin.weight"}  # the second forward knew it was read twice
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    uses = compiled_against_eager(model, (x,), monkeypatch)
    assert [u.fused for u in uses] == [True, True], uses
    with torch.no_grad():  # no gradient, nothing to normalize: the read is shared again
        model(x)
        state = roastfx.roast_state(model)
        state.begin_forward()
        try:
            assert model.lin.weight is model.lin.weight
        finally:
            state.end_forward()


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_multihead_attention_fuses_self_attention_and_falls_back_for_cross(cross, monkeypatch):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x, y):
            return self.attn(x, y if cross else x, y if cross else x, need_weights=False)[0]

    torch.manual_seed(0)
    model = roastfx.compress(Block(), "3x", init="random", seed=5, grad_scaling="site")
    inputs = (rand(2, 5, 16, seed=5, dtype=torch.float32), rand(2, 7, 16, seed=6, dtype=torch.float32))
    uses = compiled_against_eager(model, inputs, monkeypatch)
    if cross:
        assert not any(u.fused for u in uses) and "distinct query/key/value" in uses[0].why
    else:
        assert len(uses) == 2 and all(u.fused and u.why.startswith("roast_attention") for u in uses)
