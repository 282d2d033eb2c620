"""Small models and an independent materializer written from docs/mapping.md."""
import torch
from torch import nn

P = 2**31 - 1


def index_sign_from_docs(m: dict, k: int, n: int) -> tuple[int, float]:
    """The memory slot and sign of element (k, n) of a site's B view, from docs/mapping.md with Python ints."""
    span = m["tile_rows"] * m["tile_cols"]
    i, j = k // m["tile_rows"], n // m["tile_cols"]
    h = (m["a_row"] * i + m["a_col"] * j + m["b"]) % P
    start = m["window_start"] + (h % (m["window_size"] - span + 1)) // m["alignment"] * m["alignment"]
    index = start + (k % m["tile_rows"]) * m["tile_cols"] + n % m["tile_cols"]
    g = (m["c_row"] * k + m["c_col"] * n + m["d"]) % P
    return index, (-1.0 if (g >> 16) & 1 else 1.0)


def materialize_from_docs(memory: torch.Tensor, m: dict, scale: float) -> torch.Tensor:
    """W_B[k, n] = scale * sign(k, n) * memory[index(k, n)], element by element with Python ints."""
    out = torch.empty(m["rows"], m["cols"], dtype=torch.float64)
    for k in range(m["rows"]):
        for n in range(m["cols"]):
            index, sign = index_sign_from_docs(m, k, n)
            out[k, n] = scale * sign * float(memory[index])
    return out


def dense_weight_from_docs(memory, site) -> torch.Tensor:
    view = materialize_from_docs(memory.detach().double(), site.mapping.to_dict(), site.scale)
    return view.t().reshape(site.shape) if site.transposed else view.reshape(site.shape)


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=128, d_out=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Mixed(nn.Module):
    """Every kind of site: conv with groups, embedding, embedding bag, functional uses, a tied weight."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.bag = nn.EmbeddingBag(40, 24, mode="mean")
        self.conv = nn.Conv1d(24, 36, 3, groups=3, padding=1)
        self.w = nn.Parameter(torch.randn(36, 20) / 6)
        self.norm = nn.LayerNorm(20)
        self.head = nn.Linear(20, 50, bias=False)

    def forward(self, tokens, bag_tokens):
        h = self.emb(tokens) + self.bag(bag_tokens)[:, None, :]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(h @ self.w)
        return torch.einsum("btd,vd->btv", h, self.head.weight) + torch.nn.functional.linear(h, self.head.weight)


def mixed_inputs(batch=3, seq=7, gen=None):
    gen = gen or torch.Generator().manual_seed(1)
    return (torch.randint(0, 50, (batch, seq), generator=gen), torch.randint(0, 40, (batch, 4), generator=gen))


def snapshot(model: nn.Module):
    """Everything a failed call must leave unchanged."""
    return (
        type(model),
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, id(p), p.detach().clone()) for n, p in model.named_parameters()],
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()},
    )


def assert_unchanged(model, snap):
    cls, mods, params, state = snap
    assert type(model) is cls
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = [(n, id(p), p.detach()) for n, p in model.named_parameters()]
    assert [(n, i) for n, i, _ in now] == [(n, i) for n, i, _ in params]
    for (_, _, a), (_, _, b) in zip(now, params):
        assert torch.equal(a, b)
    new_state = model.state_dict()
    assert new_state.keys() == state.keys()
    for k in state:
        if isinstance(state[k], torch.Tensor):
            assert torch.equal(new_state[k], state[k]), k
        else:
            assert new_state[k] == state[k], k
