"""What happens inside a globally shared BERT memory while it trains (the evidence in docs/results.md).

    python benchmarks/quality_bert_diagnose.py [--grad-scaling none|site] [--scheme roast] [--steps 41]
        [--lr 0.001 --memory-lr-mult 1]

Tweets task of benchmarks/quality_tasks.py, 100x, seed 0, scored nowhere (training split only).
Every ``--every`` steps it prints, per site: the norm of the gradient that site adds into the
memory, and its "efficiency" <g_site, sign(g_total)> / |g_site|_1 -- the share of the site's own
gradient that a sign-like (Adam) step of the summed memory gradient follows (1 = as if the site
had the memory to itself, 0 = it is steered by the other sites). At the end: the norm of the
token-type row, of the position and word rows, and the share of a token's embedding-layer input
that is common to all tokens.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_tasks as Q  # noqa: E402

import roastfx  # noqa: E402
from roastfx.codegen import ops  # noqa: E402
from roastfx.codegen.reference import view_to_weight  # noqa: E402
from roastfx.module import RoastState, scale_site_grad  # noqa: E402

GRADS: dict[str, torch.Tensor] = {}


class _Record(torch.autograd.Function):
    """Identity on the memory; backward records the gradient one site adds into it."""

    @staticmethod
    def forward(ctx, memory, name):
        ctx.name = name
        return memory.view_as(memory)

    @staticmethod
    def backward(ctx, grad):
        GRADS[ctx.name] = GRADS.get(ctx.name, 0) + grad.detach()
        return grad, None


def recording_weight(self, site_name):
    """RoastState.weight with the memory passed through _Record (same values, same gradient)."""
    site, args = self._sites[site_name], self._args[site_name]
    view = ops.materialize(_Record.apply(self.memory, site_name), args, site.scale)
    return view_to_weight(scale_site_grad(view, self.plan.grad_scaling), site.shape, site.transposed)


def short(name: str) -> str:
    return (name.replace("bert.bert.", "").replace("bert.", "").replace("encoder.layer.", "L")
            .replace("attention.", "att.").replace(".weight", "").replace("embeddings.", "emb."))


def embedding_stats(model, ids) -> str:
    emb = model.bert.bert.embeddings
    with torch.no_grad():
        word = emb.word_embeddings.weight[ids[ids != 0]]
        typ = emb.token_type_embeddings.weight[0]
        pos = emb.position_embeddings.weight
        x = word + typ
        common = x.mean(0).norm() / x.norm(dim=1).mean()
    return (f"|word row| {float(word.norm(dim=1).mean()):.3f}  |token-type row| {float(typ.norm()):.3f}  "
            f"|position row| {float(pos.norm(dim=1).mean()):.3f}  common-mode share of the input {float(common):.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", default="roast")
    p.add_argument("--grad-scaling", default="none")
    p.add_argument("--compression", default="100x")
    p.add_argument("--steps", type=int, default=41)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default: the task's)")
    p.add_argument("--memory-lr-mult", type=float, default=None, help="default: the task's")
    p.add_argument("--isolate", default="", help="as in quality_bert_ablation.py: comma list of site name patterns "
                   "that get their own window at the end of the memory")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    RoastState.weight = recording_weight
    task = Q.TASKS["tweets"](quick=False)
    lr = args.lr or task.lr
    mult = task.memory_lr_mult if args.memory_lr_mult is None else args.memory_lr_mult
    torch.manual_seed(0)
    model = roastfx.compress(task.build(), args.compression, seed=0, init="random", scheme=args.scheme,
                             grad_scaling=args.grad_scaling)
    state = roastfx.roast_state(model)
    if args.isolate:
        import quality_bert_ablation

        print("isolated:", quality_bert_ablation.isolate_sites(state, args.isolate.split(",")))
    mem = state.memory
    rest = [q for q in model.parameters() if q is not mem]
    opt = torch.optim.Adam([{"params": [mem], "lr": Q.memory_lr(model, lr, mult)}, {"params": rest, "lr": lr}])
    train = task.data[0]
    perm = torch.randperm(len(train[-1]), generator=torch.Generator().manual_seed(0))
    print(f"# {args.scheme}, grad_scaling={args.grad_scaling}, lr {lr:g}, memory lr x{mult:g}, {args.compression}"
          + (f", {args.isolate} isolated" if args.isolate else ""))
    print("start:", embedding_stats(model, train[0][:512]))
    for step in range(args.steps):
        idx = perm[(step * task.batch_size) % len(perm):][:task.batch_size]
        *inputs, y = (t[idx] for t in train)
        GRADS.clear()
        loss = nn.functional.cross_entropy(model(*inputs), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step % args.every == 0:
            total = sum(GRADS.values())
            direction = torch.sign(total)
            print(f"step {step} loss {loss.item():.4f}")
            print("  |g_site|   ", " ".join(f"{short(k)}={float(g.norm()):.2g}" for k, g in GRADS.items()))
            print("  efficiency ", " ".join(
                f"{short(k)}={float((g * direction).sum() / g.abs().sum().clamp_min(1e-30)):.2f}"
                for k, g in GRADS.items()))
        opt.step()
    print("end:  ", embedding_stats(model, train[0][:512]))


if __name__ == "__main__":
    main()
