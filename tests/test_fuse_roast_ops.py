"""The fuse_roast_ops pass and the roast custom ops."""
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


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_compiled_matches_eager_on_every_site_kind(inner, caplog):
    torch._dynamo.reset()
    model = roastfx.compress(Mixed(), "4x", example_inputs=mixed_inputs(), init="random")
    inputs = mixed_inputs(2, 5)
    eager = model(*inputs)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with caplog.at_level("INFO", logger="roastfx"):
        out = torch.compile(model, backend="roast", options={"inner": inner})(*inputs)
    out.square().mean().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n
    # head (F.linear), w (x @ w) and emb (embedding); the bag, the conv and head in einsum materialize
    assert "3 weight uses fused" in caplog.text


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
def test_transformers_models_through_the_backend(build, caplog):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(build(), "8x", init="random").eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    eager = model(input_ids=ids).logits
    eager.square().mean().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    with caplog.at_level("INFO", logger="roastfx"):
        out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(input_ids=ids).logits
    out.square().mean().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(model.roast_memory.grad, grad, atol=1e-5, rtol=1e-4)
    assert "fused (roast_embedding)" in caplog.text


@pytest.mark.parametrize("act,module", [("relu", torch.nn.ReLU()), ("silu", torch.nn.SiLU()),
                                        ("gelu_tanh", torch.nn.GELU(approximate="tanh"))])
def test_activation_epilogue_is_fused(act, module, caplog, monkeypatch):
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
    with caplog.at_level("INFO", logger="roastfx"):
        out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(xs)
    out.square().sum().backward()
    assert f"fused (roast_linear + {act})" in caplog.text
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(model.roast_memory.grad, grad, atol=1e-4, rtol=1e-4)
