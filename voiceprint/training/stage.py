"""The ``model`` stage: train a speaker encoder, adopt a pretrained one, or fine-tune it.

:func:`run` calls :func:`build_model`, which picks the recipe from ``model.init`` (``scratch``,
``pretrained`` with optional fine-tuning, ``distill``; each that trains runs
:func:`voiceprint.training.loop.fit` with its own objective), and writes the model directory
atomically, logging to MLflow. Design: docs/design/training.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from voiceprint.common.layout import Layout
from voiceprint.common.precision import autocast_dtype, dtype_name, training_autocast_dtype
from voiceprint.config import ModelParams, Params
from voiceprint.encoders.ecapa import EcapaConfig, load_ecapa, save_speechbrain_checkpoint
from voiceprint.encoders.loader import load_model_dir
from voiceprint.encoders.moe import MoeConfig, save_moe_checkpoint
from voiceprint.training.aam import AAMHead
from voiceprint.training.centring import centre_embeddings
from voiceprint.training.data import SpeedClasses, TrainingData, TrainingError, load_training_data
from voiceprint.training.distill import build_teacher_cache
from voiceprint.training.loop import StepCallback, fit
from voiceprint.training.objectives import AamObjective, DistillObjective, Objective
from voiceprint.training.state import OPERATIONAL_PARAMS, TrainState, seed_everything
from voiceprint.training.teacher_centres import TeacherSizeError, teacher_centres

log = logging.getLogger(__name__)


def build_model(
    params: ModelParams, layout: Layout, *, progress: bool = True, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Produce ``layout.model_dir`` according to ``params.init`` and return stats for metrics/logs.

    ``on_step`` receives training metrics every ``params.log_every`` steps (whenever a model trains).
    """
    if params.init == "scratch":
        return train_scratch(params, layout, progress=progress, on_step=on_step)
    if params.init == "distill":
        return train_distill(params, layout, progress=progress, on_step=on_step)
    if params.finetune_steps > 0:
        return finetune(params, layout, progress=progress, on_step=on_step)
    t0 = time.perf_counter()
    encoder = load_ecapa(params.source, device="cpu")
    encoder.export(layout.model_dir, extra_card={"init": "pretrained", "source": params.source})
    log.info("adopted pretrained %s from %s into %s", encoder.model_id, params.source, layout.model_dir)
    return {
        "init": "pretrained",
        "source": params.source,
        "model_id": encoder.model_id,
        "num_parameters": encoder.num_parameters(),
        "embedding_dim": encoder.dim,
        "channels": encoder.cfg.channels,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def train_scratch(
    params: ModelParams, layout: Layout, *, progress: bool = True, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Train ECAPA-TDNN (``channels=[C,C,C,C,3C]``), or the mixture of ECAPA experts with
    ``arch: moe``, on the train split of ``layout.segments``.

    Returns ``steps``, ``loss_initial``/``loss_final`` (mean over the first/last ``loss_window``
    steps), ``train_accuracy`` (margin-free, last window), timings, sizes, ``resumed_from_step``
    (0 unless a snapshot of an interrupted run was picked up) and ``model_id``.
    """
    return _train("scratch", params, layout, architecture(params), progress=progress, on_step=on_step)


def finetune(
    params: ModelParams, layout: Layout, *, progress: bool = True, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Adapt the pretrained ``params.source`` to this dataset: ``finetune_steps`` AAM-softmax steps.

    The encoder starts from the source's weights (its architecture, whatever ``model.channels``
    says); the AAM head is new, one row per train speaker, because the source's classes are other
    people. Resuming after a kill works as for scratch training; the source's weights hash is
    part of the resume key.
    """
    source = load_ecapa(params.source, device="cpu")
    stats = _train(
        "finetune",
        params.model_copy(update={"steps": params.finetune_steps}),
        layout,
        source.cfg,
        progress=progress,
        on_step=on_step,
        initial=source.model,
        resume_key={"source_sha256": source.weights_sha256},
    )
    stats.update(source=params.source, source_model_id=source.model_id)
    return stats


def train_distill(
    params: ModelParams, layout: Layout, *, progress: bool = True, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Distil the bundled CAM++ into an ECAPA-TDNN (``channels=[C,C,C,C,3C]``), or the mixture.

    Returns train_scratch's stats (``loss_*`` is the combined loss) plus ``teacher_model_id``,
    ``teacher_cache`` (path), ``teacher_cache_reused``, ``teacher_seconds`` and
    ``cosine_initial``/``cosine_final``: the mean student-teacher cosine over the first/last window
    of steps (on augmented student input). Snapshots and resuming work as in scratch training (the
    teacher cache is part of the resume key).
    """
    return _train("distill", params, layout, architecture(params), progress=progress, on_step=on_step)


def architecture(params: ModelParams) -> EcapaConfig | MoeConfig:
    """What ``model.arch`` asks to train: one ECAPA-TDNN of ``channels``, or the mixture."""
    if params.arch == "moe":
        moe = params.moe
        return MoeConfig.from_params(
            moe.experts,
            moe.expert_channels,
            moe.gate_channels,
            lin_neurons=params.lin_neurons,
            n_mels=params.n_mels,
        )
    return EcapaConfig.from_channels(params.channels, lin_neurons=params.lin_neurons, n_mels=params.n_mels)


@dataclass
class Recipe:
    """What a training recipe brings to a run besides the model: its objective and its teacher.

    ``resume_key`` enters the training fingerprint, ``card`` the model card's training stats and
    ``stats`` the run's stats only. AAM training (scratch, fine-tuning) averages and centres its
    weights as ``model.average_last`` / ``model.centre_embeddings`` say; distillation never has.
    """

    objective: Objective
    resume_key: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    average_and_centre: bool = True


def _train(
    init: str,
    params: ModelParams,
    layout: Layout,
    cfg: EcapaConfig | MoeConfig,
    *,
    progress: bool,
    on_step: StepCallback | None,
    initial: torch.nn.Module | None = None,
    resume_key: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One training run of any recipe: decode the train split, prepare the recipe's teacher, run the
    loop (resuming a killed run's snapshot), finish the weights, write the model; its stats."""
    t0 = time.perf_counter()
    distill = init == "distill"
    seed_everything(params.seed)
    device = resolve_device(params.device)
    data = load_training_data(
        layout, seed=params.seed, progress=progress, nonspeech="nonspeech" in params.augment.kinds
    )
    decode_s = time.perf_counter() - t0

    recipe = (distill_recipe if distill else aam_recipe)(layout, params, cfg, data, device, progress)
    teacher_s = time.perf_counter() - t0 - decode_s
    state = TrainState.for_run(
        layout, params, data, device, init=init, extra={**(resume_key or {}), **recipe.resume_key}
    )
    model, head, history = fit(
        recipe.objective,
        params,
        cfg,
        device=device,
        progress=progress,
        on_step=on_step,
        state=state,
        initial=initial,
        average=recipe.average_and_centre,
    )
    train_s = time.perf_counter() - t0 - decode_s - teacher_s
    centring = (
        centre_embeddings(model, cfg, data.clips, device, wccn=params.wccn, progress=progress)
        if recipe.average_and_centre and params.centre_embeddings
        else None
    )

    stats = summarise_training(init, params, cfg, model, data, history)
    stats.update(centring or {})
    stats.update(recipe.card)
    card_stats = dict(stats)
    stats.update(
        device=str(device),
        decode_seconds=round(decode_s, 2),
        **recipe.stats,
        train_seconds=round(train_s, 2),
        seconds_per_step=round(train_s / params.steps, 4) if params.steps else None,
        resumed_from_step=state.resumed_from,
    )
    stats["model_id"] = save_trained_model(layout, params, cfg, model, head, data, card_stats)
    state.clear()  # the model is written: nothing left to resume
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    _log_result(stats, params.steps, teacher_s)
    return stats


def _log_result(stats: dict[str, Any], steps: int, teacher_s: float) -> None:
    if stats["init"] == "distill":
        log.info(
            "distilled %s from %s: %d steps, cosine %.3f -> %.3f, %.1f s (teacher %.1f s%s)",
            stats["model_id"],
            stats["teacher_model_id"],
            steps,
            stats["cosine_initial"] or 0.0,
            stats["cosine_final"] or 0.0,
            stats["seconds"],
            teacher_s,
            ", cached" if stats["teacher_cache_reused"] else "",
        )
    else:
        log.info(
            "trained %s (%s): %d steps, loss %.3f -> %.3f, train acc %.3f, %.1f s",
            stats["model_id"],
            stats["init"],
            steps,
            stats["loss_initial"] or 0.0,
            stats["loss_final"] or 0.0,
            stats["train_accuracy"] or 0.0,
            stats["seconds"],
        )


def aam_recipe(
    layout: Layout,
    params: ModelParams,
    cfg: EcapaConfig | MoeConfig,
    data: TrainingData,
    device: torch.device,
    progress: bool,
) -> Recipe:
    """AAM-softmax training, with the CAM++ teacher's class centres under ``model.aam.centres: teacher``."""
    if params.augment.speed_as_speakers and not params.speed_pseudo_speakers:
        log.warning(
            "model.augment.speed_as_speakers has no effect: 'speed' is not in model.augment.kinds %s",
            params.augment.kinds,
        )
    if params.aam.centres != "teacher":
        objective = AamObjective(data, params)
        return Recipe(objective, card={"aam_classes": objective.classes.count})
    classes = SpeedClasses(len(data.labels), params.speed_pseudo_speakers, params.augment.speeds)
    try:
        centres = teacher_centres(
            layout,
            data.labels,
            data.segment_ids,
            data.clips,
            classes.members(),
            dim=cfg.lin_neurons,
            centre_s=params.aam.teacher_centre_s,
            device=device,
            precision=autocast_dtype(device, params.amp),
            progress=progress,
        )
    except TeacherSizeError as err:
        raise TrainingError(
            f"model.aam.centres 'teacher' needs the model's embeddings to be the teacher's size: {err} "
            "(model.lin_neurons, or the fine-tuning source's); set model.aam.centres: learned for this size"
        ) from None
    objective = AamObjective(data, params, centres=centres.centres)
    return Recipe(
        objective,
        resume_key={"teacher_centres": centres.path.name},
        card={
            "aam_classes": objective.classes.count,  # x len(speeds) with speed_as_speakers
            "teacher_model_id": centres.teacher_model_id,
            "teacher_precision": centres.precision,  # part of the cache key
        },
        stats={"teacher_seconds": centres.seconds, "teacher_centres_reused": centres.reused},
    )


def distill_recipe(
    layout: Layout,
    params: ModelParams,
    cfg: EcapaConfig | MoeConfig,
    data: TrainingData,
    device: torch.device,
    progress: bool,
) -> Recipe:
    """Distillation from the cached teacher embeddings (computed first when not cached yet)."""
    t0 = time.perf_counter()
    cache = build_teacher_cache(layout, data, params, device=device, progress=progress)
    return Recipe(
        DistillObjective(data, cache, params),
        resume_key={"teacher_cache": cache.path.name},
        card={"teacher_model_id": cache.teacher_model_id, "teacher_crops": len(cache)},
        stats={
            "teacher_cache": str(cache.path),
            "teacher_cache_reused": cache.reused,
            "teacher_seconds": round(time.perf_counter() - t0, 2),
        },
        average_and_centre=False,
    )


def summarise_training(
    init: str,
    params: ModelParams,
    cfg: EcapaConfig | MoeConfig,
    model: torch.nn.Module,
    data: TrainingData,
    history: dict[str, list[float]],
) -> dict[str, Any]:
    """Loss/accuracy (and distillation cosine) averaged over the first and last steps, plus data sizes."""
    window = min(20, max(1, len(history["loss"]) // 4))
    stats: dict[str, Any] = {
        "init": init,
        "steps": params.steps,
        "loss_window": window,
        "loss_initial": mean_of(history["loss"][:window]),
        "loss_final": mean_of(history["loss"][-window:]),
        "train_accuracy": mean_of(history["acc"][-window:]),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_speakers": len(data.labels),
        "num_segments": data.num_segments,
        "skipped_segments": len(data.skipped),
        "audio_seconds": round(data.audio_seconds, 1),
        "channels": cfg.channels,
        "precision": training_precision(next(model.parameters()).device, params),
    }
    if isinstance(cfg, MoeConfig):
        stats.update(arch="moe", experts=cfg.experts)
    if history.get("balance"):
        stats["gate_balance_loss_final"] = mean_of(history["balance"][-window:])
    if "cosine" in history:
        stats["cosine_initial"] = mean_of(history["cosine"][:window])
        stats["cosine_final"] = mean_of(history["cosine"][-window:])
    return stats


def mean_of(values: list[float]) -> float | None:
    """The mean rounded to 4 decimals, as the stats report it; None for no values."""
    return round(float(np.mean(values)), 4) if values else None


def training_precision(device: torch.device, params: ModelParams) -> str:
    """'bfloat16' where the encoder's forward runs under bf16 autocast, else 'float32'."""
    return dtype_name(training_autocast_dtype(device, params.amp))


def save_trained_model(
    layout: Layout,
    params: ModelParams,
    cfg: EcapaConfig | MoeConfig,
    model: torch.nn.Module,
    head: AAMHead,
    data: TrainingData,
    card_stats: dict[str, Any],
) -> str:
    """Write the trained encoder (+ AAM classifier and labels) in SpeechBrain's layout, or the
    mixture in its own (:mod:`voiceprint.encoders.moe`); its model id."""
    card = {"training": card_stats, "params": params.model_dump(exclude=set(OPERATIONAL_PARAMS))}
    save = save_moe_checkpoint if isinstance(cfg, MoeConfig) else save_speechbrain_checkpoint
    model_dir = save(
        layout.model_dir,
        model.cpu().eval(),
        cfg,
        classifier=head.first_classes(len(data.labels)).cpu().eval(),
        labels=data.labels,
        extra_card=card,
    )
    return load_model_dir(model_dir).model_id  # loading it back proves the written directory is usable


def resolve_device(choice: str) -> torch.device:
    """``model.device`` as a torch device (``auto``: CUDA when available)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(choice)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``model`` stage: :func:`build_model`, logged to MLflow (and registered) unless both are off."""
    mp = params.model
    if mp.log_every <= 0 and not mp.register_model:
        return build_model(mp, layout)  # nothing for MLflow
    from voiceprint.tracking.runs import training_run

    with training_run(layout, params) as tracked:
        stats = build_model(mp, layout, on_step=tracked.on_step)
        tracked.log_summary(stats)
        if mp.register_model:
            tracked.register_model(layout.model_dir, stats["model_id"])
    registered = {"registered_model": tracked.registered["uri"]} if tracked.registered else {}
    return {**stats, "mlflow_run_id": tracked.run_id, **registered}
