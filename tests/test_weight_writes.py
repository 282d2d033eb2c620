"""In-place writes to a compressed weight (nn.init, .data.copy_, a row, out=, .data = t) go into the memory
as its least squares: each slot the mean of sign * w / scale over every element sharing it, the other sites'
elements at their values before the write (checked element by element with docs/mapping.md's formulas)."""
import copy
import io
import math
import pickle
import warnings
from collections import defaultdict

import pytest
import torch
from torch import nn

import roastfx
from roastfx.codegen.reference import weight_to_view
from helpers import MLP, Mixed, dense_weight_from_docs, index_sign_from_docs, mixed_inputs

# the first write warns that it was projected (tested once below); the other tests need not see it
pytestmark = pytest.mark.filterwarnings("ignore:roastfx:UserWarning")


def _weights_from_docs(model):
    state = roastfx.roast_state(model)
    return {s.name: dense_weight_from_docs(model.roast_memory, s) for s in state.plan.sites}


def _least_squares_from_docs(model, targets: dict, before: torch.Tensor) -> torch.Tensor:
    """The memory whose weights are closest to ``targets`` (dense, per site): per slot, the mean of
    sign * w / scale over every element landing on it; slots no element lands on keep ``before``."""
    state = roastfx.roast_state(model)
    total, count = defaultdict(float), defaultdict(int)
    for site in state.plan.sites:
        m = site.mapping.to_dict()
        view = weight_to_view(targets[site.name].double(), site.transposed, site.op)
        for k in range(m["rows"]):
            for n in range(m["cols"]):
                index, sign = index_sign_from_docs(m, k, n)
                total[index] += sign * float(view[k, n]) / site.scale
                count[index] += 1
    out = before.detach().double().clone()
    for index, c in count.items():
        out[index] = total[index] / c
    return out


def _mlp(seed=0):
    torch.manual_seed(seed)
    return roastfx.compress(MLP(20, 24, 5).double(), "4x")


def _init_trunc_normal(w):
    nn.init.trunc_normal_(w, std=0.3)  # uniform_, erfinv_, mul_, add_, clamp_: five writes, one result


def _row(w):
    with torch.no_grad():
        w[2:5] = torch.linspace(-1, 1, w.shape[1], dtype=w.dtype)


def _data_set(w):
    w.data = torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape) / w.numel()


def _out(w):
    with torch.no_grad():
        torch.add(w, 0.25, out=w)


def _relu_inplace(w):
    with torch.no_grad():
        nn.functional.relu(w, inplace=True)


WRITES = {
    "normal_": lambda w: nn.init.normal_(w, std=0.5),
    "zeros_": nn.init.zeros_,
    "kaiming_uniform_": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    "trunc_normal_": _init_trunc_normal,
    "orthogonal_": nn.init.orthogonal_,  # copy_ into w.view_as(q), then mul_
    "data.copy_": lambda w: w.data.copy_(torch.full(w.shape, 0.125, dtype=w.dtype)),
    "data.normal_": lambda w: w.data.normal_(),
    "detach.mul_": lambda w: w.detach().mul_(-2.0),
    "setitem rows": _row,
    "data = t": _data_set,
    "out=": _out,
    "relu inplace": _relu_inplace,
}


@pytest.mark.parametrize("name", list(WRITES))
def test_a_write_to_a_compressed_weight_is_its_least_squares_in_the_memory(name):
    """Each way of writing a weight in place leaves the memory at the least squares of the written weight and
    the other sites' weights from before; the written tensor keeps the written values; the model's forward
    computes with the memory's weights."""
    model = _mlp()
    before = model.roast_memory.detach().clone()
    old = _weights_from_docs(model)
    expected_weight = old["fc2.weight"].clone()
    torch.manual_seed(7)
    WRITES[name](expected_weight)  # the same write on a plain tensor holding the same values
    w = model.fc2.weight
    torch.manual_seed(7)
    WRITES[name](w)
    torch.testing.assert_close(w.detach(), expected_weight, rtol=0, atol=0)
    expected = _least_squares_from_docs(model, {**old, "fc2.weight": expected_weight}, before)
    torch.testing.assert_close(model.roast_memory.detach(), expected, rtol=1e-12, atol=1e-12)
    now = _weights_from_docs(model)
    x = torch.randn(3, 20, dtype=torch.float64)
    h = torch.relu(x @ now["fc1.weight"].t() + model.fc1.bias)
    h = torch.relu(h @ now["fc2.weight"].t() + model.fc2.bias)
    torch.testing.assert_close(model(x), h @ now["out.weight"].t() + model.out.bias)


def test_writes_to_every_site_kind_transposed_and_tied():
    """Embedding rows (transformers' padding-row init), an embedding bag, a grouped conv, a weight used
    functionally and a head tied to two uses: each write lands as the least squares of all sites."""
    torch.manual_seed(0)
    model = roastfx.compress(Mixed().double(), "3x", example_inputs=mixed_inputs())
    writes = [
        ("emb.weight", lambda m: m.emb.weight.data[0].zero_(), lambda w: w[0].zero_()),
        ("bag.weight", lambda m: nn.init.uniform_(m.bag.weight, -0.2, 0.2), lambda w: nn.init.uniform_(w, -0.2, 0.2)),
        ("conv.weight", lambda m: nn.init.xavier_normal_(m.conv.weight), nn.init.xavier_normal_),
        ("w", lambda m: m.w.detach().clamp_(-0.05, 0.05), lambda w: w.clamp_(-0.05, 0.05)),
        ("head.weight", lambda m: m.head.weight.data.mul_(3.0), lambda w: w.mul_(3.0)),
    ]
    names = {s.name for s in roastfx.roast_state(model).plan.sites}
    assert {n for n, _, _ in writes} <= names
    for site, write, on_plain in writes:
        before = model.roast_memory.detach().clone()
        old = _weights_from_docs(model)
        target = old[site].clone()
        torch.manual_seed(3)
        on_plain(target)
        torch.manual_seed(3)
        write(model)
        expected = _least_squares_from_docs(model, {**old, site: target}, before)
        torch.testing.assert_close(model.roast_memory.detach(), expected, rtol=1e-12, atol=1e-12, msg=site)


def test_a_grouped_experts_weight_takes_writes():
    """A stacked (experts, out, in) weight (a grouped site): writing one expert's matrix."""
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 12, 10, dtype=torch.float64) / 4)

        def forward(self, x, e: int = 1):
            return x @ self.w[e].t()

    torch.manual_seed(0)
    model = roastfx.compress(Experts(), "2x", example_inputs=(torch.randn(4, 10, dtype=torch.float64),))
    site = roastfx.roast_state(model).plan.sites[0]
    assert site.op == "grouped"
    before = model.roast_memory.detach().clone()
    old = _weights_from_docs(model)
    target = old["w"].clone()
    target[2] = 0.5
    model.w[2].detach().fill_(0.5)
    expected = _least_squares_from_docs(model, {"w": target}, before)
    torch.testing.assert_close(model.roast_memory.detach(), expected, rtol=1e-12, atol=1e-12)


def test_a_weight_read_before_the_memory_changed_is_read_again_before_a_relative_write():
    """``w.mul_(2)`` on a tensor read before an optimizer step doubles the weight the model holds after the
    step, not the stale one; two weights read together and written in turn both land."""
    model = _mlp()
    w = model.fc1.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 20, dtype=torch.float64)).square().sum().backward()
    opt.step()
    before = model.roast_memory.detach().clone()
    old = _weights_from_docs(model)
    with torch.no_grad():
        w.mul_(2.0)
    torch.testing.assert_close(w.detach(), 2.0 * old["fc1.weight"])
    expected = _least_squares_from_docs(model, {**old, "fc1.weight": 2.0 * old["fc1.weight"]}, before)
    torch.testing.assert_close(model.roast_memory.detach(), expected, rtol=1e-12, atol=1e-12)

    a, b = model.fc1.weight, model.out.weight
    before = model.roast_memory.detach().clone()
    old = _weights_from_docs(model)
    nn.init.constant_(a, 0.01)
    mid = _weights_from_docs(model)
    with torch.no_grad():
        b.add_(1.0)  # b was read before a's write changed the slots they share: read again first
    step1 = _least_squares_from_docs(model, {**old, "fc1.weight": torch.full_like(old["fc1.weight"], 0.01)}, before)
    step2 = _least_squares_from_docs(model, {**mid, "out.weight": mid["out.weight"] + 1.0}, step1)
    torch.testing.assert_close(model.roast_memory.detach(), step2, rtol=1e-12, atol=1e-12)


def test_reshaping_a_compressed_weight_in_place_is_refused_and_changes_nothing():
    model = _mlp()
    before = model.roast_memory.detach().clone()
    for reshape in (lambda w: w.t_(), lambda w: w.resize_(3), lambda w: w.data.unsqueeze_(0)):
        with pytest.raises(RuntimeError, match=r"shape \(24, 24\) is part of the compression plan"):
            with torch.no_grad():
                reshape(model.fc2.weight)
    assert torch.equal(model.roast_memory.detach(), before)
    assert model.fc2.weight.shape == (24, 24)


def test_first_write_warns_once_with_the_error_and_reads_do_not_write():
    """The first write warns (the projection is lossy, and says by how much); later ones do not; a forward,
    a backward and a copy made of a weight leave the memory alone."""
    model = _mlp()
    before = model.roast_memory.detach().clone()
    x = torch.randn(5, 20, dtype=torch.float64)
    model(x).sum().backward()
    w = model.fc1.weight
    clone = w.detach().clone()
    clone.zero_()
    (w * 2).sum()
    assert type(clone) is torch.Tensor
    assert torch.equal(model.roast_memory.detach(), before)
    projected = r"'fc1.weight' was projected onto the shared memory: .* relative error"
    with pytest.warns(UserWarning, match=projected) as seen:
        nn.init.zeros_(model.fc1.weight)
    assert [w.filename for w in seen if "roastfx" in str(w.message)] == [__file__]  # the user's line, not torch's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.init.zeros_(model.out.weight)


def test_a_weight_pickles_and_copies_as_a_plain_tensor_and_outlives_its_model():
    model = _mlp()
    w = model.fc1.weight.detach()
    values = w.clone()
    buffer = io.BytesIO()
    torch.save(w, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer), pickle.loads(pickle.dumps(w)), copy.deepcopy(w)):
        assert type(other) is torch.Tensor and torch.equal(other, values)
    del model
    import gc
    gc.collect()
    w.zero_()  # the model is gone: a plain tensor's write
    assert not w.any()


def test_load_state_dict_of_a_dense_model_projects_its_weights():
    """A dense state dict of the same architecture loads into the compressed model: its compressed weights
    become the memory's least squares (all sites at once), the rest loads as usual, no key is unexpected."""
    model = _mlp()
    torch.manual_seed(5)
    dense = MLP(20, 24, 5).double()
    before = model.roast_memory.detach().clone()
    with pytest.warns(UserWarning, match=r"projected the dense weights of 3 compressed site\(s\)") as seen:
        result = model.load_state_dict(dense.state_dict())
    assert [w.filename for w in seen if "roastfx" in str(w.message)] == [__file__]
    assert not result.missing_keys and not result.unexpected_keys
    targets = {n: p.detach() for n, p in dense.named_parameters() if n.endswith("weight")}
    torch.testing.assert_close(model.roast_memory.detach(), _least_squares_from_docs(model, targets, before),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(model.fc1.bias.detach(), dense.fc1.bias.detach())


def test_load_state_dict_with_one_dense_weight_and_nested_in_a_larger_model():
    """A roastfx state dict with one weight set densely (and the model inside a wrapper: prefixed keys)."""
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    model = _mlp(1)
    wrapper = Wrapper(model)
    before = model.roast_memory.detach().clone()
    old = _weights_from_docs(model)
    sd = wrapper.state_dict()
    new = torch.randn(24, 20, dtype=torch.float64)
    sd["inner.fc1.weight"] = new
    with pytest.warns(UserWarning, match="relative error"):
        wrapper.load_state_dict(sd)
    expected = _least_squares_from_docs(model, {**old, "fc1.weight": new}, before)
    torch.testing.assert_close(model.roast_memory.detach(), expected, rtol=1e-12, atol=1e-12)


def test_load_state_dict_refuses_bad_dense_weights_and_changes_nothing():
    from helpers import assert_unchanged, snapshot

    model = _mlp(2)
    good = MLP(20, 24, 5).double().state_dict()
    other_plan = roastfx.compress(MLP(20, 24, 5).double(), "4x", seed=9).state_dict()
    cases = [
        ({**good, "fc2.weight": torch.zeros(24, 23, dtype=torch.float64)},
         r"'fc2.weight' is a torch.float64 tensor of shape \(24, 23\); .* takes a floating-point tensor of "
         r"shape \(24, 24\)"),
        ({**good, "fc2.weight": torch.zeros(24, 24, dtype=torch.int64)}, r"'fc2.weight' is a torch.int64 tensor"),
        ({**other_plan, "fc1.weight": good["fc1.weight"]}, "a roastfx plan other than this model's"),
    ]
    for sd, message in cases:
        snap = snapshot(model)
        with pytest.raises(ValueError, match=message):
            model.load_state_dict(sd)
        assert_unchanged(model, snap)


def test_load_state_dict_refuses_different_values_for_one_tied_weight():
    from helpers import assert_unchanged, snapshot

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.head = nn.Linear(16, 30, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = roastfx.compress(Tied().double(), "2x")
    (site,) = roastfx.roast_state(model).plan.sites
    assert set(site.bindings) == {"emb.weight", "head.weight"}
    w = torch.randn(30, 16, dtype=torch.float64)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="are one compressed weight .* but hold different values"):
        model.load_state_dict({"emb.weight": w, "head.weight": w + 1})
    assert_unchanged(model, snap)
    with pytest.warns(UserWarning, match="1 compressed site"):
        model.load_state_dict({"emb.weight": w, "head.weight": w})


def test_inference_mode_forwards_and_writes():
    """Under torch.inference_mode the weights are plain inference tensors (no version counter to watch); a
    weight handed out before it still writes when changed inside it."""
    model = _mlp(3)
    x = torch.randn(4, 20, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        assert torch.equal(model(x), expected)
        assert model(x).is_inference() and type(model.fc1.weight) is torch.Tensor
    w = model.out.weight
    before = model.roast_memory.detach().clone()
    old = _weights_from_docs(model)
    with torch.inference_mode():
        w.fill_(0.5)
    target = _least_squares_from_docs(model, {**old, "out.weight": torch.full_like(old["out.weight"], 0.5)}, before)
    torch.testing.assert_close(model.roast_memory.detach(), target, rtol=1e-12, atol=1e-12)


def test_a_handed_out_weight_passes_through_a_compiled_function():
    """A weight given to a function compiled on its own (a regularizer, say) is a plain tensor there: the same
    values and the same memory gradient as eager."""
    torch._dynamo.reset()
    model = _mlp(4)
    x = torch.randn(3, 20, dtype=torch.float64)
    penalty = torch.compile(lambda w, x: torch.tanh(x @ w.t()).square().sum(), backend="eager")
    got = penalty(model.fc1.weight, x)
    got.backward()
    grad = model.roast_memory.grad.clone()
    model.roast_memory.grad = None
    want = torch.tanh(x @ model.fc1.weight.t()).square().sum()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, model.roast_memory.grad)
