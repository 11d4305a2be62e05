"""The MCKP solver of IGQ allocation, FPCS's refinement step and observer
merging across shards, each against a definition."""
import itertools

import numpy as np
import pytest
import torch

from mmvq.calibration import solve_mckp
from mmvq.calibration.grid import row_fpcs
from mmvq.quantizers.observers import MinMaxObserver, calibration_step


@pytest.mark.parametrize('seed', range(6))
def test_mckp_matches_brute_force(seed):
    """Exact on the discretised costs (each rounded up to a budget unit): the
    brute-force optimum of the same problem, always within the budget."""
    rng = np.random.default_rng(seed)
    costs = [sorted(rng.uniform(1, 10, 3)) for _ in range(4)]
    losses = [sorted(rng.uniform(0, 1, 3), reverse=True) for _ in range(4)]
    budget, resolution = sum(c[1] for c in costs), 200
    units = [[int(np.ceil(c / (budget / resolution) - 1e-9)) for c in opts] for opts in costs]
    best_loss = min(sum(losses[i][k] for i, k in enumerate(pick))
                    for pick in itertools.product(range(3), repeat=4)
                    if sum(units[i][k] for i, k in enumerate(pick)) <= resolution)
    got = solve_mckp(costs, losses, budget, resolution=resolution)
    assert sum(costs[i][k] for i, k in enumerate(got)) <= budget
    assert sum(losses[i][k] for i, k in enumerate(got)) == pytest.approx(best_loss)


def test_mckp_falls_back_to_the_cheapest_options():
    assert solve_mckp([[5.0, 3.0], [4.0, 2.0]], [[0.0, 1.0], [0.0, 1.0]], 1.0) == [1, 1]


def test_fpcs_refinement_replaces_survivors_and_converges():
    # per row, a quadratic loss with its minimum between two grid points
    target_s = torch.tensor([0.37, 1.234])
    target_z = torch.tensor([3.0, 5.0])
    scales = torch.linspace(0.1, 2.0, 16)[:, None].expand(16, 2).repeat(2, 1).contiguous()
    zps = torch.tensor([3.0, 5.0]).repeat(32, 1)
    delta = torch.full((2,), (2.0 - 0.1) / 15)

    def losses(sc, zp):
        return (sc - target_s) ** 2 + (zp - target_z) ** 2

    coarse = losses(scales, zps).min(0).values
    s, z = row_fpcs(scales, zps, delta, losses, eq_n=32, width=4, steps=6)
    assert torch.equal(z, target_z)
    err = (s - target_s).abs()
    assert (err ** 2 < coarse / 100).all() and (err < 2e-3).all(), err


def test_observer_records_merged_across_shards_equal_one_process():
    xs = [torch.randn(4, 6) * (i + 1) for i in range(5)]
    whole = MinMaxObserver(ch_axis=1)
    for p, x in enumerate(xs):
        with calibration_step(p, expected=5):
            whole.update(x)
    shards = [MinMaxObserver(ch_axis=1) for _ in range(2)]
    for rank, obs in enumerate(shards):
        for p in range(rank, 5, 2):                     # position p on rank p % 2
            with calibration_step(p, expected=5):
                obs.update(xs[p])
    shards[0].merge([shards[1].records])
    assert sorted(shards[0].records) == sorted(whole.records)
    assert torch.equal(shards[0].min, whole.min) and torch.equal(shards[0].max, whole.max)
    assert torch.equal(whole.max, torch.stack(xs).amax((0, 1)))
