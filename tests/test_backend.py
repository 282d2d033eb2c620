"""The `roast` torch.compile backend, registered through the torch_dynamo_backends entry point."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import roastfx
from helpers import MLP


def test_backend_registered_without_importing_roastfx():
    code = textwrap.dedent("""
        import sys, torch
        from torch._dynamo.backends.registry import list_backends, lookup_backend
        assert "roastfx" not in sys.modules
        fn = lookup_backend("roast")
        print(fn.__module__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("roastfx.backend")


def test_compiled_compressed_model_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    model = roastfx.compress(MLP(), "20x", init="random")
    x = torch.randn(6, 64)
    eager = model(x)
    eager.sum().backward()
    g_eager = model.roast_memory.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="roast", options={"target": "h100", "inner": "aot_eager"})
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(model.roast_memory.grad, g_eager, atol=1e-5)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_in_compiler_compression_equals_compress_and_leaves_weights(inner, tmp_path):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = MLP()
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    reference = roastfx.compress(copy.deepcopy(dense), 0.25, seed=4, target="h100")
    report = tmp_path / "plan.json"
    compiled = torch.compile(dense, backend="roast", options={"compression": 0.25, "seed": 4, "target": "h100",
                                                              "inner": inner, "report": str(report)})
    for batch in (5, 9):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            out = compiled(x)
        assert torch.allclose(out, reference(x), atol=1e-5)
        assert not torch.allclose(out, dense(x), atol=1e-3)  # it really runs the compressed weights
    plan = roastfx.Plan.from_json(report.read_text())
    ref_plan = roastfx.roast_state(reference).plan
    assert [s.mapping for s in plan.sites] == [s.mapping for s in ref_plan.sites]
    assert [s.name for s in plan.sites] == ["fc1.weight", "fc2.weight", "out.weight"]
    for n, p in dense.named_parameters():
        assert torch.equal(p, before[n]), n


def test_in_compiler_compression_follows_weight_norm(monkeypatch):
    """A dense model whose weights are under weight norm (torch's parametrization: the op reads
    _weight_norm(original1, original0)) is compressed inside the compiler too, its directions the sites as
    roastfx.compress plans them, every read fused; the result equals compress of a copy."""
    from torch.nn.utils.parametrizations import weight_norm

    from test_fuse_roast_ops import record_uses

    torch._dynamo.reset()
    torch.manual_seed(0)
    nn = torch.nn
    dense = nn.Sequential(weight_norm(nn.Conv1d(4, 6, 3)), nn.ReLU(),
                          weight_norm(nn.Conv1d(6, 6, 3, padding=1, groups=2), dim=2),  # per kernel tap
                          weight_norm(nn.Linear(7, 5), dim=None)).eval()
    reference = roastfx.compress(copy.deepcopy(dense), "2x", seed=1)
    uses = record_uses(monkeypatch)
    compiled = torch.compile(dense, backend="roast", options={"compression": "2x", "seed": 1, "inner": "eager"})
    x = torch.randn(3, 4, 9)
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out, dense(x), atol=1e-3)  # it really runs the compressed weights
    assert [u.fused for u in uses] == [True, True, True], uses
    assert [s.name for s in roastfx.roast_state(reference).plan.sites] == [
        "0.parametrizations.weight.original1", "2.parametrizations.weight.original1",
        "3.parametrizations.weight.original1"]


def test_in_compiler_compression_keeps_the_models_dtype(tmp_path):
    """A bfloat16 model compressed inside the compiler gets a bfloat16 memory, as roastfx.compress gives it:
    the same plan (memory dtype included) and outputs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = MLP().bfloat16()
    reference = roastfx.compress(copy.deepcopy(dense), 0.25, seed=4)
    assert reference.roast_memory.dtype == torch.bfloat16
    report = tmp_path / "plan.json"
    compiled = torch.compile(dense, backend="roast", options={"compression": 0.25, "seed": 4, "inner": "eager",
                                                              "report": str(report)})
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = compiled(x)
        want = reference(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    plan, ref_plan = roastfx.Plan.from_json(report.read_text()), roastfx.roast_state(reference).plan
    assert plan.memory_dtype == ref_plan.memory_dtype == "bfloat16"
    assert plan.memory_size == ref_plan.memory_size
    assert [s.mapping for s in plan.sites] == [s.mapping for s in ref_plan.sites]


def test_in_compiler_compression_refuses_training():
    torch._dynamo.reset()
    compiled = torch.compile(MLP(), backend="roast", options={"compression": "10x", "inner": "eager"})
    with pytest.raises(Exception, match=r"cannot compress weights that are being trained.*roastfx.compress"):
        compiled(torch.randn(2, 64))


def test_fallback_policy():
    torch._dynamo.reset()
    model = roastfx.compress(torch.nn.Sequential(torch.nn.Conv1d(2, 3, 4, padding="same"), torch.nn.Flatten()), "2x")
    strict = torch.compile(model, backend="roast", options={"fallback": "error", "inner": "eager"})
    with pytest.raises(Exception, match=r"fallback='error': these weight reads have no fused roast op.*"
                                        r"padding='same' with an even kernel"):
        strict(torch.randn(1, 2, 9))
    torch._dynamo.reset()
    fine = roastfx.compress(MLP(), "4x")
    out = torch.compile(fine, backend="roast", options={"fallback": "error", "inner": "eager"})(torch.randn(2, 64))
    assert out.shape == (2, 10)
    with pytest.raises(Exception, match=r"fallback='never' is not valid; accepted: materialize, error"):
        torch.compile(fine, backend="roast", options={"fallback": "never"})(torch.randn(2, 64))


@pytest.mark.parametrize("flow", ["compressed", "in-graph"])
def test_dynamic_shapes(flow):
    torch._dynamo.reset()
    torch.manual_seed(0)
    if flow == "compressed":
        model = roastfx.compress(MLP(), "10x", init="random")
        reference, options = model, {"inner": "aot_eager"}
    else:
        model = MLP()
        reference = roastfx.compress(copy.deepcopy(model), "10x")
        options = {"inner": "aot_eager", "compression": "10x"}
    compiled = torch.compile(model, backend="roast", dynamic=True, options=options)
    with torch.no_grad():
        for batch in (2, 3, 17):
            x = torch.randn(batch, 64)
            assert torch.allclose(compiled(x), reference(x), atol=1e-5)


def test_graph_breaks_share_one_memory():
    class Broken(MLP):
        def forward(self, x):
            h = torch.relu(self.fc1(x))
            torch._dynamo.graph_break()
            return self.out(torch.relu(self.fc2(h)))

    torch._dynamo.reset()
    model = roastfx.compress(Broken(), "10x", init="random")
    x = torch.randn(4, 64)
    eager = model(x)
    eager.sum().backward()
    grad = model.roast_memory.grad.clone()
    model.zero_grad()
    graphs = []

    def count(gm, example_inputs, **kw):
        graphs.append(gm)
        from roastfx.backend import roast_backend

        return roast_backend(gm, example_inputs, options={"inner": "aot_eager"})

    out = torch.compile(model, backend=count)(x)
    out.sum().backward()
    assert len(graphs) == 2
    assert torch.allclose(out, eager, atol=1e-5) and torch.allclose(model.roast_memory.grad, grad, atol=1e-5)


class Broken(MLP):
    def forward(self, x):
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.out(torch.relu(self.fc2(h)))


def test_in_graph_compression_gives_graph_breaks_one_plan_and_one_memory(monkeypatch):
    import roastfx.backend as backend

    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = Broken()
    reference = roastfx.compress(copy.deepcopy(dense), "6x", seed=2)
    memories = []
    original = backend._compress_in_graph

    def recording(*args):
        gm, memory = original(*args)
        memories.append(memory)
        return gm, memory

    monkeypatch.setattr(backend, "_compress_in_graph", recording)
    compiled = torch.compile(dense, backend="roast", dynamic=True,
                             options={"compression": "6x", "seed": 2, "inner": "aot_eager"})
    with torch.no_grad():
        for batch in (4, 7, 3):
            x = torch.randn(batch, 64)
            assert torch.allclose(compiled(x), reference(x), atol=1e-5)
    assert len(memories) >= 2  # the two graphs around the break (and any recompile)
    assert len({m.data_ptr() for m in memories}) == 1
    (shared,) = backend._SHARED[dense]  # one plan for the model, as roastfx.compress makes it
    ref_plan = roastfx.roast_state(reference).plan
    assert [(s.name, s.mapping, s.scale) for s in shared.plan.sites] == [
        (s.name, s.mapping, s.scale) for s in ref_plan.sites]
    assert torch.allclose(shared.memory, reference.roast_memory.detach())


def test_mode_max_autotune_turns_on_kernel_autotuning():
    from roastfx.backend import roast_backend
    from roastfx.codegen import configs

    def compile_with(mode):
        torch._dynamo.reset()
        model = roastfx.compress(MLP(8, 8, 2), "2x", init="random")
        backend = lambda gm, inputs: roast_backend(gm, inputs, mode=mode, options={"inner": "eager"})  # noqa: E731
        return torch.compile(model, backend=backend)(torch.randn(2, 8))

    before = configs.autotune_enabled()
    try:
        configs.set_autotune(False)
        for mode in (None, "default", "reduce-overhead"):
            compile_with(mode)
            assert not configs.autotune_enabled(), mode
        compile_with("max-autotune")
        assert configs.autotune_enabled()
    finally:
        configs.set_autotune(before)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"mode='fastest' is not valid for the roast backend; accepted: default, "
                                        r"reduce-overhead, max-autotune, max-autotune-no-cudagraphs"):
        torch.compile(MLP(8, 8, 2), backend="roast", mode="fastest")(torch.randn(2, 8))


def test_inductor_on_cpu_compiles_fused_roast_ops():
    """The default inner compiler: one compile of a compressed conv + MLP, forward and backward."""

    class ConvMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
            self.fc1 = torch.nn.Linear(6 * 4 * 4, 32)
            self.fc2 = torch.nn.Linear(32, 5)

        def forward(self, x):
            h = torch.relu(self.conv(x)).flatten(1)
            return self.fc2(torch.tanh(self.fc1(h)))

    torch._dynamo.reset()
    model = roastfx.compress(ConvMLP(), "4x", init="random", seed=1)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    eager = model(x)
    gx, gm = torch.autograd.grad(eager.square().sum(), (x, model.roast_memory))
    out = torch.compile(model, backend="roast")(x)
    cx, cm = torch.autograd.grad(out.square().sum(), (x, model.roast_memory))
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(cx, gx, atol=1e-5) and torch.allclose(cm, gm, atol=1e-5, rtol=1e-4)


def test_in_graph_compression_excludes_like_compress():
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = MLP()
    reference = roastfx.compress(copy.deepcopy(dense), "4x", exclude=["out"])
    options = {"compression": "4x", "exclude": ["out"], "inner": "eager"}
    compiled = torch.compile(dense, backend="roast", options=options)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(x), reference(x), atol=1e-5)
    torch._dynamo.reset()
    bad = torch.compile(MLP(), backend="roast", options={"compression": "4x", "exclude": ["nope*"], "inner": "eager"})
    with pytest.raises(Exception, match=r"exclude patterns \['nope\*'\] match no compressible weight"):
        with torch.no_grad():
            bad(x)


def test_in_compiler_compression_finds_stacked_experts_read_through_tensor_methods(tmp_path):
    """Weights that reach their GEMM through a tensor method in dynamo's graph (``self.up.transpose(-2, -1)``, a
    call_method node) are found as export finds them: a mixture of experts' stacked weights become grouped
    sites, planned as compress(example_inputs=...) plans them, and the compiled model computes what that one
    does."""
    from test_fuse_roast_ops import GroupedExperts, _transformers_grouped_mm

    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = GroupedExperts(grouped_mm=_transformers_grouped_mm)
    x = torch.randn(29, 16)
    reference = roastfx.compress(copy.deepcopy(dense), 0.5, seed=4, target="h100", example_inputs=(x,))
    report = tmp_path / "plan.json"
    compiled = torch.compile(dense, backend="roast", options={"compression": 0.5, "seed": 4, "target": "h100",
                                                              "inner": "aot_eager", "report": str(report)})
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-5)
    plan = roastfx.Plan.from_json(report.read_text())
    mine = {s.name: (s.op, s.transposed, s.mapping) for s in plan.sites}
    assert mine == {s.name: (s.op, s.transposed, s.mapping) for s in roastfx.roast_state(reference).plan.sites}
    assert mine["up"][:2] == ("grouped", True) and mine["down"][:2] == ("grouped", False)


def test_in_compiler_compression_fuses_rnn_cells_and_bilinear_layers(monkeypatch):
    """A dense model's nn.LSTMCell/GRUCell/RNNCell run their aten cell ops in dynamo's graph: under in-compiler
    compression each becomes two roast_linear and the gates; nn.Bilinear a roast_linear over the outer product.
    The compiled model computes what roastfx.compress of a copy computes."""
    from test_fuse_roast_ops import Bilinears, record_uses
    from test_rnn import CellDecoder

    for dense, args in ((CellDecoder().double(), (torch.randn(4, 6, dtype=torch.float64),)),
                        (Bilinears().double(), (torch.randn(2, 5, 10, dtype=torch.float64),
                                                torch.randn(2, 5, 6, dtype=torch.float64)))):
        torch._dynamo.reset()
        reference = roastfx.compress(copy.deepcopy(dense), "2x", seed=3, example_inputs=args)
        uses = record_uses(monkeypatch)
        with torch.no_grad():
            out = torch.compile(dense, backend="roast", options={"compression": "2x", "seed": 3,
                                                                 "inner": "aot_eager"})(*args)
            torch.testing.assert_close(out, reference(*args), atol=1e-12, rtol=1e-12)
        assert uses and all(u.fused for u in uses), [u.why for u in uses if not u.fused]
        assert len(uses) == (18 if isinstance(dense, CellDecoder) else 2)
