"""Training objectives: what one step of the training loop (:mod:`voiceprint.training.loop`) optimises.

An objective draws a step's batch (crops, augmentation, targets), builds the modules trained beside
the encoder and turns the embeddings into a loss: :class:`AamObjective` (scratch, fine-tuning) and
:class:`DistillObjective` (``model.init: distill``). All its draws come from seeded generators in a
fixed order, so a resumed run replays. Design: docs/design/training.md#objectives.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from voiceprint.common import audio
from voiceprint.config import ModelParams
from voiceprint.encoders.ecapa import EcapaConfig
from voiceprint.encoders.moe import MoeConfig
from voiceprint.training.aam import AAMHead
from voiceprint.training.augment import Augmenter
from voiceprint.training.data import CropSampler, SpeakerQueue, SpeedClasses, TrainingData
from voiceprint.training.distill import TeacherCache, crop_audio

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One step's input: augmented crops ``(B, T)``, their AAM classes ``(B,)`` and, for
    distillation, the teacher's embeddings of the clean crops ``(B, D)``."""

    wavs: torch.Tensor
    targets: torch.Tensor
    teacher: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.wavs.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            self.teacher.to(device, non_blocking=True) if self.teacher is not None else None,
        )


@dataclass
class StepLoss:
    """What an objective makes of a batch's embeddings.

    ``loss`` is the objective proper (logged as ``loss``; the loop adds the mixture's
    load-balancing term to it), ``cosines`` the margin-free AAM cosines ``(B, classes)`` that the
    accuracy is measured on, ``metrics`` further per-step series (logged between loss and accuracy),
    and ``head_only`` a loss that trains the AAM head alone and is not logged (distillation without
    AAM weight: the classifier still learns the speakers).
    """

    loss: torch.Tensor
    cosines: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    head_only: torch.Tensor | None = None


class Objective(ABC):
    """A training objective; see the module docstring. Subclasses set the attributes below in
    ``__init__``, which must draw nothing from the global random generators."""

    #: Progress-bar label.
    name: str
    #: Per-step series besides ``loss`` and ``acc`` (keys of :attr:`StepLoss.metrics`).
    metrics: tuple[str, ...] = ()
    #: Speaker-balanced order of the batches; its pending pass is part of a snapshot.
    queue: SpeakerQueue
    #: The objective's random generator (crops, rows), snapshotted under :attr:`rng_name`.
    rng: np.random.Generator
    rng_name: str
    augmenter: Augmenter
    #: The AAM-softmax head (every objective trains one: it is saved as the classifier).
    head: AAMHead
    params: ModelParams

    @abstractmethod
    def build(self, cfg: EcapaConfig | MoeConfig, device: torch.device) -> dict[str, torch.nn.Module]:
        """Build the modules trained beside the encoder, by name, ``head`` first.

        Called right after the encoder is built: their initial weights are the next draws of the
        global torch generator, and the optimiser takes their parameters in this order.
        """

    def start_step(self, step: int) -> None:
        """Per-step schedules, before the batch is drawn: the AAM head's margin ramp."""
        self.head.set_margin(aam_margin_at(step, self.params))

    @abstractmethod
    def batch(self, batch_size: int, noise: torch.Generator) -> Batch:
        """The step's batch on the CPU, augmented (waveform domain) with draws from ``noise``."""

    @abstractmethod
    def loss(self, embeddings: torch.Tensor, batch: Batch) -> StepLoss:
        """The loss of the encoder's ``embeddings`` (as it returned them) for ``batch`` (on the device)."""


def aam_margin_at(step: int, params: ModelParams) -> float:
    """The AAM margin of ``step`` under ``model.aam.margin_ramp``.

    A randomly initialised net cannot yet meet the full margin, so WeSpeaker starts AAM-softmax at
    margin 0 and raises it once the classes have begun to separate. Here: 0 before the ramp's
    start step, linear up to ``model.aam.margin`` at its end step, then constant.
    """
    aam = params.aam
    start, end = (round(fraction * params.steps) for fraction in aam.margin_ramp)
    if step >= end:
        return aam.margin
    if step < start:
        return 0.0
    return aam.margin * ((step - start) / (end - start))


class AamObjective(Objective):
    """AAM-softmax over speaker-balanced random crops (scratch training and fine-tuning).

    ``centres`` (``(classes, D)``, ``model.aam.centres: teacher``) fix the AAM class centres; they
    are not trained.
    """

    name = "train ecapa"
    rng_name = "sampler"

    def __init__(self, data: TrainingData, params: ModelParams, *, centres: torch.Tensor | None = None):
        self.params = params
        self.centres = centres
        aug = params.augment
        self.classes = SpeedClasses(len(data.labels), params.speed_pseudo_speakers, aug.speeds)
        self.augmenter = augmenter_for(params, aug.kinds, data.nonspeech)
        self.sampler = CropSampler(
            data, self.augmenter.source_samples, np.random.default_rng(params.seed), balance_groups(data, params)
        )
        self.rng = self.sampler.rng
        self.queue = self.sampler.speakers

    def build(self, cfg: EcapaConfig | MoeConfig, device: torch.device) -> dict[str, torch.nn.Module]:
        head = AAMHead(cfg.lin_neurons, self.classes.count, margin=self.params.aam.margin, scale=self.params.aam.scale)
        if self.centres is not None:
            head.fix_centres(self.centres)
        self.head = head.to(device).train()
        return {"head": self.head}

    def batch(self, batch_size: int, noise: torch.Generator) -> Batch:
        wavs, speakers = self.sampler.batch(batch_size)
        wavs, speeds = self.augmenter.apply(wavs, noise)
        return Batch(wavs, self.classes.targets(speakers, speeds))

    def loss(self, embeddings: torch.Tensor, batch: Batch) -> StepLoss:
        loss, cosines = self.head(embeddings, batch.targets)
        return StepLoss(loss, cosines)


def augmenter_for(params: ModelParams, kinds: list[str], nonspeech: np.ndarray | None) -> Augmenter:
    """The :class:`Augmenter` of ``kinds`` with every other ``model.augment`` setting, on crops of
    ``model.crop_s``."""
    aug = params.augment
    return Augmenter(
        kinds,
        int(round(params.crop_s * audio.TARGET_SR)),
        nonspeech,
        aug.speeds,
        min_crop_s=aug.min_crop_s,
        telephone_share=aug.telephone_share,
    )


def student_augmentations(kinds: list[str]) -> list[str]:
    """``model.augment.kinds`` minus ``speed``: a speed-perturbed crop moves pitch and formants, so the
    clean teacher embedding of the unperturbed crop would no longer be the right target for it."""
    if "speed" in kinds:
        log.info("init=distill: 'speed' augmentation skipped (the cached teacher targets are of unperturbed crops)")
    return [k for k in kinds if k != "speed"]


class DistillObjective(Objective):
    """``(1 - cos(student, teacher)) + model.distill.aam_weight x AAM`` over the cached teacher crops.

    Batches are speaker-balanced (each speaker once per pass, as in AAM training), with a uniformly
    random cached crop of that speaker. When the student's ``lin_neurons`` differs from the
    teacher's dimension, a linear projection maps student to teacher space for the loss only; it is
    not part of the saved model. The AAM head is always trained and saved as the classifier (so
    SpeechBrain's ``classify_batch`` is meaningful); with ``aam_weight == 0`` it sees detached
    embeddings, so it learns the speakers without shaping the student.
    """

    name = "distill ecapa"
    rng_name = "rows"
    metrics = ("cosine",)

    def __init__(self, data: TrainingData, cache: TeacherCache, params: ModelParams):
        self.params = params
        self.data = data
        self.cache = cache
        self.crop = int(round(params.crop_s * audio.TARGET_SR))
        self.teacher = torch.tensor(cache.embeddings)  # a copy: arrays read from Parquet are read-only
        self.rows_by_speaker = [np.flatnonzero(cache.speaker == s) for s in range(len(data.labels))]
        self.rng = np.random.default_rng(params.seed)
        self.augmenter = augmenter_for(params, student_augmentations(params.augment.kinds), data.nonspeech)
        self.queue = SpeakerQueue(len(data.labels), self.rng, balance_groups(data, params))
        self.aam_weight = params.distill.aam_weight
        self.project: torch.nn.Module | None = None

    def build(self, cfg: EcapaConfig | MoeConfig, device: torch.device) -> dict[str, torch.nn.Module]:
        aam = self.params.aam
        self.head = AAMHead(cfg.lin_neurons, len(self.data.labels), margin=aam.margin, scale=aam.scale).to(device)
        teacher_dim = self.teacher.shape[1]
        if teacher_dim != cfg.lin_neurons:
            self.project = torch.nn.Linear(cfg.lin_neurons, teacher_dim).to(device)
        return {"head": self.head, **({"project": self.project} if self.project is not None else {})}

    def batch(self, batch_size: int, noise: torch.Generator) -> Batch:
        cache, clips = self.cache, self.data.clips
        speakers = self.queue.take(batch_size)
        rows = [int(self.rng.choice(self.rows_by_speaker[s])) for s in speakers]
        wavs = torch.from_numpy(
            np.stack(
                [crop_audio(clips[cache.speaker[r]][cache.segment[r]], int(cache.offset[r]), self.crop) for r in rows]
            )
        )
        wavs = self.augmenter(wavs, noise)  # the teacher's target stays clean
        return Batch(wavs, torch.tensor(speakers, dtype=torch.long), teacher=self.teacher[rows])

    def loss(self, embeddings: torch.Tensor, batch: Batch) -> StepLoss:
        assert batch.teacher is not None
        emb = embeddings.squeeze(1).float()
        student = self.project(emb) if self.project is not None else emb
        cosine = F.cosine_similarity(student, batch.teacher, dim=1).mean()
        loss = 1.0 - cosine
        use_aam = self.aam_weight > 0
        aam, cosines = self.head(emb if use_aam else emb.detach(), batch.targets)
        return StepLoss(
            loss + self.aam_weight * aam, cosines, metrics={"cosine": cosine}, head_only=None if use_aam else aam
        )


def balance_groups(data: TrainingData, params: ModelParams) -> list[list[int]] | None:
    """The speaker groups batches are balanced over (``model.balance: sources``); None: by speakers."""
    return data.source_groups() if params.balance == "sources" else None
