"""The training loop, one for every recipe: scratch, fine-tuning and distillation, of one ECAPA-TDNN
or of the mixture of experts.

:func:`fit` builds the encoder (or takes the fine-tuning source) and the objective's modules, runs
Adam with a linear warm-up and cosine decay, clips the gradient norm, adds the mixture's
load-balancing loss, averages the weights over the last steps (``model.average_last``), keeps the
per-step history, snapshots itself for resuming (:mod:`voiceprint.training.state`) and reports
progress through ``on_step(step, metrics)``; it knows nothing about tracking. What a step
optimises, and on which batch, is the objective's business (:mod:`voiceprint.training.objectives`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from voiceprint.common.precision import training_autocast_dtype
from voiceprint.config import ModelParams
from voiceprint.encoders.ecapa import EcapaConfig
from voiceprint.encoders.moe import EcapaMoE, MoeConfig
from voiceprint.training.aam import AAMHead
from voiceprint.training.data import SpeakerQueue
from voiceprint.training.objectives import Objective
from voiceprint.training.state import Resumable, TrainState
from voiceprint.training.weight_average import WeightAverage

log = logging.getLogger(__name__)

# Fraction of steps spent in linear warm-up, and the floor of the cosine decay (fraction of lr).
WARMUP_FRACTION = 0.1
MIN_LR_FRACTION = 0.01
# Gradient-norm clip: AAM with scale 30 gives large early gradients on a randomly initialised net.
GRAD_CLIP = 5.0
# model.average_last: a weight snapshot every this many steps enters the average.
AVERAGE_EVERY = 10

StepCallback = Callable[[int, dict[str, float]], None]
"""``on_step(step, metrics)``: ``step`` counts completed steps (1-based), metrics are plain floats."""


class Trained(NamedTuple):
    """What :func:`fit` returns: the trained encoder, the AAM head, and the per-step history
    (``loss``, the objective's metrics, ``acc``, and ``balance`` for a mixture)."""

    model: torch.nn.Module
    head: AAMHead
    history: dict[str, list[float]]


def fit(
    objective: Objective,
    params: ModelParams,
    cfg: EcapaConfig | MoeConfig,
    *,
    device: torch.device,
    progress: bool = True,
    on_step: StepCallback | None = None,
    state: TrainState | None = None,
    initial: torch.nn.Module | None = None,
    average: bool = True,
) -> Trained:
    """Run ``params.steps`` steps of ``objective``; returns the model, the head and the history.

    With a ``state``, the run resumes from its snapshot (if any) and snapshots itself every
    ``params.checkpoint_every`` steps. ``on_step(step, {"train_loss", ..., "train_acc", "lr"})`` is
    called every ``params.log_every`` steps and after the last one (each series averaged since the
    previous call, lr of the step). ``initial`` (fine-tuning) is trained in place of a fresh model.
    ``average``: whether ``model.average_last`` applies (distillation has never averaged).

    The order of everything that draws random numbers or fixes the arithmetic (the encoder's
    initialisation, then the objective's modules, the parameters' order in the optimiser, and
    within a step: batch, augmentation, features, forward, loss, backward, clip, update) is what
    makes a seeded run reproducible bit for bit; keep it.
    """
    torch.manual_seed(params.seed)  # model init is part of the seeded run
    model = (initial if initial is not None else cfg.build()).to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)  # a loaded encoder is frozen for inference
    modules = objective.build(cfg, device)
    fbank = cfg.build_fbank().to(device)
    norm = cfg.build_norm().to(device)

    trainable = [*model.parameters(), *(p for module in modules.values() for p in module.parameters())]
    optimizer = torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.weight_decay)
    warmup = max(1, round(WARMUP_FRACTION * params.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, params.steps, warmup))

    noise_gen = torch.Generator().manual_seed(params.seed + 1)
    amp_dtype = training_autocast_dtype(device, params.amp)
    series = ("loss", *objective.metrics, "acc")
    history: dict[str, list[float]] = {name: [] for name in series}
    averager = weight_average(model, params) if average else None
    parts = Resumable(
        modules={"model": model, **modules, **({"average": averager} if averager is not None else {})},
        optimizer=optimizer,
        scheduler=scheduler,
        generators={objective.rng_name: objective.rng},
        torch_generators={"noise": noise_gen},
        history=history,
    )
    start = resume_run(state, parts, objective.queue)

    bar = tqdm(
        range(start, params.steps),
        initial=start,
        total=params.steps,
        desc=objective.name,
        unit="step",
        disable=not progress,
    )
    for step in bar:
        lr = optimizer.param_groups[0]["lr"]
        objective.start_step(step)
        batch = objective.batch(params.batch_size, noise_gen).to(device)
        lengths = torch.ones(batch.wavs.shape[0], device=device)  # fixed-size crops: no padding
        with torch.no_grad():
            feats = objective.augmenter.features(norm(fbank(batch.wavs), lengths), noise_gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
            emb = model(feats, lengths)
        out = objective.loss(emb, batch)
        loss = add_gate_balance(out.loss, model, params, history)  # the objective, as logged
        total = loss if out.head_only is None else loss + out.head_only

        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        if averager is not None and averager.due(step + 1):
            averager.add(model)

        history["loss"].append(float(loss.detach()))
        for name in objective.metrics:
            history[name].append(float(out.metrics[name].detach()))
        history["acc"].append(float((out.cosines.argmax(dim=1) == batch.targets).float().mean()))
        if state is not None:
            state.step_done(step + 1, params.steps, parts, extra=lambda: {"queue": list(objective.queue.pending)})
        report_step(on_step, step + 1, params, history, lr, **{name: name for name in series})
        if progress:
            bar.set_postfix(
                **{name: f"{np.mean(history[name][-10:]):.3f}" for name in series},
                lr=f"{scheduler.get_last_lr()[0]:.1e}",
            )
    if averager is not None:
        model.load_state_dict(averager.averaged_state(model))
    return Trained(model, objective.head, history)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``MIN_LR_FRACTION``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def add_gate_balance(
    loss: torch.Tensor, model: torch.nn.Module, params: ModelParams, history: dict[str, list[float]]
) -> torch.Tensor:
    """``loss`` + ``model.moe.balance`` x the mixture's load-balancing loss of the last forward, which
    is also recorded in ``history["balance"]`` for the model card. One ECAPA-TDNN: ``loss`` unchanged."""
    if not isinstance(model, EcapaMoE):
        return loss
    balance = model.balance_loss()
    history.setdefault("balance", []).append(float(balance.detach()))
    weight = params.moe.balance
    return loss + weight * balance if weight > 0 else loss


def weight_average(model: torch.nn.Module, params: ModelParams) -> WeightAverage | None:
    """The averager of the last ``model.average_last`` of the steps (None when 0 or too few steps)."""
    window = round(params.average_last * params.steps)
    if window < AVERAGE_EVERY:
        if params.average_last > 0:
            log.warning(
                "model.average_last %s averages nothing: %d of %d steps is under one snapshot interval "
                "(%d steps); the last step's weights are saved",
                params.average_last,
                window,
                params.steps,
                AVERAGE_EVERY,
            )
        return None
    return WeightAverage(model, start=params.steps - window, every=AVERAGE_EVERY)


def resume_run(state: TrainState | None, parts: Resumable, queue: SpeakerQueue) -> int:
    """Restore ``parts`` and ``queue`` from ``state``'s snapshot; the number of steps already done."""
    if state is None:
        return 0
    start, extra = state.resume(parts)
    if start:
        queue.pending = [int(i) for i in extra["queue"]]
    return start


def report_step(
    on_step: StepCallback | None,
    done: int,
    params: ModelParams,
    history: dict[str, list[float]],
    lr: float,
    **series: str,
) -> None:
    """Call ``on_step`` every ``params.log_every`` steps and after the last one.

    ``series`` maps metric name suffixes to history keys (``loss="loss"`` -> ``train_loss``): each is
    averaged over the steps since the previous report.
    """
    if on_step is None or params.log_every <= 0 or (done % params.log_every and done != params.steps):
        return
    window = done - (done - 1) // params.log_every * params.log_every  # steps since the last report
    metrics = {f"train_{name}": float(np.mean(history[key][-window:])) for name, key in series.items()}
    metrics["lr"] = float(lr)
    on_step(done, metrics)
