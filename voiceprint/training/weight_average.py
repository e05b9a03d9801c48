"""Averaging a model's weights over the last part of training (WeSpeaker's ``average_model``).

The last steps of a run wander around a minimum rather than sit in it; the mean of their weights
usually lies nearer its centre than any one of them, so the averaged model scores a little better
at no training cost. WeSpeaker averages the checkpoints of the last epochs; here a snapshot is
added every ``every`` steps once the run is past ``start`` steps. Every entry of the state dict
is averaged, batch-norm running statistics included, as WeSpeaker does.

The running sum lives in buffers of an ``nn.Module``, so a training snapshot saves it with the
model and a resumed run averages exactly what an uninterrupted one does.
"""

from __future__ import annotations

import torch


class WeightAverage(torch.nn.Module):
    """Running float64 sum of ``model``'s state dict over the snapshots taken so far."""

    def __init__(self, model: torch.nn.Module, *, start: int, every: int):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.start = start
        self.every = every
        self._keys = list(model.state_dict())
        for i, value in enumerate(model.state_dict().values()):
            # State-dict keys hold dots, which buffer names may not: buffers are numbered instead.
            self.register_buffer(f"sum_{i}", torch.zeros_like(value, dtype=torch.float64, device="cpu"))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def due(self, done: int) -> bool:
        """Whether the state after ``done`` steps is one of the averaged snapshots."""
        return done > self.start and done % self.every == 0

    def add(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        with torch.no_grad():
            for i, key in enumerate(self._keys):
                getattr(self, f"sum_{i}").add_(state[key].detach().to("cpu", torch.float64))
        self.count += 1

    def averaged_state(self, like: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The mean of the snapshots, each entry in the dtype and on the device of ``like``'s."""
        if int(self.count) == 0:
            raise RuntimeError("no snapshot was averaged (fewer steps than the averaging window?)")
        reference = like.state_dict()
        n = float(self.count)
        out = {}
        for i, key in enumerate(self._keys):
            mean = getattr(self, f"sum_{i}") / n
            if not reference[key].is_floating_point():
                mean = mean.round()  # e.g. batch norm's num_batches_tracked
            out[key] = mean.to(reference[key].device, reference[key].dtype)
        return out
