"""The roast backend keeps eager's semantics where its rewrites could change them: in-place ops, autocast,
channels_last inputs, and the names (hence the hashes) of functional weights compressed inside the compiler."""
import copy

import pytest
import torch
from torch import nn

import roastfx


class InPlace(nn.Module):
    """A compressed linear whose output is changed in place before it is read (or not read at all)."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.lin = nn.Linear(20, 12)
        self.gate = nn.Parameter(torch.randn(12))

    def forward(self, x, buf):
        a = self.lin(x)
        buf.add_(1.0)  # a mutation of the caller's tensor whose result the graph never reads
        if self.variant == "add_then_mul":
            a.add_(1.0)
            return a * 2
        if self.variant == "mul_by_param_then_read":
            a.mul_(self.gate)
            return torch.relu(a) + a
        torch.relu_(a)
        return a.cumsum(-1)


@pytest.mark.parametrize("variant", ["add_then_mul", "mul_by_param_then_read", "relu_inplace_then_cumsum"])
def test_in_place_ops_are_kept(variant):
    """Unused in-place results (``a.add_(1)`` then a read of ``a``; ``buf.add_`` on an input) stay in the
    graph, and the epilogue pass never folds an in-place step that a later read would miss: outputs, the
    caller's buffer and every gradient equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(InPlace(variant), "2x", init="random")
    x = torch.randn(3, 20)
    buf_eager, buf_compiled = torch.zeros(3), torch.zeros(3)
    eager = model(x, buf_eager)
    leaves = [model.roast_memory, model.lin.bias] + ([model.gate] if variant == "mul_by_param_then_read" else [])
    want = torch.autograd.grad(eager.square().sum(), leaves)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(x, buf_compiled)
    got = torch.autograd.grad(out.square().sum(), leaves)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(buf_compiled, buf_eager) and torch.equal(buf_eager, torch.ones(3))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        h = self.up(torch.relu(self.conv(x)))
        return self.fc2(torch.tanh(self.fc1(h.mean((2, 3)))))


def test_autocast_runs_the_roast_ops_in_autocasts_dtype():
    """Under torch.autocast(bfloat16) a compressed linear/conv/transposed conv returns bfloat16 as eager does
    (the roast ops compute in their input's dtype: the pass casts x and the bias as autocast would), with
    eager's outputs and memory gradient to bfloat16's resolution."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(Net(), "3x", init="random")
    x = torch.randn(2, 3, 9, 10)
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        out = compiled(x)
    assert eager.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), eager.float(), rtol=2e-2, atol=2e-2)
    want = torch.autograd.grad(eager.float().square().sum(), model.roast_memory)[0]
    got = torch.autograd.grad(out.float().square().sum(), model.roast_memory)[0]
    assert (got - want).norm() <= 3e-2 * want.norm()


@pytest.mark.parametrize("build", [lambda: nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU()),
                                   lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.ReLU())])
def test_channels_last_inputs_through_inductor(build):
    """A channels_last input: the roast conv ops return the contiguous layout their fake functions promise
    (inductor checked it and failed before), with eager's values and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(build(), "2x", init="random")
    x = torch.randn(2, 4, 7, 9).to(memory_format=torch.channels_last).requires_grad_()
    eager = model(x)
    want = torch.autograd.grad(eager.square().sum(), [x, model.roast_memory])
    out = torch.compile(model, backend="roast")(x)
    got = torch.autograd.grad(out.square().sum(), [x, model.roast_memory])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 24) / 4)
        self.lin = nn.Linear(24, 6)

    def forward(me, x):  # noqa: N805 (not named self: dynamo's source names then start with "me")
        return me.lin(torch.relu(x @ me.w))


@pytest.mark.parametrize("wrapped", [False, True])
def test_in_compiler_compression_names_functional_weights_as_compress_does(wrapped, tmp_path):
    """A functional weight compressed inside the compiler gets its name in the model ('w'), whatever the
    forward's first argument is called or whether a wrapper function is compiled, so its hash and the
    outputs equal roastfx.compress(copy) with example_inputs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = Functional()
    x = torch.randn(5, 16)
    reference = roastfx.compress(copy.deepcopy(dense), "3x", seed=2, example_inputs=(x,))
    report = tmp_path / "plan.json"
    fn = (lambda inp: dense(inp)) if wrapped else dense
    compiled = torch.compile(fn, backend="roast", options={"compression": "3x", "seed": 2, "inner": "eager",
                                                           "report": str(report)})
    with torch.no_grad():
        out = compiled(x)
        want = reference(x)
    plan, ref_plan = roastfx.Plan.from_json(report.read_text()), roastfx.roast_state(reference).plan
    assert [s.name for s in plan.sites] == [s.name for s in ref_plan.sites] == ["w", "lin.weight"]
    assert [s.mapping for s in plan.sites] == [s.mapping for s in ref_plan.sites]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_conv_then_group_norm_trains_under_inductor_with_dynamic_shapes():
    """A compressed conv before a GroupNorm, trained through inductor with dynamic=True: the reference
    path's conv backward is one opaque op (inductor failed on aten.convolution_backward's stride constraints
    here: ValueRangeError), with eager's values and memory gradient."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(2, 6), nn.ReLU()), "2x", init="random")
    x = torch.randn(2, 3, 7, 8)
    eager = model(x)
    want = torch.autograd.grad(eager.square().sum(), model.roast_memory)[0]
    out = torch.compile(model, backend="roast", dynamic=True)(x)
    got = torch.autograd.grad(out.square().sum(), model.roast_memory)[0]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_inductor_cache_key_follows_the_kernel_path(monkeypatch):
    """What roastfx decides while tracing (ROASTFX_KERNELS, ROASTFX_CONV) is in the key of inductor's
    compiled-graph caches, through the uuid of the no-op post-grad pass the backend installs; a graph compiled
    on one path is not read back on the other."""
    from roastfx.backend import _cache_key_patch

    keys = {}
    for kernels in ("reference", "triton"):
        for conv in ("implicit", "im2col"):
            monkeypatch.setenv("ROASTFX_KERNELS", kernels)
            monkeypatch.setenv("ROASTFX_CONV", conv)
            keys[kernels, conv] = _cache_key_patch()["post_grad_custom_pre_pass"].uuid()
            assert _cache_key_patch()["post_grad_custom_pre_pass"].uuid() == keys[kernels, conv]
    assert len(set(keys.values())) == 4


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_conv_dense_grads_op_equals_autograd_and_passes_opcheck(need):
    """roastfx::conv_dense_grads (the reference path's conv backward) against torch.autograd of F.conv2d in
    float64, grouped, strided and dilated, with a channels_last input; and torch.library.opcheck."""
    import roastfx.codegen.conv  # noqa: F401 (registers the op)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=gen).to(memory_format=torch.channels_last)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, generator=gen)
    args = ([2, 1], [1, 0], [1, 2], 2)
    y = torch.nn.functional.conv2d(x.requires_grad_(), w.requires_grad_(), None, *args)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    want_x, want_w = torch.autograd.grad(y, [x, w], g)
    grad_x, grad_w = torch.ops.roastfx.conv_dense_grads(x.detach(), g, w.detach(), *args, *need)
    if need[0]:
        torch.testing.assert_close(grad_x, want_x, rtol=1e-12, atol=1e-12)
        assert grad_x.is_contiguous()
    else:
        assert grad_x.numel() == 0
    if need[1]:
        torch.testing.assert_close(grad_w, want_w, rtol=1e-12, atol=1e-12)
    else:
        assert grad_w.numel() == 0
    torch.library.opcheck(torch.ops.roastfx.conv_dense_grads.default, (x.detach(), g, w.detach(), *args, *need))
