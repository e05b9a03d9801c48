"""Weight averaging over the last steps of training (model.average_last)."""

from __future__ import annotations

import logging

import pytest
import torch

from voiceprint.config import ModelParams
from voiceprint.training.loop import AVERAGE_EVERY, weight_average
from voiceprint.training.weight_average import WeightAverage


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_the_average_is_the_mean_of_the_snapshots_buffers_included() -> None:
    net = _net()
    average = WeightAverage(net, start=0, every=1)
    weights = []
    for k in range(3):
        with torch.no_grad():
            net[0].weight.fill_(float(k))
            net[1].running_mean.fill_(2.0 * k)
        net[1].num_batches_tracked.fill_(k + 1)
        weights.append(net[0].weight.clone())
        average.add(net)
    state = average.averaged_state(net)
    assert torch.equal(state["0.weight"], torch.stack(weights).mean(dim=0))  # (0 + 1 + 2) / 3 = 1
    assert torch.equal(state["1.running_mean"], torch.full((2,), 2.0))
    assert state["1.num_batches_tracked"].dtype == torch.long and int(state["1.num_batches_tracked"]) == 2
    net.load_state_dict(state)  # every key, every shape and dtype fits
    assert int(average.count) == 3


def test_due_counts_only_steps_past_the_start_on_the_stride() -> None:
    average = WeightAverage(_net(), start=900, every=10)
    assert [s for s in range(880, 1201) if average.due(s)] == list(range(910, 1201, 10))


def test_an_average_of_nothing_is_an_error_not_zeros() -> None:
    with pytest.raises(RuntimeError, match="no snapshot"):
        WeightAverage(_net(), start=0, every=10).averaged_state(_net())


def test_the_running_sum_travels_in_the_state_dict() -> None:
    """Training snapshots save modules by state_dict: a restored averager continues the same sum."""
    net = _net()
    first = WeightAverage(net, start=0, every=1)
    first.add(net)
    second = WeightAverage(_net(), start=0, every=1)
    second.load_state_dict(first.state_dict())
    second.add(net)
    first.add(net)
    for key, value in first.averaged_state(net).items():
        assert torch.equal(value, second.averaged_state(net)[key])


def test_window_from_params(caplog: pytest.LogCaptureFixture) -> None:
    net = _net()
    with caplog.at_level(logging.WARNING, logger="voiceprint.training.loop"):
        assert weight_average(net, ModelParams(steps=1200, average_last=0.0)) is None
        assert not caplog.records  # off is not worth a warning
        assert (
            weight_average(net, ModelParams(steps=20, average_last=0.25)) is None
        )  # 5 steps: no snapshot would fall in
    assert "averages nothing" in caplog.text and "5 of 20 steps" in caplog.text
    average = weight_average(net, ModelParams(steps=1200, average_last=0.25))
    assert average is not None and average.start == 900 and average.every == AVERAGE_EVERY
