"""A compressed model still behaves as the torch module it was: pickling, a module registered under two
names, dtypes (the model's own, conversions after compressing, a memory in another dtype), sparse
embeddings, frozen weights, submodules' extra state in checkpoints, reset_parameters."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import roastfx
from helpers import MLP, dense_weight_from_docs


def _site_weights_from_docs(model):
    state = roastfx.roast_state(model)
    return {s.name: dense_weight_from_docs(model.roast_memory, s) for s in state.plan.sites}


def test_whole_model_pickles_and_torch_saves():
    """torch.save / pickle of the whole compressed model (not only its state_dict) give back a model with the
    same memory, plan and outputs, still compressed, independent of the original."""
    torch.manual_seed(0)
    model = roastfx.compress(MLP(20, 24, 5), "4x", init="random")
    x = torch.randn(3, 20)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    again = pickle.loads(pickle.dumps(model))
    for other in (loaded, again):
        assert type(other) is type(model) and type(other.fc1) is type(model.fc1)
        assert "weight" not in other.fc1._parameters
        assert roastfx.roast_state(other).plan == roastfx.roast_state(model).plan
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
        with torch.no_grad():
            other.roast_memory.add_(1.0)
        assert not torch.equal(other(x), model(x))  # its own memory
    copied = copy.deepcopy(model)
    torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)


def test_module_registered_under_two_names():
    """One nn.Linear at two places of a Sequential (and one GRU twice) is one site; eval()/train() and
    attribute assignment work, and the outputs equal the weights rebuilt from docs/mapping.md."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = roastfx.compress(nn.Sequential(lin, nn.ReLU(), lin), "2x", init="random")
    assert [c.__name__ for c in type(lin).__mro__[:3]] == ["RoastLinear", "Linear", "Module"]
    model.eval()
    model.train()
    lin.some_attribute = 3
    w = _site_weights_from_docs(model)["0.weight"]
    x = torch.randn(4, 8, dtype=torch.float64)
    h = torch.relu(x @ w.t() + lin.bias.double())
    torch.testing.assert_close(model(x.float()).double(), h @ w.t() + lin.bias.double(), rtol=1e-5, atol=1e-6)
    gru = nn.GRU(6, 6)
    rnn = roastfx.compress(nn.Sequential(gru, gru), "2x")
    out, h_n = rnn[0](torch.randn(3, 2, 6))
    assert out.shape == (3, 2, 6) and h_n.shape == (1, 2, 6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_dtype_is_kept(dtype):
    """A float64 or bfloat16 model compresses into a memory of its dtype, and its weights read in it."""
    torch.manual_seed(0)
    model = roastfx.compress(nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype), "2x")
    assert model.roast_memory.dtype == dtype and model[0].weight.dtype == dtype
    plan = roastfx.roast_state(model).plan
    assert plan.memory_dtype == str(dtype).removeprefix("torch.")
    x = torch.randn(5, 16, dtype=dtype)
    w = _site_weights_from_docs(model)
    want = torch.tanh(x.double() @ w["0.weight"].t() + model[0].bias.double()) @ w["2.weight"].t() \
        + model[2].bias.double()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(model(x).double(), want, **tol)


def test_memory_in_another_dtype_reads_weights_in_the_models():
    """memory_dtype='float32' under a bfloat16 model: fp32 master memory, bf16 weights; the memory's gradient
    is the bf16 weights' gradient carried back to fp32 (cast, then the per-slot sum)."""
    torch.manual_seed(0)
    model = roastfx.compress(nn.Linear(24, 12).bfloat16(), "3x", memory_dtype="float32", init="random")
    assert model.roast_memory.dtype == torch.float32 and model.weight.dtype == torch.bfloat16
    x = torch.randn(7, 24, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    memory = model.roast_memory.detach().clone().requires_grad_()
    site = roastfx.roast_state(model).plan.sites[0]
    from roastfx.codegen.reference import materialize, view_to_weight

    weight = view_to_weight(materialize(memory, site.mapping, site.scale), site.shape, site.transposed)
    torch.nn.functional.linear(x, weight.to(torch.bfloat16), model.bias).float().square().sum().backward()
    torch.testing.assert_close(model.roast_memory.grad, memory.grad, rtol=0, atol=0)


def test_conversions_after_compressing_follow_the_model():
    """model.double() / .half() after compress convert the memory and the weights' dtype together, and a
    checkpoint of the converted model keeps its dtype (nothing truncated on load)."""
    torch.manual_seed(0)
    model = roastfx.compress(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)), "2x").double()
    assert model[0].weight.dtype == torch.float64 and model.roast_memory.dtype == torch.float64
    with torch.no_grad():
        model.roast_memory.copy_(torch.randn(model.roast_memory.shape, dtype=torch.float64))
    x = torch.randn(4, 16, dtype=torch.float64)
    assert model(x).dtype == torch.float64
    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    model.half()
    assert model[2].weight.dtype == torch.float16 and model(x.half()).dtype == torch.float16
    model.double()
    model.load_state_dict(state)
    torch.testing.assert_close(model(x), model(x))


def test_checkpoint_of_a_converted_model_keeps_its_memory_dtype(tmp_path):
    model = roastfx.compress(nn.Linear(16, 8), "2x").double()
    with torch.no_grad():
        model.roast_memory.copy_(torch.randn(model.roast_memory.shape, dtype=torch.float64))
    roastfx.save(model, tmp_path / "m.safetensors")
    assert roastfx.read_plan(tmp_path / "m.safetensors").memory_dtype == "float64"
    loaded = roastfx.load(lambda: nn.Linear(16, 8).double(), tmp_path / "m.safetensors")
    assert loaded.roast_memory.dtype == torch.float64
    assert torch.equal(loaded.roast_memory, model.roast_memory)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("build,inputs", [
    (lambda sparse: nn.Embedding(20, 8, sparse=sparse), lambda: (torch.tensor([[1, 2, 3], [3, 3, 19]]),)),
    (lambda sparse: nn.EmbeddingBag(20, 8, sparse=sparse, mode="sum"),
     lambda: (torch.tensor([1, 2, 3, 3, 3, 19]), torch.tensor([0, 2]))),
])
def test_sparse_embeddings_give_the_memory_a_dense_gradient(build, inputs):
    """sparse=True: the weight's sparse gradient reaches the shared memory as the same dense gradient that
    sparse=False gives (up to the order of the sums: sparse=False reads and scatters the looked-up rows only,
    sparse=True the whole weight)."""
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = roastfx.compress(build(sparse), "2x", init="random")
        (model(*inputs()) ** 2).sum().backward()
        assert model.roast_memory.grad.layout == torch.strided
        grads.append(model.roast_memory.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_all_frozen_weights_give_a_frozen_memory():
    model = MLP(12, 16, 4).requires_grad_(False)
    roastfx.compress(model, "4x")
    assert not model.roast_memory.requires_grad
    assert not any(p.requires_grad for p in model.parameters())


def test_reset_parameters_of_a_compressed_module_is_an_error():
    """reset_parameters cannot re-initialize a weight that is computed from the shared memory; it says so
    rather than resetting the bias alone."""
    model = roastfx.compress(MLP(12, 16, 4), "4x")
    bias = model.fc1.bias.detach().clone()
    with pytest.raises(RuntimeError, match=r"Linear.reset_parameters: \['weight'\] are ROAST-compressed .*roast_memory"):
        model.fc1.reset_parameters()
    assert torch.equal(model.fc1.bias, bias)


class Tagged(nn.Module):
    """A submodule with (JSON-able) extra state."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.tag = {"version": 1, "labels": ["a", "b"]}

    def get_extra_state(self):
        return self.tag

    def set_extra_state(self, state):
        self.tag = state

    def forward(self, x):
        return self.fc(x)


def test_checkpoint_keeps_submodules_extra_state(tmp_path):
    model = roastfx.compress(nn.Sequential(Tagged(), nn.Linear(8, 4)), "2x")
    model[0].tag = {"version": 2, "labels": ["c"]}
    roastfx.save(model, tmp_path / "m.safetensors")
    loaded = roastfx.load(lambda: nn.Sequential(Tagged(), nn.Linear(8, 4)), tmp_path / "m.safetensors")
    assert loaded[0].tag == {"version": 2, "labels": ["c"]}
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    model[0].tag = object()
    with pytest.raises(ValueError, match=r"cannot save '0._extra_state': roastfx checkpoints store extra state "
                                         r"that JSON can hold"):
        roastfx.save(model, tmp_path / "bad.safetensors")
    model[0].tag = (1, 2)
    with pytest.raises(ValueError, match=r"'0._extra_state': its value \(1, 2\) does not survive JSON unchanged"):
        roastfx.save(model, tmp_path / "bad.safetensors")


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


class HeadFirstTiedLM(nn.Module):
    """A tied LM whose head comes before its embedding in named_modules (XLM-RoBERTa's order)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=False)
        self.body = nn.Linear(16, 16)
        self.emb = nn.Embedding(40, 16)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


def test_tied_weight_is_laid_out_for_its_lookup_whichever_module_comes_first(monkeypatch):
    """A weight tied between an embedding and a linear head is laid out as the table (the lookup reads whole
    rows; the head reads the view transposed), also when the head comes first, so that both reads fuse and an
    eager lookup reads only its rows; compiled equals eager."""
    from test_fuse_roast_ops import record_uses

    for cls in (TiedLM, HeadFirstTiedLM):
        torch.manual_seed(0)
        model = roastfx.compress(cls(), "2x", init="random")
        tied = [s for s in roastfx.roast_state(model).plan.sites if "emb.weight" in s.bindings]
        assert [(s.op, s.transposed, s.other_ops) for s in tied] == [("embedding", False, ("linear",))], cls
        ids = torch.tensor([[1, 5, 39], [0, 7, 7]])
        state = roastfx.roast_state(model)
        rows = state.rows
        looked_up = []
        def recording(self, *args, **kwargs):
            looked_up.append(rows(*args, **kwargs))
            return looked_up[-1]

        monkeypatch.setattr(type(state), "rows", recording)
        eager = model(ids)
        assert looked_up and all(r is not None for r in looked_up), "the eager lookup read the whole table"
        monkeypatch.undo()
        eager.square().mean().backward()
        grad = model.roast_memory.grad.clone()
        model.zero_grad()
        torch._dynamo.reset()
        uses = record_uses(monkeypatch)
        compiled = torch.compile(model, backend="roast")(ids)
        compiled.square().mean().backward()
        assert [u.fused for u in uses] == [True, True, True], uses
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(model.roast_memory.grad, grad)


def test_tying_again_is_a_no_op_and_other_assignments_are_errors():
    """head.weight = emb.weight on a compressed tied model (what transformers' tie_weights does) changes
    nothing; assigning another site's weight or a fresh tensor is an error; get_parameter names a compressed
    weight (the tensor computed from the memory)."""
    model = roastfx.compress(TiedLM(), "2x")
    ids = torch.tensor([[1, 5, 39]])
    before = model(ids)
    model.head.weight = model.emb.weight
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    with pytest.raises(AttributeError, match=r"head.weight|RoastLinear.weight is ROAST-compressed"):
        model.head.weight = model.body.weight  # a Linear's (16, 16) weight: another site
    with pytest.raises(AttributeError, match="is ROAST-compressed"):
        model.head.weight = nn.Parameter(torch.zeros(40, 16))
    torch.testing.assert_close(model.get_parameter("head.weight"), model.emb.weight, rtol=0, atol=0)
    with pytest.raises(AttributeError):
        model.get_parameter("head.nothing")


def test_freezing_part_of_a_compressed_model_is_an_error():
    """requires_grad_ on a submodule whose compressed weights share the memory with other sites would skip
    them silently (they are not its parameters): it raises and changes nothing. The whole model, or a part
    without compressed weights, behave as in torch."""
    model = roastfx.compress(nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), nn.Linear(8, 3)), "2x")
    with pytest.raises(ValueError, match=r"requires_grad_\(False\) on a part of a ROAST-compressed model: "
                                         r"Sequential.0 holds compressed weights \(\['0.0.weight'\]\)"):
        model[0].requires_grad_(False)
    assert all(p.requires_grad for p in model.parameters())
    model[0][1].requires_grad_(False)  # a LayerNorm: no compressed weight
    assert not model[0][1].weight.requires_grad and model.roast_memory.requires_grad
    model.requires_grad_(False)
    assert not model.roast_memory.requires_grad
    with pytest.raises(ValueError, match=r"cannot be unfrozen alone"):
        model[1].requires_grad_(True)
    assert not model[1].bias.requires_grad
    dense = nn.Linear(4, 4).requires_grad_(False)  # models roastfx never saw: torch's behaviour
    assert not dense.weight.requires_grad


def test_flagging_a_compressed_weight_is_an_error():
    """requires_grad_ / requires_grad = on a compressed weight itself would flag a tensor computed from the
    memory (torch says only "leaf variables"): a clear error, nothing changed. Setting the flag it already has,
    and flagging a detached copy, behave as in torch."""
    model = roastfx.compress(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), "2x")
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"requires_grad=False on the compressed weight '0.weight': it has no "
                                         r"requires_grad of its own.*exclude=\['0.weight'\]"):
        model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False on the compressed weight '2.weight'"):
        model[2].weight.requires_grad = False
    model[0].weight.requires_grad_(True)  # already so
    model(x).sum().backward()
    assert model.roast_memory.grad is not None and model.roast_memory.grad.abs().sum() > 0
    leaf = model[0].weight.detach().requires_grad_()
    assert leaf.requires_grad and leaf.is_leaf
    model.roast_memory.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=True on the compressed weight '0.weight'"):
        model[0].weight.requires_grad_()
    assert not model[0].weight.requires_grad


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=60, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()  # no dropout: outputs compare


def test_transformers_tie_resize_and_save_pretrained(tmp_path):
    """On a compressed GPT-2 (tied lm_head): tie_weights works (the plan holds the tie), resize_token_embeddings
    and save_pretrained raise clear errors and change nothing, and roastfx.save / load round-trips."""
    model = roastfx.compress(_tiny_gpt2(), "4x")
    ids = torch.tensor([[3, 17, 59, 4]])
    before = model(ids).logits
    model.tie_weights()
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"resize_token_embeddings: the token embeddings are ROAST-compressed "
                                           r"\(sites \['transformer.wte.weight'\]\).*Nothing was changed"):
        model.resize_token_embeddings(70)
    assert model.transformer.wte.num_embeddings == 60 and model.config.vocab_size == 60
    with pytest.raises(RuntimeError, match=r"save_pretrained: this model is ROAST-compressed.*roastfx.save"):
        model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    roastfx.save(model, tmp_path / "m.safetensors")
    loaded = roastfx.load(_tiny_gpt2, tmp_path / "m.safetensors")
    torch.testing.assert_close(loaded(ids).logits, before, rtol=0, atol=0)


def test_transformers_dtype_is_the_weights_not_the_fp32_master_memory():
    """model.dtype (transformers: the first floating parameter's, which is the memory) reports the dtype the
    weights are read in: bf16 over a float32 master memory, and what .float() / .to() make of it."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=16)
    model = roastfx.compress(BertModel(config).bfloat16(), "4x", memory_dtype="float32", init="random")
    assert model.roast_memory.dtype == torch.float32
    assert model.dtype == torch.bfloat16
    assert model(torch.randint(0, 64, (2, 5))).last_hidden_state.dtype == torch.bfloat16
    model.float()
    assert model.dtype == torch.float32
    fp32 = roastfx.compress(BertModel(config), "4x", init="random")
    assert fp32.dtype == torch.float32 and fp32.to(torch.float16).dtype == torch.float16


def _parametrized(kind: str):
    from torch.nn.utils import parametrizations, prune

    layer = nn.Linear(12, 18)
    if kind == "weight_norm":
        layer = parametrizations.weight_norm(layer)
    elif kind == "spectral_norm":
        layer = parametrizations.spectral_norm(layer)
    else:
        prune.l1_unstructured(layer, "weight", 0.4)
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(18, 3))


@pytest.mark.parametrize("kind, source", [("weight_norm", "0.parametrizations.weight.original1"),
                                          ("spectral_norm", "0.parametrizations.weight.original"),
                                          ("prune", "0.weight_orig")])
def test_parametrized_and_pruned_weights_compress_their_source_parameter(kind, source, monkeypatch):
    """A weight computed from a parameter of its shape (torch.nn.utils.parametrize, weight_norm's direction,
    prune's weight_orig) compresses that parameter; the parametrization runs on it. Outputs and the memory's
    gradient equal a dense copy holding the weights read from the memory (docs/mapping.md's formulas),
    eagerly and compiled."""
    def build():  # a pruned model cannot be deep-copied (its weight is not a leaf)
        torch.manual_seed(0)
        return _parametrized(kind).double().eval()

    model = roastfx.compress(build(), "2x")
    state = roastfx.roast_state(model)
    assert [s.name for s in state.plan.sites] == [source, "2.weight"]
    weights = _site_weights_from_docs(model)
    reference = build()
    with torch.no_grad():
        for name, w in weights.items():
            reference.get_parameter(name).copy_(w)
    x = torch.randn(5, 12, dtype=torch.float64)
    out = model(x)
    torch.testing.assert_close(out, reference(x))
    out.square().sum().backward()
    reference(x).square().sum().backward()
    # the memory's gradient: each weight element's gradient, signed and scaled, summed into its slot
    from helpers import index_sign_from_docs
    expected = torch.zeros_like(model.roast_memory, dtype=torch.float64)
    for site in state.plan.sites:
        m = site.mapping.to_dict()
        g = reference.get_parameter(site.name).grad
        view = g.t() if site.transposed else g
        for k in range(m["rows"]):
            for n in range(m["cols"]):
                index, sign = index_sign_from_docs(m, k, n)
                expected[index] += sign * site.scale * view[k, n]
    torch.testing.assert_close(model.roast_memory.grad, expected)
    from test_fuse_roast_ops import record_uses

    torch._dynamo.reset()
    uses = record_uses(monkeypatch)
    compiled = torch.compile(model, backend="roast")
    torch.testing.assert_close(compiled(x), out)
    if kind == "weight_norm":  # its scale moved out of the linear (passes/split_weight_norm.py): both fuse
        assert [u.fused for u in uses] == [True, True], uses
    else:  # the head fuses; the parametrized read stays whole
        assert sorted(u.fused for u in uses) == [False, True]
