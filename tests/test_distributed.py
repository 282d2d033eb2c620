"""DistributedDataParallel (gloo, 2 CPU processes) ends with the same memory as one process
training on the same global batch, eager and through the roast backend."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import roastfx

STEPS, GLOBAL_BATCH = 4, 16


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    return roastfx.compress(model, "4x", init="random", seed=3)


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GLOBAL_BATCH, 20, generator=gen), torch.randint(0, 5, (STEPS, GLOBAL_BATCH), generator=gen)


def train(model, xs, ys, forward):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
    return model.roast_memory.detach().clone()


def train_shard(rank, world, compiled):
    model = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    forward = torch.compile(ddp, backend="roast", options={"inner": "aot_eager"}) if compiled else ddp
    xs, ys = data()
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    return train(model, xs[:, shard], ys[:, shard], forward)


def worker(rank, world, port, compiled, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    memory = train_shard(rank, world, compiled)
    if rank == 0:
        torch.save(memory, out_path)
    dist.barrier()
    # Both ranks are done and the result is on disk: leave without gloo's teardown. Its background threads
    # sometimes abort the process at exit ("terminate called without an active exception", seen in 2 of
    # about 30 full-suite runs, never alone), which mp.spawn reports as a failure of the test.
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("compiled", [False, True])
def test_ddp_matches_single_process(compiled, tmp_path):
    out = tmp_path / "memory.pt"
    mp.spawn(worker, args=(2, free_port(), compiled, str(out)), nprocs=2, join=True)
    xs, ys = data()
    single = build()
    expected = train(single, xs, ys, single)
    got = torch.load(out)
    assert not torch.equal(expected, build().roast_memory.detach())  # training moved the memory
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
