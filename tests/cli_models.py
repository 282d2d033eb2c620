"""Model factories for the CLI tests (`roastfx plan cli_models:small_mlp`)."""
import torch
from torch import nn


def small_mlp():
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10))


def tiny_lm():
    """An embedding, a stack of linears and a head: enough sites for the progress bar."""
    layers = [nn.Embedding(100, 32)] + [nn.Linear(32, 32) for _ in range(40)] + [nn.Linear(32, 100)]
    return nn.Sequential(*layers)


def no_sites():
    return nn.Sequential(nn.ReLU())


def not_a_model():
    return 42


NOT_CALLABLE = 3


def raises():
    raise RuntimeError("boom in the factory")


def raises_type_error():
    return nn.Linear(4, "four")  # a TypeError inside a factory that takes no arguments


def needs_width(width, depth=2):
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def empty_weight():
    """A Linear whose weight has no elements (built without init, so torch warns about nothing)."""
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    model[0].weight = nn.Parameter(torch.empty(5, 0))
    return model


def markup_names():
    """Site names that rich would read as markup or emoji codes."""
    return nn.ModuleDict({"[bold]enc": nn.Linear(64, 64), "dec[/]": nn.Linear(64, 64), ":smile:": nn.Linear(64, 64),
                          "[red]": nn.Linear(64, 64)})


class InitKinds(nn.Module):
    """One module of each kind whose default init the meta-device scales must follow; large enough that the
    std of a real init is within a fraction of a percent of the distribution's."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(384, 512)
        self.conv = nn.Conv2d(32, 64, 3)
        self.conv_t = nn.ConvTranspose2d(64, 32, 3)
        self.emb = nn.Embedding(2000, 64)
        self.emb_pad = nn.Embedding(2000, 64, padding_idx=0)
        self.bag = nn.EmbeddingBag(2000, 64)
        self.lstm = nn.LSTM(64, 128)
        self.gru = nn.GRU(64, 160)
        self.mha = nn.MultiheadAttention(192, 4)
        self.mha_kv = nn.MultiheadAttention(192, 4, kdim=64, vdim=96)


def init_kinds():
    return InitKinds()


def gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    return nn.Sequential(Conv1D(512, 256), Conv1D(256, 512))


class SmallMoE(nn.Module):
    """A router and stacked (experts, out, in) expert weights indexed in a loop: plain Parameters, found only by
    tracing with example inputs (`roastfx plan ... --inputs cli_models:moe_inputs`)."""

    def __init__(self, dim=32, hidden=64, experts=4):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, dim) * 0.1)
        self.up = nn.Parameter(torch.randn(experts, hidden, dim) * 0.1)
        self.down = nn.Parameter(torch.randn(experts, dim, hidden) * 0.1)

    def forward(self, x):
        choice = torch.nn.functional.linear(x, self.router).argmax(-1)
        out = torch.zeros_like(x)
        for e in range(self.up.shape[0]):
            rows = choice == e
            h = torch.nn.functional.linear(x, self.up[e]).relu()
            out = out + torch.nn.functional.linear(h, self.down[e]) * rows[:, None]
        return out


def small_moe():
    return SmallMoE()


def moe_inputs():
    return (torch.randn(6, 32),)


def inputs_raise():
    raise RuntimeError("no inputs today")
