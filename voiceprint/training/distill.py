"""The teacher cache of ``model.init: distill``: fixed crops of the train split and CAM++'s embeddings of them.

:func:`build_teacher_cache` draws ``model.distill.crops_per_segment`` crops per training segment
deterministically, embeds them once with CAM++ and stores them under ``data/teacher_cache/``;
:class:`voiceprint.training.objectives.DistillObjective` trains towards them.
Design: docs/design/training.md#the-distillation-cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from voiceprint.common import audio, schema
from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.config import ModelParams
from voiceprint.encoders.campplus import campplus_weights_path, load_campplus, sha256_file
from voiceprint.training.data import TrainingData

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
    cyclically from there, as :class:`voiceprint.training.data.CropSampler` does); ``embeddings`` is
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
        "crops_per_segment": params.distill.crops_per_segment,
        "seed": params.seed,
        "segments": [
            [sid, round(start, 4), len(clip)]
            for ids, starts, clips in zip(data.segment_ids, data.segment_starts, data.clips)
            for sid, start, clip in zip(ids, starts, clips)
        ],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return layout.data / "teacher_cache" / f"campplus-{weights_sha256[:12]}-{digest}.parquet"


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
            offsets = crop_offsets(
                data.segment_ids[s][j], len(clip), crop, params.distill.crops_per_segment, params.seed
            )
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
                path,
                str(meta.get("teacher_model_id", "")),
                speaker,
                segment,
                offset,
                schema.embeddings_matrix(table),
                reused=True,
            )
        log.warning("teacher cache %s does not match the training crops; recomputing it", path)

    teacher = load_campplus(weights, device=device)
    embeddings: list[np.ndarray] = []
    bar = tqdm(
        range(0, len(rows), TEACHER_BATCH), desc="teacher crops", unit="batch", disable=not progress, leave=False
    )
    for i in bar:
        chunk = range(i, min(i + TEACHER_BATCH, len(rows)))
        wavs = torch.from_numpy(
            np.stack([crop_audio(data.clips[speaker[r]][segment[r]], int(offset[r]), crop) for r in chunk])
        )
        emb = teacher.embed(wavs, torch.ones(len(chunk)))
        embeddings.append(F.normalize(emb, dim=1).cpu().numpy().astype(np.float32))
    emb = np.concatenate(embeddings) if embeddings else np.zeros((0, teacher.dim), np.float32)

    starts = np.array([data.segment_starts[s][j] for s, j in zip(speaker, segment)]) + offset / audio.TARGET_SR
    seg_ends = np.array(
        [data.segment_starts[s][j] + len(data.clips[s][j]) / audio.TARGET_SR for s, j in zip(speaker, segment)]
    )
    meta = {
        "teacher_model_id": teacher.model_id,
        "crop_s": params.crop_s,
        "crops_per_segment": params.distill.crops_per_segment,
        "seed": params.seed,
        "version": CACHE_VERSION,
    }
    table = pa.table(
        {
            "segment_id": pa.array([data.segment_ids[s][j] for s, j in zip(speaker, segment)], pa.string()),
            "speaker_id": pa.array([data.labels[s] for s in speaker], pa.string()),
            "crop": pa.array(
                np.tile(np.arange(params.distill.crops_per_segment), len(rows) // params.distill.crops_per_segment),
                pa.int16(),
            ),
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
