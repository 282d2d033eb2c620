"""Model factories for the CLI tests (`roastfx plan cli_models:small_mlp`)."""
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
