"""torch.func transforms over a compressed model (eager): grad, vmap of grad (per-sample gradients),
jacrev, jvp and vmap over stacked memories (ensembles), against torch.autograd through the roast
custom ops, which the transforms cannot enter and so do not use."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

import roastfx
from roastfx.codegen.runs import VIEW_CACHE
from helpers import Mixed, mixed_inputs


class OddMLP(nn.Module):
    """Shapes that no tile divides."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(13, 37)
        self.fc2 = nn.Linear(37, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def compressed_mlp(grad_scaling="none", seed=0):
    torch.manual_seed(seed)
    model = OddMLP().double()
    return roastfx.compress(model, "4x", seed=seed, grad_scaling=grad_scaling)


def detached(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def mlp_loss(model):
    def loss(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    return loss


def autograd_grads(model, loss_of_model):
    model.zero_grad()
    loss_of_model().backward()
    return {k: v.grad.clone() for k, v in model.named_parameters()}


def assert_close_dicts(got, want, **tol):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("grad_scaling", ["none", "site"])
def test_grad_equals_autograd_through_the_custom_ops(grad_scaling):
    model = compressed_mlp(grad_scaling)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 13, generator=gen, dtype=torch.float64), torch.randint(0, 5, (9,), generator=gen)
    VIEW_CACHE.clear()
    got = grad(mlp_loss(model))(detached(model), x, y)  # fills the CPU view cache from inside the transform
    assert len(VIEW_CACHE._entries) == 2
    for entry in VIEW_CACHE._entries.values():  # with plain tensors, not the transform's wrappers
        assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in entry)
    want = autograd_grads(model, lambda: nn.functional.cross_entropy(model(x), y))
    assert_close_dicts(got, want, rtol=1e-12, atol=1e-14)
    assert want["roast_memory"].abs().sum() > 0


@pytest.mark.parametrize("grad_scaling", ["none", "site"])
def test_per_sample_gradients_by_vmap_equal_one_backward_per_sample(grad_scaling):
    """With "site" scaling each sample's view gradients are normalized by their own RMS, as one backward
    of that sample alone does."""
    model = compressed_mlp(grad_scaling, seed=1)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 13, generator=gen, dtype=torch.float64), torch.randint(0, 5, (6,), generator=gen)
    got = vmap(grad(mlp_loss(model)), in_dims=(None, 0, 0))(detached(model), x[:, None], y[:, None])
    for i in range(6):
        want = autograd_grads(model, lambda i=i: nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]))
        assert_close_dicts({k: v[i] for k, v in got.items()}, want, rtol=1e-12, atol=1e-14)


def test_jacrev_and_jvp_of_the_output_in_the_memory():
    model = compressed_mlp()
    x = torch.randn(4, 13, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = detached(model)

    def out(memory):
        return functional_call(model, {**params, "roast_memory": memory}, (x,))

    memory = params["roast_memory"]
    jac = jacrev(out)(memory)  # (4, 5, slots)
    # the same Jacobian row by row with torch.autograd through the custom ops
    model.zero_grad()
    y = model(x)
    rows = [torch.autograd.grad(y.reshape(-1)[i], model.roast_memory, retain_graph=True)[0] for i in range(y.numel())]
    torch.testing.assert_close(jac.reshape(y.numel(), -1), torch.stack(rows), rtol=1e-12, atol=1e-14)
    tangent = torch.randn(memory.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    value, derivative = jvp(out, (memory,), (tangent,))
    torch.testing.assert_close(value, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(derivative, jac @ tangent, rtol=1e-12, atol=1e-13)


def test_vmap_over_stacked_memories_runs_each_model():
    """An ensemble of copies of one compressed model (one plan), each with its own memory and biases,
    evaluated in one vmap."""
    models = [copy.deepcopy(compressed_mlp()) for _ in range(3)]
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for model in models[1:]:
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.std())
    params, buffers = stack_module_state(models)
    x = torch.randn(7, 13, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def run(p, b):
        return functional_call(models[0], (p, b), (x,))

    out = vmap(run)(params, buffers)
    assert not torch.equal(models[0].roast_memory, models[1].roast_memory)
    for i, model in enumerate(models):  # float64; vmap's batched GEMM may sum in another order than one GEMM
        torch.testing.assert_close(out[i], model(x), rtol=1e-12, atol=1e-12)


def test_grad_of_every_site_kind():
    """Embedding, EmbeddingBag, grouped conv, a functional weight and a tied head, in float64."""
    torch.manual_seed(0)
    model = Mixed().double()
    tokens, bags = mixed_inputs()
    roastfx.compress(model, "8x", example_inputs=(tokens, bags), seed=2)
    target = torch.randn(model(tokens, bags).shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def loss(params):
        return (functional_call(model, params, (tokens, bags)) - target).square().mean()

    want = autograd_grads(model, lambda: (model(tokens, bags) - target).square().mean())
    got = grad(loss)(detached(model))
    assert_close_dicts(got, want, rtol=1e-11, atol=1e-13)


def test_outside_transforms_reads_take_the_runs_path(monkeypatch):
    """The differentiable gather (an index per element) is for transforms only: an ordinary eager forward
    reads each weight by runs (codegen/runs.gather_view)."""
    from roastfx import state as module
    from roastfx.codegen import ops

    model = compressed_mlp()
    transform_reads, eager_reads = [], []
    differentiable, gather = module.gather_view_differentiable, ops.gather_view
    monkeypatch.setattr(module, "gather_view_differentiable",
                        lambda *a: transform_reads.append(1) or differentiable(*a))
    monkeypatch.setattr(ops, "gather_view", lambda *a: eager_reads.append(1) or gather(*a))
    model(torch.randn(2, 13, dtype=torch.float64))
    assert (len(eager_reads), len(transform_reads)) == (2, 0)
    grad(lambda p: functional_call(model, p, (torch.randn(2, 13, dtype=torch.float64),)).sum())(detached(model))
    assert (len(eager_reads), len(transform_reads)) == (2, 2)


def test_torch_compile_of_grad_with_the_roast_backend():
    """torch.compile(grad(f), backend="roast"): dynamo traces the transform and the differentiable gather
    (the CPU view cache must not keep the tracer's tensors)."""
    model = compressed_mlp()
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(5, 13, generator=gen, dtype=torch.float64), torch.randint(0, 5, (5,), generator=gen)
    want = grad(mlp_loss(model))(detached(model), x, y)
    torch._dynamo.reset()
    got = torch.compile(grad(mlp_loss(model)), backend="roast")(detached(model), x, y)
    assert_close_dicts(got, want, rtol=1e-12, atol=1e-14)
    for signs, starts in VIEW_CACHE._entries.values():
        assert signs.untyped_storage().data_ptr() and starts.untyped_storage().data_ptr()


def test_second_order_autograd_in_eager_matches_the_torch_func_hessian():
    """create_graph=True through eager weight reads (ops.EagerMaterialize's backward is made of torch ops):
    a Hessian-vector product in the memory equals torch.func.hessian's (the differentiable gather)."""
    from torch.func import hessian

    model = compressed_mlp()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 13, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad(model(x).square().sum(), model.roast_memory, create_graph=True)
    v = torch.randn(g.shape, generator=gen, dtype=torch.float64)
    (hv,) = torch.autograd.grad(g @ v, model.roast_memory)
    params = detached(model)
    H = hessian(lambda m: functional_call(model, {**params, "roast_memory": m}, (x,)).square().sum())(
        params["roast_memory"])
    assert H.abs().max() > 0
    torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)
