"""Training data: the decoded train split, the non-speech noise bank, and the samplers that draw batches.

:func:`load_training_data` decodes every train-split segment of ``data/segments.parquet`` once into
memory, grouped by speaker (with a per-speaker subset when the split exceeds
:data:`MAX_TRAIN_AUDIO_HOURS`), and optionally the gaps VAD left between them as a noise bank for
``nonspeech`` augmentation. :class:`SpeakerQueue` makes batches speaker-balanced, :class:`CropSampler`
draws the random crops of AAM-softmax training from it, and :class:`SpeedClasses` maps a crop's
speaker and speed to its AAM class when a changed speed counts as another speaker.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from voiceprint.common import audio
from voiceprint.common.layout import Layout
from voiceprint.common.schema import SEGMENTS
from voiceprint.training.augment import SPEEDS

log = logging.getLogger(__name__)

# Decoded training audio is held in memory as float32 (230 MB per hour); beyond this budget a
# seeded per-speaker subset of segments is used so a large train split cannot exhaust RAM.
MAX_TRAIN_AUDIO_HOURS = 4.0
# Non-speech noise bank for augmentation: gaps between speech segments at least this long, up to
# this much audio in all.
NONSPEECH_MIN_GAP_S = 0.2
NONSPEECH_MAX_S = 600.0


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
    #: ``model.augment.kinds: [nonspeech]``. None when not requested or none was found.
    nonspeech: np.ndarray | None = None
    #: ``sources[i]``: the source of speaker ``i`` (that of its first segment; "" without a manifest
    #: that names sources), for ``model.balance: sources``. Empty for hand-built data.
    sources: list[str] = field(default_factory=list)

    def source_groups(self) -> list[list[int]]:
        """Speaker indices by source, sources in sorted order (one group when none are named)."""
        if not self.sources:
            return [list(range(len(self.labels)))]
        names = sorted(set(self.sources))
        return [[i for i, s in enumerate(self.sources) if s == name] for name in names]

    @property
    def num_segments(self) -> int:
        return sum(len(c) for c in self.clips)

    @property
    def audio_seconds(self) -> float:
        return sum(len(x) for c in self.clips for x in c) / audio.TARGET_SR


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
    rows = cap_hours(rows, max_hours, seed)

    utterance_source = _utterance_sources(layout)
    speaker_source: dict[str, str] = {}
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
            speaker_source.setdefault(speaker, utterance_source.get(str(row["utterance_id"]), ""))
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
        sources=[speaker_source[s] for s in labels],
    )


def _utterance_sources(layout: Layout) -> dict[str, str]:
    """``{utterance_id: source}`` of the manifest's train split (empty without a manifest or sources)."""
    if not layout.manifest.exists() or "source" not in pq.read_schema(layout.manifest).names:
        return {}
    table = pq.read_table(layout.manifest, columns=["utterance_id", "split", "source"])
    table = table.filter(pc.equal(table.column("split"), "train"))
    return dict(zip(table.column("utterance_id").to_pylist(), table.column("source").to_pylist(), strict=True))


def nonspeech_gaps(
    rows: list[dict[str, Any]], min_gap_s: float = NONSPEECH_MIN_GAP_S
) -> list[tuple[str, float, float]]:
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


def cap_hours(rows: list[dict[str, Any]], max_hours: float, seed: int) -> list[dict[str, Any]]:
    """``rows`` if their audio fits in ``max_hours``, else a seeded per-speaker subset that does
    (each speaker gets an equal share of the budget, filled with its segments in shuffled order)."""
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
        total / 3600,
        sum(r["end_s"] - r["start_s"] for r in kept) / 3600,
    )
    return kept


class SpeakerQueue:
    """Speaker indices for balanced batches: every speaker once per pass, each pass in a new order.

    With ``groups`` (speaker indices by source, ``model.balance: sources``) a pass gives every group
    the same share: as many entries per group as the largest group has speakers, each group's
    speakers in a fresh order (cycled where it is smaller), interleaved one per group in a shuffled
    group order. ``pending`` is part of a training snapshot
    (:func:`voiceprint.training.loop.resume_run`), so a resumed run continues the interrupted pass
    instead of starting a new one.
    """

    def __init__(self, n_speakers: int, rng: np.random.Generator, groups: list[list[int]] | None = None):
        self.n_speakers = n_speakers
        self.rng = rng
        nonempty = [list(g) for g in groups or [] if g]
        self.groups = nonempty if len(nonempty) > 1 else None
        self.pending: list[int] = []

    def take(self, k: int) -> list[int]:
        while len(self.pending) < k:
            self.pending.extend(self._pass())
        taken, self.pending = self.pending[:k], self.pending[k:]
        return taken

    def _pass(self) -> list[int]:
        if self.groups is None:
            return self.rng.permutation(self.n_speakers).tolist()
        length = max(len(g) for g in self.groups)
        columns = []
        for group in self.groups:
            order: list[int] = []
            while len(order) < length:
                order.extend(np.asarray(group)[self.rng.permutation(len(group))].tolist())
            columns.append(order[:length])
        out: list[int] = []
        for i in range(length):
            out.extend(columns[g][i] for g in self.rng.permutation(len(columns)).tolist())
        return out


@dataclass(frozen=True)
class SpeedClasses:
    """AAM-softmax classes when a changed speed counts as another speaker (``model.augment.speed_as_speakers``).

    Pitch and formants move with the speed, so to a speaker encoder a crop played at 0.9x sounds
    like someone else. WeSpeaker's recipe trains it as someone else, which multiplies the classes
    of a set with few speakers by the number of speeds. Class ``block * speakers + speaker``,
    block 0 being the unperturbed speed: the first ``speakers`` rows of the head are the real
    speakers, the only ones saved.
    Blocks follow ``speeds`` (``model.augment.speeds``) cyclically from 1.0 (0.9/1.0/1.1: blocks 1.0, 1.1, 0.9).
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
    """Speaker-balanced random crops: every speaker appears once per pass, in shuffled order (or
    source-balanced, with ``groups``: :class:`SpeakerQueue`).

    Within a speaker a segment is picked with probability proportional to its length (so every
    second of audio is equally likely), then a uniformly random ``crop`` samples; shorter segments
    are tiled cyclically rather than zero-padded so the batch needs no length masks.
    """

    def __init__(
        self, data: TrainingData, crop_samples: int, rng: np.random.Generator, groups: list[list[int]] | None = None
    ):
        self.data = data
        self.crop = crop_samples
        self.rng = rng
        self._weights = []
        for clips in data.clips:
            lengths = np.array([len(c) for c in clips], dtype=np.float64)
            self._weights.append(lengths / lengths.sum())
        self.speakers = SpeakerQueue(len(data.labels), rng, groups)

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
