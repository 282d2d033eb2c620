"""RNNs step by step (roastfx/rnn.py): the decomposition against torch's own RNN ops in float64, and
compressed RNNs through the roast backend with every weight read a roast op."""
import pytest
import torch
from torch import nn

import roastfx
from roastfx.rnn import decomposed_forward

CASES = {  # name: (module factory, input shape, with initial state)
    "lstm": (lambda: nn.LSTM(5, 7), (6, 3, 5), False),
    "lstm-2layer-bidir-proj-batch-first": (lambda: nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=4,
                                                           batch_first=True), (3, 6, 5), True),
    "gru-2layer-bidir": (lambda: nn.GRU(5, 7, num_layers=2, bidirectional=True), (6, 3, 5), True),
    "gru-no-bias-unbatched": (lambda: nn.GRU(5, 7, bias=False), (6, 5), True),
    "rnn-tanh-batch-first": (lambda: nn.RNN(5, 7, batch_first=True), (3, 6, 5), False),
    "rnn-relu-2layer-bidir-unbatched": (lambda: nn.RNN(5, 7, num_layers=2, nonlinearity="relu",
                                                       bidirectional=True), (6, 5), True),
}


def _initial_state(module, x, gen):
    directions = 2 if module.bidirectional else 1
    batch = () if x.dim() == 2 else (x.shape[0 if module.batch_first else 1],)
    out = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    h = torch.randn(module.num_layers * directions, *batch, out, dtype=torch.float64, generator=gen)
    if module.mode == "LSTM":
        return h.requires_grad_(), torch.randn(module.num_layers * directions, *batch, module.hidden_size,
                                               dtype=torch.float64, generator=gen).requires_grad_()
    return h.requires_grad_()


def _flat(out):
    return [t for t in (out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],)))]


@pytest.mark.parametrize("name", list(CASES))
def test_decomposition_equals_torchs_rnn_op_in_float64(name):
    build, shape, with_state = CASES[name]
    torch.manual_seed(0)
    module = build().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    hx = _initial_state(module, x, gen) if with_state else None
    want = _flat(module(x, hx))
    got = _flat(decomposed_forward(module, x, hx))
    assert [t.shape for t in got] == [t.shape for t in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    leaves = [x, *(hx if isinstance(hx, tuple) else [hx] if hx is not None else []), *module.parameters()]
    upstream = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in want]
    grads_want = torch.autograd.grad(sum((t * u).sum() for t, u in zip(want, upstream)), leaves)
    grads_got = torch.autograd.grad(sum((t * u).sum() for t, u in zip(got, upstream)), leaves)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True, bidirectional=True, proj_size=6)
        self.gru = nn.GRU(12, 10, batch_first=True)
        self.head = nn.Linear(10, 5)

    def forward(self, ids):
        h, _ = self.lstm(self.emb(ids))
        h, _ = self.gru(h)
        return self.head(h)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_compressed_rnns_compile_with_every_weight_read_fused(path, monkeypatch):
    """A compressed LSTM/GRU model through torch.compile(backend="roast"): compress turns on dynamo's
    allow_rnn, the RNNs run step by step, and every weight read becomes a roast op (no dense weight), with
    eager's outputs and memory gradient (eager runs torch's RNN ops on the materialized weights)."""
    from test_fuse_roast_ops import record_uses

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = roastfx.compress(Tagger(), "4x", init="random")
    assert torch._dynamo.config.allow_rnn
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(3))
    eager = model(ids)
    want = torch.autograd.grad(eager.square().mean(), model.roast_memory)[0]
    uses = record_uses(monkeypatch)
    monkeypatch.setenv("ROASTFX_KERNELS", path)
    out = torch.compile(model, backend="roast", options={"inner": "aot_eager"})(ids)
    got = torch.autograd.grad(out.square().mean(), model.roast_memory)[0]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # per LSTM layer and direction: 1 input projection, 5 recurrent steps, 5 projections; the GRU: 1 + 5;
    # the embedding and the head
    assert len(uses) == 2 * 2 * (1 + 5 + 5) + (1 + 5) + 2, [u.why for u in uses]
    assert all(u.fused for u in uses), [u.why for u in uses if not u.fused]


def test_packed_sequences_keep_torchs_op():
    """A PackedSequence input runs torch's RNN op (weights materialized), compiled or not."""
    torch._dynamo.reset()
    model = roastfx.compress(nn.Sequential(nn.LSTM(4, 6)), "2x", init="random")
    lstm = model[0]
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 4), torch.tensor([5, 3]))
    out, (h, c) = lstm(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence) and h.shape == (1, 2, 6)
