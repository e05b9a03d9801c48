"""``model.init: distill``: train the ECAPA-TDNN student to reproduce the bundled CAM++ teacher.

CAM++ (:mod:`voiceprint.encoders.campplus`, trained on ~200k speakers) separates our speakers far
better than an ECAPA trained from scratch on 251 one-utterance speakers can, but it is a foreign
architecture. Distillation keeps the pipeline's own artefact, a plain SpeechBrain-layout
ECAPA-TDNN that :func:`~voiceprint.encoders.ecapa.load_ecapa` and SpeechBrain's
``EncoderClassifier`` load unchanged, while borrowing the teacher's notion of speaker similarity:
the student is trained to point its embedding in the teacher's direction (``1 - cos``), optionally
plus AAM-softmax on the speaker labels (``distill_aam_weight``).

Why a cache of fixed crops: the teacher is several times more expensive per second than the small
student, and its input never changes (its targets are embeddings of *clean* audio). So for every
training segment ``distill_crops_per_segment`` crops of ``crop_s`` are drawn once, deterministically
from the seed and the segment id, embedded once, and stored in Parquet under
``data/teacher_cache/``; a training step then costs student time only, and a rerun with the same
data and crop settings skips the teacher altogether (it is not even loaded). Augmentation (noise,
gain, recorded non-speech, reverberation; :mod:`voiceprint.augment`) is applied to the student's input only while the target
stays the clean teacher embedding: that is what teaches the student to ignore recording conditions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from voiceprint import audio, schema
from voiceprint.atomic import write_table
from voiceprint.augment import Augmenter
from voiceprint.config import ModelParams
from voiceprint.encoders.aam import AAMHead
from voiceprint.encoders.campplus import campplus_weights_path, load_campplus, sha256_file
from voiceprint.encoders.ecapa import EcapaConfig
from voiceprint.encoders.moe import MoeConfig
from voiceprint.layout import Layout
from voiceprint.precision import training_autocast_dtype
from voiceprint.train import (
    GRAD_CLIP,
    WARMUP_FRACTION,
    Resumable,
    SpeakerQueue,
    StepCallback,
    TrainingData,
    TrainState,
    _mean,
    _seed_everything,
    aam_margin_at,
    add_gate_balance,
    architecture,
    load_training_data,
    lr_factor,
    report_step,
    resolve_device,
    resume_run,
    save_trained_model,
    summarise_training,
)

log = logging.getLogger(__name__)

# Bump when the cache's layout or crop placement changes, so old files are never misread.
CACHE_VERSION = 1
# Crops per teacher forward: all crops have the same length, so a batch needs no padding.
TEACHER_BATCH = 64
_META_KEY = b"voiceprint.teacher_cache"


@dataclass(frozen=True)
class TeacherCache:
    """Fixed crops of the training segments and their teacher embeddings, row-aligned.

    ``speaker[i]`` / ``segment[i]`` index ``TrainingData.clips[speaker][segment]``; ``offset[i]``
    is the crop's first sample within that segment (segments shorter than the crop are tiled
    cyclically from there, as :class:`voiceprint.train.CropSampler` does); ``embeddings`` is
    ``(N, D)`` float32, L2-normalised.
    """

    path: Path
    teacher_model_id: str
    speaker: np.ndarray
    segment: np.ndarray
    offset: np.ndarray
    embeddings: np.ndarray
    reused: bool

    def __len__(self) -> int:
        return len(self.offset)


# --------------------------------------------------------------------------------------------------
# Teacher cache


def cache_path(layout: Layout, data: TrainingData, params: ModelParams, weights_sha256: str) -> Path:
    """``data/teacher_cache/campplus-<weights sha>-<hash of data + crop settings>.parquet``.

    The hash covers everything the cached rows depend on (which segments, where they start and how
    long they are, crop length, crops per segment, seed), so a changed segments table or crop
    setting gets a fresh file instead of silently reusing stale targets.
    """
    key = {
        "version": CACHE_VERSION,
        "sample_rate": audio.TARGET_SR,
        "crop_s": params.crop_s,
        "crops_per_segment": params.distill_crops_per_segment,
        "seed": params.seed,
        "segments": [
            [sid, round(start, 4), len(clip)]
            for ids, starts, clips in zip(data.segment_ids, data.segment_starts, data.clips)
            for sid, start, clip in zip(ids, starts, clips)
        ],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return layout.data / "teacher_cache" / f"campplus-{weights_sha256[:12]}-{digest}.parquet"


def student_augmentations(kinds: list[str]) -> list[str]:
    """``model.augment`` minus ``speed``: a speed-perturbed crop moves pitch and formants, so the clean
    teacher embedding of the unperturbed crop would no longer be the right target for it."""
    if "speed" in kinds:
        log.info("init=distill: 'speed' augmentation skipped (the cached teacher targets are of unperturbed crops)")
    return [k for k in kinds if k != "speed"]


def crop_offsets(segment_id: str, n_samples: int, crop: int, k: int, seed: int) -> list[int]:
    """``k`` crop start samples for one segment, deterministic from ``seed`` and the segment id.

    Starts are stratified (one uniform draw in each of ``k`` equal slices of the valid range) so the
    crops cover the segment instead of clustering; keyed by id, not position, so adding a segment
    does not move every other segment's crops. Segments no longer than the crop get cyclic shifts.
    """
    rng = np.random.default_rng([seed, zlib.crc32(segment_id.encode())])
    span = n_samples - crop + 1 if n_samples > crop else n_samples
    edges = np.linspace(0, span, k + 1)
    return [int(min(span - 1, lo + rng.random() * (hi - lo))) for lo, hi in zip(edges[:-1], edges[1:])]


def crop_audio(clip: np.ndarray, offset: int, crop: int) -> np.ndarray:
    """The ``crop`` samples of ``clip`` from ``offset``; short clips are tiled cyclically."""
    if len(clip) <= crop:
        return np.resize(np.roll(clip, -offset), crop)
    return clip[offset : offset + crop]


def build_teacher_cache(
    layout: Layout,
    data: TrainingData,
    params: ModelParams,
    *,
    device: torch.device,
    progress: bool = True,
) -> TeacherCache:
    """Load the cache for these segments and settings, or embed the crops with CAM++ and write it."""
    weights = campplus_weights_path()
    path = cache_path(layout, data, params, sha256_file(weights))
    crop = int(round(params.crop_s * audio.TARGET_SR))

    rows: list[tuple[int, int, int]] = []  # (speaker, segment, offset)
    for s, clips in enumerate(data.clips):
        for j, clip in enumerate(clips):
            offsets = crop_offsets(data.segment_ids[s][j], len(clip), crop, params.distill_crops_per_segment, params.seed)
            rows.extend((s, j, o) for o in offsets)
    speaker = np.array([r[0] for r in rows], dtype=np.int64)
    segment = np.array([r[1] for r in rows], dtype=np.int64)
    offset = np.array([r[2] for r in rows], dtype=np.int64)

    if path.exists():
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
        ids = [data.segment_ids[s][j] for s, j in zip(speaker, segment)]
        if (
            table.num_rows == len(rows)
            and table.column("segment_id").to_pylist() == ids
            and np.array_equal(table.column("offset").to_numpy(), offset)
        ):
            log.info("reusing teacher cache %s (%d crops)", path, len(rows))
            return TeacherCache(
                path, str(meta.get("teacher_model_id", "")), speaker, segment, offset,
                schema.embeddings_matrix(table), reused=True,
            )
        log.warning("teacher cache %s does not match the training crops; recomputing it", path)

    teacher = load_campplus(weights, device=device)
    embeddings: list[np.ndarray] = []
    bar = tqdm(range(0, len(rows), TEACHER_BATCH), desc="teacher crops", unit="batch", disable=not progress, leave=False)
    for i in bar:
        chunk = range(i, min(i + TEACHER_BATCH, len(rows)))
        wavs = torch.from_numpy(np.stack([crop_audio(data.clips[speaker[r]][segment[r]], int(offset[r]), crop) for r in chunk]))
        emb = teacher.embed(wavs, torch.ones(len(chunk)))
        embeddings.append(F.normalize(emb, dim=1).cpu().numpy().astype(np.float32))
    emb = np.concatenate(embeddings) if embeddings else np.zeros((0, teacher.dim), np.float32)

    starts = np.array([data.segment_starts[s][j] for s, j in zip(speaker, segment)]) + offset / audio.TARGET_SR
    seg_ends = np.array([data.segment_starts[s][j] + len(data.clips[s][j]) / audio.TARGET_SR for s, j in zip(speaker, segment)])
    meta = {
        "teacher_model_id": teacher.model_id,
        "crop_s": params.crop_s,
        "crops_per_segment": params.distill_crops_per_segment,
        "seed": params.seed,
        "version": CACHE_VERSION,
    }
    table = pa.table(
        {
            "segment_id": pa.array([data.segment_ids[s][j] for s, j in zip(speaker, segment)], pa.string()),
            "speaker_id": pa.array([data.labels[s] for s in speaker], pa.string()),
            "crop": pa.array(np.tile(np.arange(params.distill_crops_per_segment), len(rows) // params.distill_crops_per_segment), pa.int16()),
            "offset": pa.array(offset, pa.int64()),
            "start_s": pa.array(starts, pa.float64()),
            # A segment shorter than the crop is tiled, so its crop ends where the segment does.
            "end_s": pa.array(np.minimum(starts + params.crop_s, seg_ends), pa.float64()),
            "embedding": schema.embedding_column(emb),
        }
    ).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    write_table(path, table)
    log.info("wrote teacher cache %s (%d crops of %.1f s)", path, len(rows), params.crop_s)
    return TeacherCache(path, teacher.model_id, speaker, segment, offset, emb, reused=False)


# --------------------------------------------------------------------------------------------------
# Training


def train_distill(
    params: ModelParams, layout: Layout, *, progress: bool = True, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """Distil CAM++ into an ECAPA-TDNN (``channels=[C,C,C,C,3C]``) on the train split's crops.

    Returns train_scratch's stats (``loss_*`` is the combined loss) plus ``teacher_model_id``,
    ``teacher_cache`` (path), ``teacher_cache_reused``, ``teacher_seconds`` and
    ``cosine_initial``/``cosine_final``: the mean student-teacher cosine over the first/last window
    of steps (on augmented student input). Snapshots and resuming work as in scratch training
    (:class:`voiceprint.train.TrainState`; the teacher cache is part of the resume key).
    """
    t0 = time.perf_counter()
    _seed_everything(params.seed)
    device = resolve_device(params.device)
    data = load_training_data(layout, seed=params.seed, progress=progress, nonspeech="nonspeech" in params.augment)
    decode_s = time.perf_counter() - t0
    cache = build_teacher_cache(layout, data, params, device=device, progress=progress)
    teacher_s = time.perf_counter() - t0 - decode_s

    cfg = architecture(params)
    state = TrainState.for_run(layout, params, data, device, init="distill", extra={"teacher_cache": cache.path.name})
    model, head, history = _fit(
        data, cache, params, cfg, device=device, progress=progress, on_step=on_step, state=state
    )
    train_s = time.perf_counter() - t0 - decode_s - teacher_s

    stats = summarise_training("distill", params, cfg, model, data, history)
    stats.update(teacher_model_id=cache.teacher_model_id, teacher_crops=len(cache))
    card_stats = dict(stats)
    stats.update(
        device=str(device),
        teacher_cache=str(cache.path),
        teacher_cache_reused=cache.reused,
        decode_seconds=round(decode_s, 2),
        teacher_seconds=round(teacher_s, 2),
        train_seconds=round(train_s, 2),
        seconds_per_step=round(train_s / params.steps, 4) if params.steps else None,
        resumed_from_step=state.resumed_from,
    )
    stats["model_id"] = save_trained_model(layout, params, cfg, model, head, data, card_stats)
    state.clear()  # the model is written: nothing left to resume
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    log.info(
        "distilled %s from %s: %d steps, cosine %.3f -> %.3f, %.1f s (teacher %.1f s%s)",
        stats["model_id"], cache.teacher_model_id, params.steps, stats["cosine_initial"] or 0.0,
        stats["cosine_final"] or 0.0, stats["seconds"], teacher_s, ", cached" if cache.reused else "",
    )
    return stats


def _fit(
    data: TrainingData,
    cache: TeacherCache,
    params: ModelParams,
    cfg: EcapaConfig | MoeConfig,
    *,
    device: torch.device,
    progress: bool = True,
    on_step: StepCallback | None = None,
    state: TrainState | None = None,
) -> tuple[torch.nn.Module, AAMHead, dict[str, list[float]]]:
    """``params.steps`` steps of ``(1 - cos(student, teacher)) + distill_aam_weight * AAM``.

    Batches are speaker-balanced (each speaker once per pass, as in scratch training), with a
    uniformly random cached crop of that speaker. When the student's ``lin_neurons`` differs from
    the teacher's dimension, a linear projection maps student to teacher space for the loss only;
    it is not part of the saved model. The AAM head is always trained and saved as the classifier
    (so SpeechBrain's ``classify_batch`` is meaningful); with ``distill_aam_weight == 0`` it sees
    detached embeddings, so it learns the speakers without shaping the student.
    """
    torch.manual_seed(params.seed)  # model init is part of the seeded run
    model = cfg.build().to(device).train()
    head = AAMHead(cfg.lin_neurons, len(data.labels), margin=params.aam_margin, scale=params.aam_scale).to(device)
    teacher_dim = cache.embeddings.shape[1]
    project = None if teacher_dim == cfg.lin_neurons else torch.nn.Linear(cfg.lin_neurons, teacher_dim).to(device)
    fbank = cfg.build_fbank().to(device)
    norm = cfg.build_norm().to(device)

    use_aam = params.distill_aam_weight > 0
    trainable = [*model.parameters(), *head.parameters()]
    trainable += [*project.parameters()] if project is not None else []
    optimizer = torch.optim.Adam(trainable, lr=params.lr, weight_decay=params.weight_decay)
    warmup = max(1, round(WARMUP_FRACTION * params.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, params.steps, warmup))

    crop = int(round(params.crop_s * audio.TARGET_SR))
    targets_all = torch.tensor(cache.embeddings)  # a copy: arrays read from Parquet are read-only
    rows_by_speaker = [np.flatnonzero(cache.speaker == s) for s in range(len(data.labels))]
    rng = np.random.default_rng(params.seed)
    noise_gen = torch.Generator().manual_seed(params.seed + 1)
    augmenter = Augmenter(student_augmentations(params.augment), crop, data.nonspeech)
    amp_dtype = training_autocast_dtype(device, params.amp)
    queue = SpeakerQueue(len(data.labels), rng)
    history: dict[str, list[float]] = {"loss": [], "cosine": [], "acc": []}
    modules = {"model": model, "head": head, **({"project": project} if project is not None else {})}
    parts = Resumable(
        modules=modules,
        optimizer=optimizer,
        scheduler=scheduler,
        generators={"rows": rng},
        torch_generators={"noise": noise_gen},
        history=history,
    )
    start = resume_run(state, parts, queue)

    bar = tqdm(range(start, params.steps), initial=start, total=params.steps, desc="distill ecapa", unit="step",
               disable=not progress)
    for step in bar:
        lr = optimizer.param_groups[0]["lr"]
        head.set_margin(aam_margin_at(step, params))
        speakers = queue.take(params.batch_size)
        rows = [int(rng.choice(rows_by_speaker[s])) for s in speakers]
        wavs = torch.from_numpy(
            np.stack([crop_audio(data.clips[cache.speaker[r]][cache.segment[r]], int(cache.offset[r]), crop) for r in rows])
        )
        wavs = augmenter(wavs, noise_gen).to(device, non_blocking=True)  # the teacher target stays clean
        teacher = targets_all[rows].to(device, non_blocking=True)
        labels = torch.tensor(speakers, dtype=torch.long, device=device)
        lengths = torch.ones(wavs.shape[0], device=device)
        with torch.no_grad():
            feats = augmenter.features(norm(fbank(wavs), lengths), noise_gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp_dtype is not None):
            emb = model(feats, lengths).squeeze(1)
        emb = emb.float()
        student = project(emb) if project is not None else emb
        cosine = F.cosine_similarity(student, teacher, dim=1).mean()
        loss = 1.0 - cosine
        aam, cosines = head(emb if use_aam else emb.detach(), labels)
        loss = add_gate_balance(loss + params.distill_aam_weight * aam, model, params, history)  # the student's objective (logged)
        total = loss if use_aam else loss + aam  # with weight 0, AAM reaches the head only

        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        scheduler.step()

        history["loss"].append(float(loss.detach()))
        history["cosine"].append(float(cosine.detach()))
        history["acc"].append(float((cosines.argmax(dim=1) == labels).float().mean()))
        if state is not None:
            state.step_done(step + 1, params.steps, parts, extra=lambda: {"queue": list(queue.pending)})
        report_step(on_step, step + 1, params, history, lr, loss="loss", cosine="cosine", acc="acc")
        if progress:
            bar.set_postfix(
                cos=f"{_mean(history['cosine'][-10:]):.3f}",
                loss=f"{_mean(history['loss'][-10:]):.3f}",
                lr=f"{scheduler.get_last_lr()[0]:.1e}",
            )
    return model, head, history
