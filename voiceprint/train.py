"""Model stage: train ECAPA-TDNN from scratch on the train split, or adopt a pretrained SpeechBrain model.

The result is a directory at ``layout.model_dir``, written atomically: SpeechBrain's layout for
one ECAPA-TDNN (:mod:`voiceprint.encoders.ecapa`), or the mixture's own layout with ``model.arch:
moe`` (:mod:`voiceprint.encoders.moe`, which SpeechBrain cannot build). The embedding stage loads
either with :func:`~voiceprint.encoders.registry.load_model_dir`.

Training is sized for a small CPU: the default train set (251 LibriSpeech speakers, one 10-15 s
utterance each, ~50 min of audio) is decoded once into memory, and every step draws one random
``crop_s`` crop per speaker for a speaker-balanced batch. With a single utterance per speaker the
model can only learn speaker identity from different crops of the same recording, so augmentation
(``model.augment``, :mod:`voiceprint.augment`: coloured or recorded non-speech noise, reverberation,
speed perturbation, gain) is what stops it from keying on recording conditions, and counting a
speed-perturbed crop as another speaker (``model.speed_as_speakers``, :class:`SpeedClasses`)
multiplies the voices it sees by the number of ``model.speeds``. The loss is SpeechBrain's
AAM-softmax, the optimiser Adam with a linear warm-up and cosine decay. With
``model.aam_centres: teacher`` (the default) the AAM class centres are not learned but fixed at the
bundled CAM++'s embedding of each class's speech (:mod:`voiceprint.teacher_centres`), so the
student inherits the teacher's map of which voices are alike.

Every ``checkpoint_every`` steps the whole training state (weights, AAM head, optimiser, scheduler,
every random generator, the sampler's queue, the loss history) is written atomically to
``data/train_state/model.pt`` (:class:`TrainState`), outside the DVC output ``models/ecapa``. A run
that was killed resumes from it when the config and the training data are the same (same
:func:`training_fingerprint`), and finishes with exactly the checkpoint an uninterrupted run writes;
a state of another config is ignored and replaced. Snapshots consume no randomness, so they do not
change what a run computes. Progress reaches MLflow (or anything else) through ``on_step(step,
metrics)``; the loop itself knows nothing about tracking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from voiceprint import audio
from voiceprint.atomic import atomic_path
from voiceprint.augment import SPEEDS, Augmenter
from voiceprint.centring import centre_embeddings
from voiceprint.config import ModelParams
from voiceprint.encoders.aam import AAMHead
from voiceprint.encoders.ecapa import EcapaConfig, load_ecapa, save_speechbrain_checkpoint
from voiceprint.encoders.moe import EcapaMoE, MoeConfig, save_moe_checkpoint
from voiceprint.encoders.registry import load_model_dir
from voiceprint.layout import Layout
from voiceprint.precision import autocast_dtype, dtype_name, training_autocast_dtype
from voiceprint.schema import SEGMENTS
from voiceprint.weight_average import WeightAverage

if TYPE_CHECKING:
    from voiceprint.teacher_centres import TeacherCentres

log = logging.getLogger(__name__)

# Decoded training audio is held in memory as float32 (230 MB per hour); beyond this budget a
# seeded per-speaker subset of segments is used so a large train split cannot exhaust RAM.
MAX_TRAIN_AUDIO_HOURS = 4.0
# Fraction of steps spent in linear warm-up, and the floor of the cosine decay (fraction of lr).
WARMUP_FRACTION = 0.1
MIN_LR_FRACTION = 0.01
# Gradient-norm clip: AAM with scale 30 gives large early gradients on a randomly initialised net.
GRAD_CLIP = 5.0
# model.average_last: a weight snapshot every this many steps enters the average.
AVERAGE_EVERY = 10
# Non-speech noise bank for augmentation: gaps between speech segments at least this long, up to
# this much audio in all.
NONSPEECH_MIN_GAP_S = 0.2
NONSPEECH_MAX_S = 600.0
# Bump when the content of a training-state snapshot changes, so an old one is never misread.
STATE_VERSION = 1
# ModelParams fields that cannot change the trained weights: not part of the resume key, nor of the
# model card (so models/ecapa stays byte-identical whatever they are set to).
OPERATIONAL_PARAMS = frozenset({"checkpoint_every", "log_every", "register_model"})

StepCallback = Callable[[int, dict[str, float]], None]
"""``on_step(step, metrics)``: ``step`` counts completed steps (1-based), metrics are plain floats."""


class TrainingError(RuntimeError):
    """Training cannot start (no train split, too few speakers, unusable audio)."""


@dataclass
class TrainingData:
    """Decoded training audio: ``clips[i]`` are the 16 kHz segments of speaker ``labels[i]``.

    ``segment_ids[i][j]`` / ``segment_starts[i][j]`` name ``clips[i][j]`` and its start time in its
    file (filled by :func:`load_training_data`; empty for hand-built data), so that distillation
    can key cached teacher embeddings by segment.
    """

    labels: list[str]
    clips: list[list[np.ndarray]]
    skipped: list[str] = field(default_factory=list)
    segment_ids: list[list[str]] = field(default_factory=list)
    segment_starts: list[list[float]] = field(default_factory=list)
    #: Non-speech audio (the gaps VAD left between speech segments), concatenated; for
    #: ``model.augment: [nonspeech]``. None when not requested or none was found.
    nonspeech: np.ndarray | None = None

    @property
    def num_segments(self) -> int:
        return sum(len(c) for c in self.clips)

    @property
    def audio_seconds(self) -> float:
        return sum(len(x) for c in self.clips for x in c) / audio.TARGET_SR


# --------------------------------------------------------------------------------------------------
# Public entry points


def build_model(
    params: ModelParams, layout: Layout, *, progress: bool = True, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Produce ``layout.model_dir`` according to ``params.init`` and return stats for metrics/logs.

    ``on_step`` receives training metrics every ``params.log_every`` steps (scratch and distill).
    """
    if params.init == "scratch":
        return train_scratch(params, layout, progress=progress, on_step=on_step)
    if params.init == "distill":
        from voiceprint.distill import train_distill  # imported lazily: it pulls in the CAM++ teacher

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


def architecture(params: ModelParams) -> EcapaConfig | MoeConfig:
    """What ``model.arch`` asks to train: one ECAPA-TDNN of ``channels``, or the mixture."""
    if params.arch == "moe":
        return MoeConfig.from_params(
            params.moe_experts, params.moe_expert_channels, params.moe_gate_channels,
            lin_neurons=params.lin_neurons, n_mels=params.n_mels,
        )
    return EcapaConfig.from_channels(params.channels, lin_neurons=params.lin_neurons, n_mels=params.n_mels)


def add_gate_balance(
    loss: torch.Tensor, model: torch.nn.Module, params: ModelParams, history: dict[str, list[float]]
) -> torch.Tensor:
    """``loss`` + ``moe_balance`` x the mixture's load-balancing loss of the last forward, which is
    also recorded in ``history["balance"]`` for the model card. One ECAPA-TDNN: ``loss`` unchanged."""
    if not isinstance(model, EcapaMoE):
        return loss
    balance = model.balance_loss()
    history.setdefault("balance", []).append(float(balance.detach()))
    return loss + params.moe_balance * balance if params.moe_balance > 0 else loss


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
        "finetune", params.model_copy(update={"steps": params.finetune_steps}), layout, source.cfg,
        progress=progress, on_step=on_step, initial=source.model, extra={"source_sha256": source.weights_sha256},
    )
    stats.update(source=params.source, source_model_id=source.model_id)
    return stats


def _train(
    init: str, params: ModelParams, layout: Layout, cfg: EcapaConfig | MoeConfig, *, progress: bool,
    on_step: StepCallback | None, initial: torch.nn.Module | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    if params.speed_as_speakers and not params.speed_pseudo_speakers:
        log.warning("model.speed_as_speakers has no effect: 'speed' is not in model.augment %s", params.augment)
    _seed_everything(params.seed)
    device = resolve_device(params.device)
    data = load_training_data(layout, seed=params.seed, progress=progress, nonspeech="nonspeech" in params.augment)
    decode_s = time.perf_counter() - t0

    centres = _teacher_centres(layout, params, cfg, data, device, progress) if params.aam_centres == "teacher" else None
    extra = {**(extra or {}), **({"teacher_centres": centres.path.name} if centres is not None else {})}
    state = TrainState.for_run(layout, params, data, device, init=init, extra=extra)
    model, head, history = fit(
        data, params, cfg, device=device, progress=progress, on_step=on_step, state=state, initial=initial,
        centres=centres.centres if centres is not None else None,
    )
    train_s = time.perf_counter() - t0 - decode_s - (centres.seconds if centres is not None else 0.0)
    centring = (
        centre_embeddings(model, cfg, data.clips, device, wccn=params.wccn, progress=progress)
        if params.centre_embeddings else None
    )

    stats = summarise_training(init, params, cfg, model, data, history)
    stats.update(centring or {})
    stats["aam_classes"] = int(head.classifier.weight.shape[0])  # x len(speeds) with speed_as_speakers
    if centres is not None:
        stats["teacher_model_id"] = centres.teacher_model_id
        stats["teacher_precision"] = centres.precision  # part of the cache key
    card_stats = dict(stats)
    stats.update(
        device=str(device),
        decode_seconds=round(decode_s, 2),
        **({"teacher_seconds": centres.seconds, "teacher_centres_reused": centres.reused} if centres is not None else {}),
        seconds_per_step=round(train_s / params.steps, 4) if params.steps else None,
        resumed_from_step=state.resumed_from,
    )
    stats["model_id"] = save_trained_model(layout, params, cfg, model, head, data, card_stats)
    state.clear()  # the model is written: nothing left to resume
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    log.info(
        "trained %s (%s): %d steps, loss %.3f -> %.3f, train acc %.3f, %.1f s",
        stats["model_id"], init, params.steps, stats["loss_initial"] or 0.0, stats["loss_final"] or 0.0,
        stats["train_accuracy"] or 0.0, stats["seconds"],
    )
    return stats


def summarise_training(
    init: str, params: ModelParams, cfg: EcapaConfig | MoeConfig, model: torch.nn.Module, data: "TrainingData",
    history: dict[str, list[float]],
) -> dict[str, Any]:
    """Loss/accuracy (and distillation cosine) averaged over the first and last steps, plus data sizes."""
    window = min(20, max(1, len(history["loss"]) // 4))
    stats: dict[str, Any] = {
        "init": init,
        "steps": params.steps,
        "loss_window": window,
        "loss_initial": _mean(history["loss"][:window]),
        "loss_final": _mean(history["loss"][-window:]),
        "train_accuracy": _mean(history["acc"][-window:]),
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
        stats["gate_balance_loss_final"] = _mean(history["balance"][-window:])
    if "cosine" in history:
        stats["cosine_initial"] = _mean(history["cosine"][:window])
        stats["cosine_final"] = _mean(history["cosine"][-window:])
    return stats


def training_precision(device: torch.device, params: ModelParams) -> str:
    """'bfloat16' where the encoder's forward runs under bf16 autocast, else 'float32'."""
    return dtype_name(training_autocast_dtype(device, params.amp))


def save_trained_model(
    layout: Layout, params: ModelParams, cfg: EcapaConfig | MoeConfig, model: torch.nn.Module, head: Any,
    data: "TrainingData", card_stats: dict[str, Any],
) -> str:
    """Write the trained encoder (+ AAM classifier and labels) in SpeechBrain's layout, or the
    mixture in its own (:mod:`voiceprint.encoders.moe`); its model id."""
    card = {"training": card_stats, "params": params.model_dump(exclude=set(OPERATIONAL_PARAMS))}
    save = save_moe_checkpoint if isinstance(cfg, MoeConfig) else save_speechbrain_checkpoint
    model_dir = save(
        layout.model_dir, model.cpu().eval(), cfg, classifier=head.first_classes(len(data.labels)).cpu().eval(),
        labels=data.labels,
        extra_card=card,
    )
    return load_model_dir(model_dir).model_id  # loading it back proves the written directory is usable


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(choice)


# --------------------------------------------------------------------------------------------------
# Data


def load_training_data(
    layout: Layout,
    *,
    seed: int = 0,
    progress: bool = True,
    max_hours: float = MAX_TRAIN_AUDIO_HOURS,
    nonspeech: bool = False,
) -> TrainingData:
    """Decode every train-split segment of ``layout.segments`` once, grouped by speaker.

    With ``nonspeech`` the gaps between a file's speech segments are decoded too (see
    :func:`load_nonspeech`).
    """
    path = layout.segments
    if not path.exists():
        raise TrainingError(f"{path}: not found; init=scratch trains on the segments table (run the VAD stage)")
    table = pq.read_table(path)
    missing = [c for c in SEGMENTS.names if c not in table.column_names]
    if missing:
        raise TrainingError(f"{path}: missing columns {missing}")
    rows = [r for r in table.select(SEGMENTS.names).to_pylist() if r["split"] == "train"]
    if not rows:
        splits = sorted({str(s) for s in table.column("split").to_pylist()})
        raise TrainingError(
            f"{path}: no rows with split='train' (found splits: {splits or 'none'}); a train split is "
            "required for model.init=scratch or distill (or use model.init=pretrained)"
        )
    rows = _cap_hours(rows, max_hours, seed)

    by_speaker: dict[str, list[np.ndarray]] = {}
    ids: dict[str, list[str]] = {}
    starts: dict[str, list[float]] = {}
    skipped: list[str] = []
    for row in tqdm(rows, desc="decode train", unit="seg", disable=not progress, leave=False):
        file = Path(row["path"])
        file = file if file.is_absolute() else layout.root / file
        try:
            wav = audio.load(file, row["start_s"], row["end_s"])
        except audio.AudioError as err:
            log.warning("skipping training segment %s: %s", row["segment_id"], err)
            skipped.append(row["segment_id"])
            continue
        if len(wav) >= audio.TARGET_SR // 10:  # under 0.1 s there is nothing to crop
            speaker = str(row["speaker_id"])
            by_speaker.setdefault(speaker, []).append(wav)
            ids.setdefault(speaker, []).append(str(row["segment_id"]))
            starts.setdefault(speaker, []).append(float(row["start_s"]))
    labels = sorted(by_speaker)
    if len(labels) < 2:
        raise TrainingError(f"{path}: need at least 2 training speakers with usable audio, found {len(labels)}")
    return TrainingData(
        labels=labels,
        clips=[by_speaker[s] for s in labels],
        skipped=skipped,
        segment_ids=[ids[s] for s in labels],
        segment_starts=[starts[s] for s in labels],
        nonspeech=load_nonspeech(layout, rows) if nonspeech else None,
    )


def nonspeech_gaps(rows: list[dict[str, Any]], min_gap_s: float = NONSPEECH_MIN_GAP_S) -> list[tuple[str, float, float]]:
    """``(path, start_s, end_s)`` of every stretch of a file before or between its speech segments.

    These are what VAD rejected: pauses, breaths, room tone (and speech too short to keep).
    """
    by_file: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by_file.setdefault(str(r["path"]), []).append((float(r["start_s"]), float(r["end_s"])))
    gaps = []
    for path, spans in sorted(by_file.items()):
        previous_end = 0.0
        for start, end in sorted(spans):
            if start - previous_end >= min_gap_s:
                gaps.append((path, previous_end, start))
            previous_end = max(previous_end, end)
    return gaps


def load_nonspeech(layout: Layout, rows: list[dict[str, Any]], max_s: float = NONSPEECH_MAX_S) -> np.ndarray | None:
    """Decode up to ``max_s`` seconds of non-speech gaps (digitally silent ones skipped), concatenated."""
    pieces, total = [], 0
    for path, start, end in nonspeech_gaps(rows):
        file = Path(path) if Path(path).is_absolute() else layout.root / path
        try:
            wav = audio.load(file, start, end)
        except audio.AudioError as err:
            log.warning("skipping non-speech gap %s [%.2f, %.2f] s: %s", file, start, end, err)
            continue
        if len(wav) == 0 or float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) < 1e-5:
            continue
        pieces.append(wav)
        total += len(wav)
        if total >= max_s * audio.TARGET_SR:
            break
    if not pieces:
        log.warning("no non-speech audio between the training segments; 'nonspeech' augmentation is off")
        return None
    bank = np.concatenate(pieces).astype(np.float32)
    log.info("non-speech noise bank: %.1f s from %d gaps", len(bank) / audio.TARGET_SR, len(pieces))
    return bank


def _cap_hours(rows: list[dict[str, Any]], max_hours: float, seed: int) -> list[dict[str, Any]]:
    total = sum(r["end_s"] - r["start_s"] for r in rows)
    if total <= max_hours * 3600:
        return rows
    rng = random.Random(seed)
    per_speaker: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        per_speaker.setdefault(str(r["speaker_id"]), []).append(r)
    budget = max_hours * 3600 / len(per_speaker)
    kept: list[dict[str, Any]] = []
    for segs in per_speaker.values():
        rng.shuffle(segs)
        used = 0.0
        for r in segs:
            if used >= budget:
                break
            kept.append(r)
            used += r["end_s"] - r["start_s"]
    log.warning(
        "train split has %.1f h of audio; using a per-speaker subset of %.1f h (MAX_TRAIN_AUDIO_HOURS)",
        total / 3600, sum(r["end_s"] - r["start_s"] for r in kept) / 3600,
    )
    return kept


def _teacher_centres(
    layout: Layout, params: ModelParams, cfg: EcapaConfig | MoeConfig, data: TrainingData, device: torch.device,
    progress: bool,
) -> "TeacherCentres":
    """The CAM++ teacher's embedding of every AAM class, for ``model.aam_centres: teacher``."""
    from voiceprint.teacher_centres import TeacherSizeError, teacher_centres  # lazily: it pulls in the CAM++ teacher

    classes = SpeedClasses(len(data.labels), params.speed_pseudo_speakers, params.speeds)
    try:
        return teacher_centres(
            layout, data.labels, data.segment_ids, data.clips, classes.members(),
            dim=cfg.lin_neurons, centre_s=params.teacher_centre_s, device=device,
            precision=autocast_dtype(device, params.amp), progress=progress,
        )
    except TeacherSizeError as err:
        raise TrainingError(
            f"model.aam_centres 'teacher' needs the model's embeddings to be the teacher's size: {err} "
            "(model.lin_neurons, or the fine-tuning source's); set model.aam_centres: learned for this size"
        ) from None


class SpeakerQueue:
    """Speaker indices for balanced batches: every speaker once per pass, each pass in a new order.

    ``pending`` is part of a training snapshot (:func:`resume_run`), so a resumed run continues the
    interrupted pass instead of starting a new one.
    """

    def __init__(self, n_speakers: int, rng: np.random.Generator):
        self.n_speakers = n_speakers
        self.rng = rng
        self.pending: list[int] = []

    def take(self, k: int) -> list[int]:
        while len(self.pending) < k:
            self.pending.extend(self.rng.permutation(self.n_speakers).tolist())
        taken, self.pending = self.pending[:k], self.pending[k:]
        return taken


@dataclass(frozen=True)
class SpeedClasses:
    """AAM-softmax classes when a changed speed counts as another speaker (``model.speed_as_speakers``).

    Pitch and formants move with the speed, so to a speaker encoder a crop played at 0.9x sounds
    like someone else. WeSpeaker's recipe trains it as someone else, which multiplies the classes
    of a set with few speakers by the number of speeds. Class ``block * speakers + speaker``,
    block 0 being the unperturbed speed: the first ``speakers`` rows of the head are the real
    speakers, the only ones saved.
    Blocks follow ``speeds`` cyclically from 1.0 (0.9/1.0/1.1: blocks 1.0, 1.1, 0.9).
    """

    speakers: int
    enabled: bool
    speeds: tuple[float, ...] = SPEEDS

    @property
    def count(self) -> int:
        return self.speakers * (len(self.speeds) if self.enabled else 1)

    def targets(self, speakers: torch.Tensor, speeds: torch.Tensor) -> torch.Tensor:
        """Class of each crop from its speaker and its index into ``speeds``."""
        if not self.enabled:
            return speakers
        return speakers + self.speakers * ((speeds - self.speeds.index(1.0)) % len(self.speeds))

    def members(self) -> list[tuple[int, float]]:
        """``(speaker, speed)`` of every class, in class order (what the teacher's centres embed)."""
        n, unperturbed = len(self.speeds), self.speeds.index(1.0)
        blocks = n if self.enabled else 1
        return [(s, self.speeds[(b + unperturbed) % n]) for b in range(blocks) for s in range(self.speakers)]


class CropSampler:
    """Speaker-balanced random crops: every speaker appears once per pass, in shuffled order.

    Within a speaker a segment is picked with probability proportional to its length (so every
    second of audio is equally likely), then a uniformly random ``crop`` samples; shorter segments
    are tiled cyclically rather than zero-padded so the batch needs no length masks.
    """

    def __init__(self, data: TrainingData, crop_samples: int, rng: np.random.Generator):
        self.data = data
        self.crop = crop_samples
        self.rng = rng
        self._weights = []
        for clips in data.clips:
            lengths = np.array([len(c) for c in clips], dtype=np.float64)
            self._weights.append(lengths / lengths.sum())
        self.speakers = SpeakerQueue(len(data.labels), rng)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        speakers = self.speakers.take(batch_size)
        wavs = np.stack([self._crop(s) for s in speakers])
        return torch.from_numpy(wavs), torch.tensor(speakers, dtype=torch.long)

    def _crop(self, speaker: int) -> np.ndarray:
        clips = self.data.clips[speaker]
        clip = clips[self.rng.choice(len(clips), p=self._weights[speaker])]
        if len(clip) <= self.crop:
            start = int(self.rng.integers(0, len(clip)))
            return np.resize(np.roll(clip, -start), self.crop)
        start = int(self.rng.integers(0, len(clip) - self.crop + 1))
        return clip[start : start + self.crop]


# --------------------------------------------------------------------------------------------------
# Optimisation


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``MIN_LR_FRACTION``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def aam_margin_at(step: int, params: ModelParams) -> float:
    """The AAM margin of ``step`` under ``model.aam_margin_ramp``.

    A randomly initialised net cannot yet meet the full margin, so WeSpeaker starts AAM-softmax at
    margin 0 and raises it once the classes have begun to separate. Here: 0 before the ramp's
    start step, linear up to ``aam_margin`` at its end step, then constant.
    """
    start, end = (round(fraction * params.steps) for fraction in params.aam_margin_ramp)
    if step >= end:
        return params.aam_margin
    if step < start:
        return 0.0
    return params.aam_margin * ((step - start) / (end - start))


def fit(
    data: TrainingData,
    params: ModelParams,
    cfg: EcapaConfig | MoeConfig,
    *,
    device: torch.device,
    progress: bool = True,
    on_step: StepCallback | None = None,
    state: "TrainState | None" = None,
    initial: torch.nn.Module | None = None,
    centres: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, AAMHead, dict[str, list[float]]]:
    """Run ``params.steps`` AAM-softmax steps; returns the model, the head and per-step loss/acc.

    With a ``state``, the run resumes from its snapshot (if any) and snapshots itself every
    ``params.checkpoint_every`` steps. ``on_step(step, {"train_loss", "train_acc", "lr"})`` is
    called every ``params.log_every`` steps and after the last one (loss/acc averaged since the
    previous call, lr of the step). ``initial`` (fine-tuning) is trained in place of a fresh model.
    ``centres`` (``(classes, D)``, ``model.aam_centres: teacher``) fix the AAM class centres; they
    are not trained.
    """
    torch.manual_seed(params.seed)  # model init is part of the seeded run
    model = (initial if initial is not None else cfg.build()).to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)  # a loaded encoder is frozen for inference
    classes = SpeedClasses(len(data.labels), params.speed_pseudo_speakers, params.speeds)
    head = AAMHead(cfg.lin_neurons, classes.count, margin=params.aam_margin, scale=params.aam_scale)
    if centres is not None:
        head.fix_centres(centres)
    head = head.to(device).train()
    fbank = cfg.build_fbank().to(device)
    norm = cfg.build_norm().to(device)

    trainable = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.weight_decay)
    warmup = max(1, round(WARMUP_FRACTION * params.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, params.steps, warmup))

    augmenter = Augmenter(params.augment, int(round(params.crop_s * audio.TARGET_SR)), data.nonspeech, params.speeds)
    sampler = CropSampler(data, augmenter.source_samples, np.random.default_rng(params.seed))
    noise_gen = torch.Generator().manual_seed(params.seed + 1)
    amp_dtype = training_autocast_dtype(device, params.amp)
    history: dict[str, list[float]] = {"loss": [], "acc": []}
    average = weight_average(model, params)
    parts = Resumable(
        modules={"model": model, "head": head, **({"average": average} if average is not None else {})},
        optimizer=optimizer,
        scheduler=scheduler,
        generators={"sampler": sampler.rng},
        torch_generators={"noise": noise_gen},
        history=history,
    )
    start = resume_run(state, parts, sampler.speakers)

    bar = tqdm(range(start, params.steps), initial=start, total=params.steps, desc="train ecapa", unit="step",
               disable=not progress)
    for step in bar:
        lr = optimizer.param_groups[0]["lr"]
        head.set_margin(aam_margin_at(step, params))
        wavs, targets = sampler.batch(params.batch_size)
        wavs, speeds = augmenter.apply(wavs, noise_gen)
        wavs = wavs.to(device, non_blocking=True)
        targets = classes.targets(targets, speeds).to(device, non_blocking=True)
        lengths = torch.ones(wavs.shape[0], device=device)  # fixed-size crops: no padding
        with torch.no_grad():
            feats = augmenter.features(norm(fbank(wavs), lengths), noise_gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
            emb = model(feats, lengths)
        loss, cosines = head(emb, targets)
        loss = add_gate_balance(loss, model, params, history)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        if average is not None and average.due(step + 1):
            average.add(model)

        acc = (cosines.argmax(dim=1) == targets).float().mean()
        history["loss"].append(float(loss.detach()))
        history["acc"].append(float(acc))
        if state is not None:
            state.step_done(step + 1, params.steps, parts, extra=lambda: {"queue": list(sampler.speakers.pending)})
        report_step(on_step, step + 1, params, history, lr, loss="loss", acc="acc")
        if progress:
            recent = slice(-10, None)
            bar.set_postfix(
                loss=f"{_mean(history['loss'][recent]):.3f}",
                acc=f"{_mean(history['acc'][recent]):.2f}",
                lr=f"{scheduler.get_last_lr()[0]:.1e}",
            )
    if average is not None:
        model.load_state_dict(average.averaged_state(model))
    return model, head, history


def weight_average(model: torch.nn.Module, params: ModelParams) -> WeightAverage | None:
    """The averager of the last ``model.average_last`` of the steps (None when 0 or too few steps)."""
    window = round(params.average_last * params.steps)
    if window < AVERAGE_EVERY:
        if params.average_last > 0:
            log.warning(
                "model.average_last %s averages nothing: %d of %d steps is under one snapshot interval "
                "(%d steps); the last step's weights are saved", params.average_last, window, params.steps,
                AVERAGE_EVERY,
            )
        return None
    return WeightAverage(model, start=params.steps - window, every=AVERAGE_EVERY)


def resume_run(state: "TrainState | None", parts: "Resumable", queue: SpeakerQueue) -> int:
    """Restore ``parts`` and ``queue`` from ``state``'s snapshot; the number of steps already done."""
    if state is None:
        return 0
    start, extra = state.resume(parts)
    if start:
        queue.pending = [int(i) for i in extra["queue"]]
    return start


def report_step(
    on_step: StepCallback | None, done: int, params: ModelParams, history: dict[str, list[float]], lr: float,
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


# --------------------------------------------------------------------------------------------------
# Resumable training state


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
        cls, layout: Layout, params: ModelParams, data: TrainingData, device: torch.device, *, init: str,
        extra: dict[str, Any] | None = None,
    ) -> "TrainState":
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
        _set_global_rng_state(snap["rng"])
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
            "modules": {name: _cpu_state(m.state_dict()) for name, m in parts.modules.items()},
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "generators": {name: g.bit_generator.state for name, g in parts.generators.items()},
            "torch_generators": {name: g.get_state() for name, g in parts.torch_generators.items()},
            "history": {k: list(v) for k, v in parts.history.items()},
            "rng": _global_rng_state(),
            "extra": extra,
        }
        with atomic_path(self.path, suffix=".pt") as tmp:
            torch.save(snap, tmp)

    def clear(self) -> None:
        """Remove this run's snapshot (after the model is written); another config's is left alone."""
        if self.path is not None and self.load() is not None:
            self.path.unlink(missing_ok=True)


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def _global_rng_state() -> dict[str, Any]:
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


def _set_global_rng_state(state: dict[str, Any]) -> None:
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None
