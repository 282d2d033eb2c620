"""roastfx.compress: sites found, budget kept, dense weights gone, projection and random init."""
import gc
import math

import pytest
import torch
from torch import nn

import roastfx
from roastfx.codegen.reference import weight_to_view
from helpers import MLP, Mixed, mixed_inputs


def reachable_tensors(model):
    """Every tensor the model references: parameters, buffers, state_dict, module __dict__ values."""
    out = list(model.parameters()) + list(model.buffers())
    out += [v for v in model.state_dict().values() if isinstance(v, torch.Tensor)]
    for m in model.modules():
        out.extend(v for v in vars(m).values() if isinstance(v, torch.Tensor))
    return out


@pytest.mark.parametrize("compression,expected", [("100x", 1), (0.05, 0.05), ("10x", 0.1)])
def test_trainable_count_matches_budget(compression, expected):
    model = MLP()
    dense = sum(p.numel() for p in (model.fc1.weight, model.fc2.weight, model.out.weight))
    small = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    roastfx.compress(model, compression)
    ratio = 0.01 if compression == "100x" else expected
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable - small == math.ceil(dense * ratio)
    assert model.roast_memory.numel() == roastfx.roast_state(model).plan.memory_size


def test_factor_and_ratio_give_exactly_the_ceiling_of_the_division():
    """"300x" of 2,100 weights is 7 slots (2100/300 = 7 exactly; 1/300 in floating point made it 8), "191x" of
    191,000 is 1,000, a ratio 0.01 of 300 is 3: the ceiling of the exact quotient, for every factor."""
    from roastfx.compress import parse_compression

    assert parse_compression("300x", 2100, 4) == 7
    assert parse_compression("191x", 191000, 4) == 1000
    assert parse_compression(0.01, 300, 4) == 3
    assert parse_compression("2.5x", 10, 4) == 4
    for n in (2100, 191000, 12345):
        assert all(parse_compression(f"{f}x", n, 4) == -(-n // f) for f in range(1, 2001))
        assert all(parse_compression(k / 1000, n, 4) == -(-n * k // 1000) for k in range(1, 1001))


def test_byte_budget():
    model = MLP()
    roastfx.compress(model, "2KB")
    assert model.roast_memory.numel() * 4 <= 2000 and model.roast_memory.numel() == 500


def test_no_dense_copy_remains():
    model = MLP()
    shapes = {tuple(model.fc1.weight.shape), tuple(model.fc2.weight.shape), tuple(model.out.weight.shape)}
    weak = [torch.utils.weak.WeakIdRef(m.weight) for m in (model.fc1, model.fc2, model.out)]
    roastfx.compress(model, "20x")
    gc.collect()
    assert all(ref() is None for ref in weak), "a dense weight tensor is still alive"
    assert not any(tuple(t.shape) in shapes for t in reachable_tensors(model))
    assert {n for n, _ in model.named_parameters()} == {"roast_memory", "fc1.bias", "fc2.bias", "out.bias"}


def test_every_site_kind_found_and_tied_weight_is_one_site():
    model = Mixed()
    roastfx.compress(model, "4x", example_inputs=mixed_inputs())
    plan = roastfx.roast_state(model).plan
    ops = {s.name: s.op for s in plan.sites}
    assert ops == {"emb.weight": "embedding", "bag.weight": "embedding_bag", "conv.weight": "conv",
                   "w": "matmul", "head.weight": "linear"}
    assert not any(isinstance(p, nn.Parameter) and p.dim() > 1 for p in model.parameters() if p is not model.roast_memory)


def test_without_example_inputs_functional_weights_stay_dense_and_it_says_so(caplog):
    model = Mixed()
    with caplog.at_level("INFO", logger="roastfx"):
        roastfx.compress(model, "4x")
    assert "w" not in [s.name for s in roastfx.roast_state(model).plan.sites]
    assert "module type only" in caplog.text
    assert isinstance(model.w, nn.Parameter)


def test_tied_weights_share_one_region():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97, n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 97, (2, 9))
    roastfx.compress(model, "10x", init="random")
    plan = roastfx.roast_state(model).plan
    wte = plan.site("transformer.wte.weight")
    assert "lm_head.weight" in wte.bindings
    assert not any(s.name == "lm_head.weight" for s in plan.sites)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert any(s.op == "matmul" for s in plan.sites)  # GPT-2's Conv1D
    logits = model(ids).logits
    assert logits.shape == (2, 9, 97) and torch.isfinite(logits).all()


def test_exclude_keeps_weights_dense():
    model = MLP()
    out_weight = model.out.weight
    roastfx.compress(model, "10x", exclude=["out"])
    assert model.out.weight is out_weight
    assert [s.name for s in roastfx.roast_state(model).plan.sites] == ["fc1.weight", "fc2.weight"]


def test_projection_is_sign_corrected_slot_mean():
    model = MLP(16, 24, 8)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    roastfx.compress(model, "3x")
    state = roastfx.roast_state(model)
    total = torch.zeros(state.plan.memory_size, dtype=torch.float64)
    count = torch.zeros_like(total)
    for s in state.plan.sites:
        index, sign = s.mapping.full_index()
        vals = weight_to_view(dense[s.name], s.transposed).double() * sign / s.scale
        for i, v in zip(index.reshape(-1).tolist(), vals.reshape(-1).tolist()):
            total[i] += v
            count[i] += 1
    expected = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    assert torch.allclose(state.memory.double(), expected, atol=1e-6)


def test_projection_is_least_squares_optimum():
    """The projected memory minimizes sum_sites ||W_recovered - W_dense||^2 / scale^2: zero gradient,
    and any perturbation is worse; it also beats a random memory at reproducing the dense outputs."""
    torch.manual_seed(0)
    model = MLP()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(32, 64)
    y = model(x).detach()
    roastfx.compress(model, 0.5)
    state = roastfx.roast_state(model)

    def objective():
        return sum(((getattr(model.get_submodule(s.name.rsplit(".", 1)[0]), "weight") - dense[s.name]) ** 2).sum()
                   / s.scale**2 for s in state.plan.sites)

    loss = objective()
    (grad,) = torch.autograd.grad(loss, state.memory)
    assert grad.abs().max() < 1e-3 * loss.detach()
    with torch.no_grad():
        state.memory.add_(torch.randn_like(state.memory) * 0.01)
    assert objective() > loss
    projected_err = (model(x) - y).norm()
    roastfx.compress(random_model := MLP(), 0.5, init="random")
    random_model.load_state_dict({k: v for k, v in dense.items() if k.endswith("bias")}
                                 | {"roast_memory": random_model.roast_memory.detach(),
                                    "_extra_state": random_model.state_dict()["_extra_state"]})
    assert projected_err < (random_model(x) - y).norm()


def test_random_init_keeps_initial_magnitude():
    model = nn.Linear(256, 512)
    std = float(model.weight.detach().std())
    roastfx.compress(model, "50x", init="random")
    assert abs(float(model.weight.std()) / std - 1) < 0.1


def test_bias_and_norm_left_alone():
    model = Mixed()
    norm_w = model.norm.weight
    roastfx.compress(model, "4x", example_inputs=mixed_inputs())
    assert model.norm.weight is norm_w and model.conv.bias is not None


def test_rnn_and_attention_weights_compress():
    lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
    roastfx.compress(lstm, "4x", init="random")
    assert len(roastfx.roast_state(lstm).plan.sites) == 4
    out, _ = lstm(torch.randn(2, 5, 8))
    out.sum().backward()
    assert lstm.roast_memory.grad is not None and lstm.roast_memory.grad.abs().sum() > 0

    mha = nn.MultiheadAttention(32, 4)
    roastfx.compress(mha, "8x", init="random")
    assert {s.op for s in roastfx.roast_state(mha).plan.sites} == {"attention", "linear"}
    q = torch.randn(5, 2, 32)
    assert mha(q, q, q)[0].shape == (5, 2, 32)


def test_compressed_weight_cannot_be_assigned():
    model = MLP()
    roastfx.compress(model, "10x")
    with pytest.raises(AttributeError, match="ROAST-compressed"):
        model.fc1.weight = nn.Parameter(torch.zeros(128, 64))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        if x.sum().item() > 0:  # data-dependent control flow: export cannot trace it
            return self.fc(x) @ self.w
        return self.fc(x)


def test_untraceable_model_is_run_on_its_example_inputs_instead(caplog):
    model = DataDependent()
    x = torch.ones(2, 8)
    with caplog.at_level("INFO", logger="roastfx"):
        roastfx.compress(model, 0.5, example_inputs=(x,))
    plan = roastfx.roast_state(model).plan
    # w is found by running the model (x takes the branch that reads it), as x @ w: not transposed
    assert [(s.name, s.op, s.transposed) for s in plan.sites] == [("w", "matmul", False), ("fc.weight", "linear", True)]
    assert "ran the model on example_inputs (torch.export could not trace it: GuardOnDataDependentSymNode" in caplog.text
    assert not isinstance(model._parameters.get("w"), nn.Parameter)
    assert model(x).shape == (2, 8)


def test_a_model_that_neither_traces_nor_runs_on_its_inputs_falls_back_to_module_types(caplog):
    model = DataDependent()
    with caplog.at_level("INFO", logger="roastfx"):
        roastfx.compress(model, 0.5, example_inputs=(torch.ones(2, 8), "an extra argument forward does not take"))
    assert [s.name for s in roastfx.roast_state(model).plan.sites] == ["fc.weight"]  # w stays dense, and we say so
    assert "could not trace the model (" in caplog.text and "nor run it on example_inputs (TypeError" in caplog.text
    assert isinstance(model.w, nn.Parameter)


def test_cost_model_planner_through_compress():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 64)
    roastfx.compress(model, "20x", planner="cost", target="h100", init="random")
    plan = roastfx.roast_state(model).plan
    assert plan.target == "h100" and plan.memory_size == model.roast_memory.numel()
    for s in plan.sites:
        m = s.mapping
        assert m.span <= m.window_size and m.window_start % m.alignment == 0
        assert (m.window_size - m.span) // m.alignment + 1 >= 64
    assert model(x).shape == (4, 10)
    with pytest.raises(ValueError, match="planner='best' is not valid; accepted: default, cost"):
        roastfx.compress(MLP(), "20x", planner="best")


@pytest.mark.parametrize("scheme", ["roast-local", "hashednet"])
@pytest.mark.parametrize("compression", ["1000x", 0.02, "200x"])
def test_local_schemes_split_small_memories(scheme, compression):
    """Every site gets its own non-empty window, the windows tile the memory exactly, even when tiny."""
    model = nn.Sequential(nn.Linear(300, 64), nn.Linear(64, 64), nn.Linear(64, 3), nn.Linear(3, 2))
    roastfx.compress(model, compression, scheme=scheme, init="random")
    plan = roastfx.roast_state(model).plan
    windows = sorted((s.mapping.window_start, s.mapping.window_size) for s in plan.sites)
    assert windows[0][0] == 0 and all(size >= 1 for _, size in windows)
    assert all(a[0] + a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert windows[-1][0] + windows[-1][1] == plan.memory_size
    assert model(torch.randn(2, 300)).shape == (2, 2)


class TransposedConvs(nn.Module):
    """Decoder-style layers: transposed convs (grouped, strided, output padding) and a 3-D conv."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2)
        self.up2 = nn.ConvTranspose2d(3, 5, (3, 2), stride=2, padding=1, output_padding=1)
        self.conv3 = nn.Conv3d(2, 3, 2)
        self.up3 = nn.ConvTranspose3d(3, 2, 2, stride=1, bias=False)

    def forward(self, x1, x2, x3):
        return self.up1(x1), self.up2(x2), self.up3(self.conv3(x3))


def test_transposed_and_3d_convs_compress_and_compute_with_the_views_weights():
    model = TransposedConvs()
    inputs = (torch.randn(2, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 2, 4, 4, 4))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    roastfx.compress(model, "4x", init="random", seed=2)
    plan = roastfx.roast_state(model).plan
    assert {s.name: s.op for s in plan.sites} == {"up1.weight": "conv_transpose", "up2.weight": "conv_transpose",
                                                 "conv3.weight": "conv", "up3.weight": "conv_transpose"}
    assert not any(p.dim() > 1 for p in model.parameters() if p is not model.roast_memory)
    # the reference: each weight rebuilt from the memory through the documented view, then torch's op
    from roastfx.codegen.reference import materialize, view_to_weight

    w = {s.name: view_to_weight(materialize(model.roast_memory.detach(), s.mapping, s.scale), shapes[s.name],
                                s.transposed) for s in plan.sites}
    import torch.nn.functional as F

    h3 = F.conv3d(inputs[2], w["conv3.weight"], model.conv3.bias)
    want = (F.conv_transpose1d(inputs[0], w["up1.weight"], model.up1.bias, stride=2, groups=2),
            F.conv_transpose2d(inputs[1], w["up2.weight"], model.up2.bias, stride=2, padding=1, output_padding=1),
            F.conv_transpose3d(h3, w["up3.weight"]))
    eager = model(*inputs)
    for g, e in zip(eager, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(sum(o.square().sum() for o in eager), model.roast_memory)[0]
    assert grad.abs().sum() > 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(*inputs)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(sum(o.square().sum() for o in compiled), model.roast_memory)[0]
    torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-6)


def test_traced_transposed_convs_are_the_same_sites():
    model = TransposedConvs()
    inputs = (torch.randn(2, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 2, 4, 4, 4))
    roastfx.compress(model, "4x", example_inputs=inputs)
    sites = {s.name: (s.op, s.transposed) for s in roastfx.roast_state(model).plan.sites}
    assert sites == {"up1.weight": ("conv_transpose", False), "up2.weight": ("conv_transpose", False),
                     "conv3.weight": ("conv", True), "up3.weight": ("conv_transpose", False)}


class LoopedExperts(nn.Module):
    """A mixture of experts as transformers writes one: stacked (experts, out, in) weights, a router, and a
    Python loop over the experts the router picked (data-dependent: torch.export cannot trace it)."""

    def __init__(self, dim=8, hidden=12, experts=3):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, dim) * 0.3)
        self.up = nn.Parameter(torch.randn(experts, hidden, dim) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, dim, hidden) * 0.3)

    def forward(self, x):
        choice = torch.nn.functional.linear(x, self.router).argmax(-1)
        out = torch.zeros_like(x)
        for e in choice.unique():
            rows = (choice == e).nonzero().squeeze(-1)
            h = torch.nn.functional.linear(x[rows], self.up[e]).relu()
            out.index_add_(0, rows, torch.nn.functional.linear(h, self.down[e]))
        return out


def test_stacked_expert_weights_are_found_by_running_the_model_and_read_whole(caplog):
    torch.manual_seed(0)
    model = LoopedExperts()
    x = torch.randn(10, 8)
    with caplog.at_level("INFO", logger="roastfx"):
        roastfx.compress(model, "2x", init="random", example_inputs=(x,))
    assert "ran the model on example_inputs (torch.export could not trace it" in caplog.text
    plan = roastfx.roast_state(model).plan
    # the router as F.linear's weight (transposed view); the experts indexed, then F.linear's: grouped sites whose
    # view is (in, experts * out), each expert read transposed
    assert [(s.name, s.shape, s.op, s.transposed) for s in plan.sites] == [
        ("router", (3, 8), "linear", True), ("up", (3, 12, 8), "grouped", True), ("down", (3, 8, 12), "grouped", True)]
    assert [(s.mapping.rows, s.mapping.cols) for s in plan.sites[1:]] == [(8, 36), (12, 24)]
    assert [n for n, _ in model.named_parameters()] == ["roast_memory"]
    # the compressed model computes the same function as a dense one holding its decompressed weights
    dense = LoopedExperts()
    with torch.no_grad():
        for name in ("router", "up", "down"):
            getattr(dense, name).copy_(getattr(model, name))
    # to float32 rounding: each expert's weight is a strided view of the memory's view (a column block read in
    # place), which the GEMM sums in another order than over the dense model's contiguous copy
    torch.testing.assert_close(model(x), dense(x), rtol=1e-6, atol=1e-6)
    model(x).square().sum().backward()
    assert model.roast_memory.grad is not None and model.roast_memory.grad.abs().sum() > 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="roast", options={"inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), dense(x), rtol=1e-5, atol=1e-6)


def test_running_the_model_to_find_its_sites_changes_no_buffer_nor_the_random_stream():
    class Normed(DataDependent):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(8)  # training mode: a forward would update its running statistics
            self.drop = nn.Dropout(0.5)  # draws from the random stream

        def forward(self, x):
            return super().forward(self.drop(self.norm(x)))

    model = Normed()
    x = torch.randn(6, 8) + 3
    before = {n: b.clone() for n, b in model.named_buffers()}
    torch.manual_seed(123)
    roastfx.compress(model, 0.5, example_inputs=(x,))
    assert "w" in {s.name for s in roastfx.roast_state(model).plan.sites}  # found by the run
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4))


def test_running_the_model_follows_transposing_properties():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 8))  # (out, in), read as x @ w.T
            self.v = nn.Parameter(torch.randn(8, 5))  # read as x @ v.mT.T: two transposes cancel

        def forward(self, x):
            if x.sum().item() > 0:  # export cannot trace this: the model is run
                return x @ self.w.T + x @ self.v.mT.T
            return x

    model = Branchy()
    x = torch.ones(3, 8)
    want = model(x)
    roastfx.compress(model, 1.0, init="project", example_inputs=(x,))
    plan = roastfx.roast_state(model).plan
    assert [(s.name, s.op, s.transposed) for s in plan.sites] == [("w", "matmul", True), ("v", "matmul", False)]
    assert model(x).shape == want.shape


def test_a_constant_grouped_weight_takes_the_default_init_scale_of_its_experts():
    """A stacked (experts, out, in) weight left at zero scales like PyTorch's default init of one expert's
    Linear, 1/sqrt(3 * in), not of a weight whose inputs are out * in."""
    model = LoopedExperts()
    with torch.no_grad():
        model.up.zero_()
    roastfx.compress(model, "2x", init="random", example_inputs=(torch.randn(10, 8),))
    scales = {s.name: s.scale for s in roastfx.roast_state(model).plan.sites}
    assert scales["up"] == pytest.approx(1 / math.sqrt(3 * 8))
    assert scales["down"] != pytest.approx(1 / math.sqrt(3 * 12))  # random: its own std
