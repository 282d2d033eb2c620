"""compress(..., own_window=patterns): under global sharing, the matching sites get one window of
their own at the end of the memory; every other site shares the rest. Checked from the slot indices."""
import pytest
import torch
from torch import nn

import roastfx


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(200, 16)
        self.position = nn.Embedding(8, 16)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        h = self.word(ids) + self.position(torch.arange(ids.shape[1]))
        return self.head(torch.relu(self.fc(h))).mean(1)


def test_own_window_sites_live_alone_at_the_end_of_the_memory(tmp_path):
    model = roastfx.compress(Tiny(), "10x", seed=1, init="random", own_window="*position*")
    plan = roastfx.roast_state(model).plan
    dense = sum(s.numel for s in plan.sites)
    assert plan.memory_size == -(-dense // 10)  # equal memory: the window comes out of the same budget
    own = plan.site("position.weight").mapping
    rest = own.window_start
    assert 0 < rest < plan.memory_size and own.window_start + own.window_size == plan.memory_size
    assert own.window_size >= round(plan.memory_size * 8 * 16 / dense)
    for site in plan.sites:
        index = site.mapping.full_index()[0]
        if site.name == "position.weight":
            assert int(index.min()) >= rest
        else:
            assert site.mapping.window_start == 0 and int(index.max()) < rest
    # a loss on the other sites never moves the position window, and the plan round-trips
    (model.fc.weight.sum() + model.word.weight.sum()).backward()
    assert torch.count_nonzero(model.roast_memory.grad[rest:]) == 0
    roastfx.save(model, tmp_path / "m.safetensors")
    assert roastfx.read_plan(tmp_path / "m.safetensors") == plan


def test_own_window_errors_are_clear_and_leave_the_model_alone():
    model = Tiny()
    with pytest.raises(ValueError, match="matches no compressed site"):
        roastfx.compress(model, "10x", own_window=("*nothing*",))
    with pytest.raises(ValueError, match="applies to scheme='roast'"):
        roastfx.compress(model, "10x", scheme="roast-local", own_window=("*position*",))
    with pytest.raises(ValueError, match="matches every site"):
        roastfx.compress(model, "10x", own_window=("*",))
    with pytest.raises(ValueError, match=r"own_window=\(3,\): 3 is not a name pattern"):
        roastfx.compress(model, "10x", own_window=(3,))
    assert roastfx.roast_state(model) is None and isinstance(model.word.weight, nn.Parameter)


@pytest.mark.parametrize("compression", ["3x", "5x", "7x"])
def test_own_window_with_an_alignment_that_is_not_the_cache_line(compression):
    """alignment=3 (not a divisor of the 16-element cache line): the own window still starts on a multiple
    of both, and every site's slots stay inside its window."""
    model = roastfx.compress(Tiny(), compression, own_window="*position*", alignment=3)
    plan = roastfx.roast_state(model).plan
    own = plan.site("position.weight").mapping
    assert own.window_start % 3 == 0 and own.window_start % 16 == 0
    for site in plan.sites:
        index, _ = site.mapping.full_index()
        m = site.mapping
        assert m.window_start <= int(index.min()) and int(index.max()) < m.window_start + m.window_size
        assert (m.window_start + m.window_size <= own.window_start) == (site.name != "position.weight")
