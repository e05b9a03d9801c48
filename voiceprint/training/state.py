"""Resumable training state: snapshots of a run in progress, and the key that says whose they are.

Every ``model.checkpoint_every`` steps the whole training state (weights, AAM head, optimiser,
scheduler, every random generator, the sampler's queue, the loss history) is written atomically to
``data/train_state/model.pt`` (:class:`TrainState`), outside the DVC output ``models/ecapa``. A run
that was killed resumes from it when the config and the training data are the same (same
:func:`training_fingerprint`), and finishes with exactly the checkpoint an uninterrupted run writes;
a state of another config is ignored and replaced. Snapshots consume no randomness, so they do not
change what a run computes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voiceprint.common.atomic import atomic_path
from voiceprint.common.layout import Layout
from voiceprint.config import ModelParams
from voiceprint.training.data import TrainingData

log = logging.getLogger(__name__)

# Bump when the content of a training-state snapshot changes, so an old one is never misread.
STATE_VERSION = 1
# ModelParams fields that cannot change the trained weights: not part of the resume key, nor of the
# model card (so models/ecapa stays byte-identical whatever they are set to).
OPERATIONAL_PARAMS = frozenset({"checkpoint_every", "log_every", "register_model"})


@dataclass
class Resumable:
    """What a training loop mutates, gathered so that it can be snapshotted and restored."""

    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generators: dict[str, np.random.Generator]
    torch_generators: dict[str, torch.Generator]
    history: dict[str, list[float]]


def training_fingerprint(
    params: ModelParams, data: TrainingData, device: torch.device, extra: dict[str, Any] | None = None
) -> str:
    """Hash of everything a training run's result depends on: the parameters that affect training
    (all but :data:`OPERATIONAL_PARAMS`; the resolved device instead of ``auto``), the decoded
    training audio and its labels, the torch version and ``extra`` (e.g. the teacher cache)."""
    key = {
        "version": STATE_VERSION,
        "params": params.model_dump(exclude={*OPERATIONAL_PARAMS, "device"}),
        "device": device.type,
        "torch": torch.__version__,
        "labels": data.labels,
        "segment_ids": data.segment_ids,
        "extra": extra or {},
    }
    h = hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=16)
    for clips in data.clips:
        h.update(len(clips).to_bytes(8, "little"))
        for clip in clips:
            h.update(len(clip).to_bytes(8, "little"))
            h.update(np.ascontiguousarray(clip, dtype=np.float32).tobytes())
    if data.nonspeech is not None:
        h.update(np.ascontiguousarray(data.nonspeech, dtype=np.float32).tobytes())
    return h.hexdigest()


class TrainState:
    """Periodic atomic snapshots of a training run in ``path``, and resuming from one.

    A snapshot is a ``torch.save`` of tensors and plain containers only (numpy generator states as
    their ``bit_generator.state`` dicts, Python's as ``random.getstate()``), so it is read back with
    ``torch.load(weights_only=True)``. It is written through a temporary file and ``os.replace``: a
    kill leaves the previous snapshot or the new one, never half of one. A snapshot whose
    ``fingerprint`` differs (another config, other data) is ignored, and replaced by the next save.

    A resumed run ends bit-identical to an uninterrupted one on the same device with the same torch
    thread count (CPU reductions are split by thread, so the count is part of the arithmetic; it is
    not part of the key, so a resume with another count still continues, just not bit for bit).
    Nothing runs in DataLoader workers, so there are no worker seeds to restore.
    """

    def __init__(self, path: Path | None, fingerprint: str, every: int):
        self.path = path
        self.fingerprint = fingerprint
        self.every = every if path is not None else 0
        self.resumed_from = 0

    @classmethod
    def for_run(
        cls,
        layout: Layout,
        params: ModelParams,
        data: TrainingData,
        device: torch.device,
        *,
        init: str,
        extra: dict[str, Any] | None = None,
    ) -> TrainState:
        """The state of ``layout`` (``data/train_state/model.pt``); disabled when ``checkpoint_every`` is 0."""
        if params.checkpoint_every <= 0:
            return cls(None, "", 0)
        fingerprint = training_fingerprint(params, data, device, {"init": init, **(extra or {})})
        return cls(layout.data / "train_state" / "model.pt", fingerprint, params.checkpoint_every)

    def load(self) -> dict[str, Any] | None:
        """The snapshot for this fingerprint, or None (none, unreadable, or another config's)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            snap = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as err:  # truncated by a full disk, an older format: start afresh
            log.warning("%s: unreadable training state, ignored (%s: %s)", self.path, type(err).__name__, err)
            return None
        if not isinstance(snap, dict) or (snap.get("version"), snap.get("fingerprint")) != (
            STATE_VERSION,
            self.fingerprint,
        ):
            log.info("%s: training state of another config or data; ignored (replaced by the next one)", self.path)
            return None
        return snap

    def resume(self, parts: Resumable) -> tuple[int, dict[str, Any]]:
        """Restore ``parts`` from the matching snapshot; (completed steps, extra) or (0, {})."""
        snap = self.load()
        if snap is None:
            return 0, {}
        for name, module in parts.modules.items():
            module.load_state_dict(snap["modules"][name])
        parts.optimizer.load_state_dict(snap["optimizer"])
        parts.scheduler.load_state_dict(snap["scheduler"])
        for name, gen in parts.generators.items():
            gen.bit_generator.state = snap["generators"][name]
        for name, tgen in parts.torch_generators.items():
            tgen.set_state(snap["torch_generators"][name])
        for key, values in snap["history"].items():
            parts.history[key] = [float(v) for v in values]
        set_global_rng_state(snap["rng"])
        self.resumed_from = int(snap["step"])
        log.info("resuming training from %s at step %d", self.path, self.resumed_from)
        return self.resumed_from, snap.get("extra", {})

    def step_done(self, done: int, total: int, parts: Resumable, extra: Callable[[], dict[str, Any]]) -> None:
        """Snapshot after every ``every``-th completed step but the last (the model is written next)."""
        if self.every <= 0 or done % self.every or done >= total:
            return
        self.save(done, parts, extra())

    def save(self, done: int, parts: Resumable, extra: dict[str, Any]) -> None:
        assert self.path is not None
        snap = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "step": done,
            "modules": {name: cpu_state(m.state_dict()) for name, m in parts.modules.items()},
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "generators": {name: g.bit_generator.state for name, g in parts.generators.items()},
            "torch_generators": {name: g.get_state() for name, g in parts.torch_generators.items()},
            "history": {k: list(v) for k, v in parts.history.items()},
            "rng": global_rng_state(),
            "extra": extra,
        }
        with atomic_path(self.path, suffix=".pt") as tmp:
            torch.save(snap, tmp)

    def clear(self) -> None:
        """Remove this run's snapshot (after the model is written); another config's is left alone."""
        if self.path is not None and self.load() is not None:
            self.path.unlink(missing_ok=True)


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict, for a snapshot."""
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def global_rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) global generator states, as tensors and plain containers."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` captured."""
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators: the first thing a training run does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
