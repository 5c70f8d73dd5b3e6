"""The test harness itself: uninitialised tensors are poisoned on the CPU (so a forgotten write fails), and a
failing test's report names the seed that replays it."""

import torch


def test_empty_tensors_are_poisoned_on_the_cpu():
    assert torch.empty(5).isnan().all() and torch.empty_like(torch.zeros(2, 3)).isnan().all()
    assert torch.empty(3, dtype=torch.int32).eq(-1234567).all()
    assert torch.zeros(2).new_empty(4).isnan().all()
    assert torch.empty_strided((2, 2), (1, 2)).isnan().all()


def test_seed_is_recorded_for_the_report(request, _fresh_seed):
    assert request.node.fusedgpt_seed == _fresh_seed
    first = torch.rand(3)
    torch.manual_seed(_fresh_seed)
    assert torch.equal(torch.rand(3), first)
