"""The reference path: forward against an independent dense model, gradients, dtypes."""
import pytest
import torch
from torch import nn

import roastfx
from roastfx.codegen.hashing import TileHash
from roastfx.codegen.reference import materialize, materialize_rows
from helpers import MLP, Mixed, dense_weight_from_docs, mixed_inputs


def dense_twin(model: nn.Module, fresh: nn.Module) -> nn.Module:
    """A plain dense model whose weights are materialized from the docs' formulas."""
    state = roastfx.roast_state(model)
    sd = {k: v for k, v in model.state_dict().items() if k not in ("roast_memory", "_extra_state")}
    for site in state.plan.sites:
        w = dense_weight_from_docs(state.memory, site).float()
        for b in site.bindings:
            sd[b] = w
    fresh.load_state_dict(sd)
    return fresh


def test_forward_equals_independently_materialized_dense_model():
    torch.manual_seed(1)
    model = Mixed()
    twin = Mixed()
    roastfx.compress(model, "5x", example_inputs=mixed_inputs(), init="random")
    dense_twin(model, twin)
    for batch, seq in [(2, 3), (5, 9)]:
        inputs = mixed_inputs(batch, seq, torch.Generator().manual_seed(batch))
        assert torch.allclose(model(*inputs), twin(*inputs), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_memory_and_uncompressed_tensors():
    model = Mixed()
    roastfx.compress(model, "5x", example_inputs=mixed_inputs(), init="random")
    model(*mixed_inputs()).square().mean().backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert names == {n for n, _ in model.named_parameters()}
    assert names == {"roast_memory", "conv.bias", "norm.weight", "norm.bias"}
    assert model.roast_memory.grad.abs().sum() > 0


def test_memory_gradient_equals_chain_rule_through_dense_twin():
    torch.manual_seed(2)
    model = MLP(12, 20, 5)
    roastfx.compress(model, "3x", init="random")
    state = roastfx.roast_state(model)
    x = torch.randn(7, 12)
    model(x).pow(2).sum().backward()
    # independent: dense grads of a twin, pushed back through the documented map by hand
    twin = dense_twin(model, MLP(12, 20, 5))
    twin(x).pow(2).sum().backward()
    expected = torch.zeros(state.plan.memory_size, dtype=torch.float64)
    for site in state.plan.sites:
        g = dict(twin.named_parameters())[site.name].grad.double()
        g_view = g.reshape(g.shape[0], -1).t() if site.transposed else g.reshape(g.shape[0], -1)
        index, sign = site.mapping.full_index()
        expected.index_add_(0, index.reshape(-1), (g_view * sign * site.scale).reshape(-1))
    assert torch.allclose(state.memory.grad.double(), expected, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    mapping = TileHash(9, 7, 4, 3, 2, 0, 40, 123457, 7654321, 99, 31337, 4242, 17)
    memory = torch.randn(40, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(5, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, x: x @ materialize(m, mapping, 0.7), (memory, x))
    rows = torch.tensor([0, 3, 3, 8])
    assert torch.autograd.gradcheck(lambda m: materialize_rows(m, mapping, 0.7, rows), (memory,))


def test_gradcheck_compressed_module_float64():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    roastfx.compress(model, 0.5, init="random", memory_dtype="float64")
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    memory = model.roast_memory
    # gradient wrt x and, via autograd.grad, the memory's analytic gradient vs finite differences
    assert torch.autograd.gradcheck(model, (x,))
    y = model(x).sum()
    (g,) = torch.autograd.grad(y, memory)
    eps = 1e-6
    for i in range(0, memory.numel(), 3):
        with torch.no_grad():
            memory[i] += eps
            up = model(x).sum()
            memory[i] -= 2 * eps
            down = model(x).sum()
            memory[i] += eps
        assert abs(float((up - down) / (2 * eps)) - float(g[i])) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_forward_backward(dtype):
    model = MLP(16, 32, 4)
    roastfx.compress(model, "4x", init="random", memory_dtype=str(dtype).removeprefix("torch."))
    model.to(dtype)
    assert model.roast_memory.dtype == dtype and model.fc1.weight.dtype == dtype
    x = torch.randn(3, 16, dtype=dtype)
    ref = MLP(16, 32, 4).double()
    dense_twin(model, ref)
    out = model(x)
    tol = {torch.bfloat16: 5e-2, torch.float16: 1e-2}.get(dtype, 1e-5)
    assert torch.allclose(out.double(), ref(x.double()), rtol=tol, atol=tol)
    out.float().sum().backward()
    assert model.roast_memory.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_memory_view_is_rounded_once(dtype):
    """A bf16/fp16 memory's view is scale * sign * memory[index] computed in float and rounded to the memory's
    dtype once (rounding the scale to that dtype first put it up to 0.5% off)."""
    from roastfx.codegen.hashing import TileHash
    from roastfx.codegen.reference import materialize, materialize_rows

    mapping = TileHash(rows=37, cols=29, tile_rows=4, tile_cols=8, alignment=4, window_start=8, window_size=300,
                       a_row=12345, a_col=678, b=91011, c_row=1213, c_col=1415, d=1617)
    memory = torch.randn(320, generator=torch.Generator().manual_seed(3)).to(dtype)
    index, sign = mapping.full_index()
    want = (memory.float()[index] * sign.float() * 1.3).to(dtype)
    assert torch.equal(materialize(memory, mapping, 1.3), want)
    rows = torch.tensor([0, 36, 5, 5])
    assert torch.equal(materialize_rows(memory, mapping, 1.3, rows), want[rows])


@pytest.mark.parametrize("name", ["silu", "gelu_tanh"])
def test_activation_grad_in_bf16_is_computed_in_float32(name):
    """The activation derivative of roast_linear(act=...) in bf16: the float64 derivative rounded to bf16
    (to a bf16 step), as torch's own bf16 backward gives, across [-6, 6]."""
    from roastfx.codegen.ops import activation_grad

    pre = torch.linspace(-6, 6, 481, dtype=torch.float64)
    grad = torch.ones_like(pre)
    x = pre.clone().requires_grad_()
    act = torch.nn.functional.silu(x) if name == "silu" else torch.nn.functional.gelu(x, approximate="tanh")
    want = torch.autograd.grad(act.sum(), x)[0]
    got = activation_grad(grad.to(torch.bfloat16), pre.to(torch.bfloat16), name).double()
    # pre itself is rounded to bf16 (relative 2^-9): the derivative moves by at most |f''| * |pre| * 2^-9
    x16 = pre.to(torch.bfloat16).double().requires_grad_()
    act16 = torch.nn.functional.silu(x16) if name == "silu" else torch.nn.functional.gelu(x16, approximate="tanh")
    want16 = torch.autograd.grad(act16.sum(), x16)[0]
    assert (got - want16).abs().max() <= 2 ** -8 * want16.abs().max()
    assert (got - want).abs().max() < 0.006


@pytest.mark.parametrize("transposed", [True, False])
def test_grouped_view_holds_each_group_as_a_block_of_columns(transposed):
    """A grouped site's view is (K, groups * N) with B_g = W[g]^T (stored (groups, N, K), read by F.linear) or
    W[g] (stored (groups, K, N)) in columns [g*N, (g+1)*N); view_to_weight inverts it (a view of V, no copy)."""
    from roastfx.codegen.reference import GROUPED, view_to_weight, weight_to_view

    w = torch.randn(3, 5, 7, dtype=torch.float64)
    view = weight_to_view(w, transposed, GROUPED)
    n = 5 if transposed else 7
    assert view.shape == (7 if transposed else 5, 3 * n)
    for g in range(3):
        assert torch.equal(view[:, g * n:(g + 1) * n], w[g].t() if transposed else w[g])
    back = view_to_weight(view, tuple(w.shape), transposed, GROUPED)
    assert torch.equal(back, w) and back.data_ptr() == view.data_ptr()
    with pytest.raises(ValueError, match=r"3-D \(groups, \.\.\.\), got shape \(5, 7\)"):
        weight_to_view(w[0], transposed, GROUPED)
