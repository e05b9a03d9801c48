"""``model.aam.centres: teacher``: AAM-softmax class centres fixed at the CAM++ teacher's embeddings.

:func:`teacher_centres` embeds each class's training speech (played at the class's speed) with the
bundled CAM++ and caches the centres in ``data/teacher_cache/``, so a rerun skips the teacher.
Design: docs/design/training.md#teacher-class-centres.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from tqdm.auto import tqdm

from voiceprint.common import audio
from voiceprint.common.atomic import write_table
from voiceprint.common.layout import Layout
from voiceprint.common.precision import dtype_name
from voiceprint.common.schema import embedding_column, embeddings_matrix
from voiceprint.encoders.campplus import campplus_weights_path, load_campplus, sha256_file

log = logging.getLogger(__name__)

# Bump when what a cached centre is computed from changes, so an old file is never misread.
CENTRES_VERSION = 1
_META_KEY = b"voiceprint.teacher_centres"  # a file format key: unchanged by module moves
# Classes per teacher forward (padded to the longest; sorted by length, so little padding).
TEACHER_BATCH = 16


@dataclass(frozen=True)
class TeacherCentres:
    """One L2-normalised teacher embedding per AAM class, ``(n_classes, D)`` float32.

    ``precision`` names the type the teacher's network ran under ('float32', 'bfloat16', ...); it is
    part of the cache key, so a reused file always carries the precision it was asked for.
    """

    path: Path
    teacher_model_id: str
    centres: torch.Tensor
    reused: bool
    seconds: float
    precision: str


def speech_excerpt(clips: list[np.ndarray], max_samples: int) -> np.ndarray:
    """The speaker's segments concatenated in order, cut to ``max_samples``."""
    out: list[np.ndarray] = []
    remaining = max_samples
    for clip in clips:
        if remaining <= 0:
            break
        out.append(clip[:remaining])
        remaining -= len(out[-1])
    return np.concatenate(out).astype(np.float32, copy=False)


def played_at(wav: torch.Tensor, speed: float) -> torch.Tensor:
    """``wav`` played ``speed`` times faster, pitch and formants moved with it: the same resampling
    as :func:`voiceprint.training.augment.speed_perturb`, so a centre matches the crops of its class."""
    return wav if speed == 1.0 else AF.resample(wav, orig_freq=round(100 * speed), new_freq=100)


def cache_path(
    layout: Layout,
    segment_ids: list[list[str]],
    excerpts: list[np.ndarray],
    classes: list[tuple[int, float]],
    centre_s: float,
    weights_sha256: str,
    precision: torch.dtype | None = None,
) -> Path:
    """``data/teacher_cache/centres-campplus-<weights sha>-<hash of the audio, classes and settings>.parquet``.

    The hash covers the very samples the teacher embeds, so a re-segmented or re-decoded train
    split gets fresh centres instead of stale ones.
    """
    key = {
        "version": CENTRES_VERSION,
        "sample_rate": audio.TARGET_SR,
        "centre_s": centre_s,
        "classes": classes,
        "segment_ids": segment_ids,
    }
    if precision is not None:  # absent for float32, so caches written before this option stay valid
        key["precision"] = dtype_name(precision)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for excerpt in excerpts:
        h.update(len(excerpt).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(excerpt, dtype=np.float32).tobytes())
    return layout.data / "teacher_cache" / f"centres-campplus-{weights_sha256[:12]}-{h.hexdigest()[:12]}.parquet"


def teacher_centres(
    layout: Layout,
    labels: list[str],
    segment_ids: list[list[str]],
    clips: list[list[np.ndarray]],
    classes: list[tuple[int, float]],
    *,
    dim: int,
    centre_s: float,
    device: torch.device,
    precision: torch.dtype | None = None,
    progress: bool = True,
) -> TeacherCentres:
    """The teacher's centre of every AAM class (read from the cache when it matches, else computed).

    ``classes[c]`` is the ``(speaker index, speed)`` of class ``c``
    (:meth:`voiceprint.training.data.SpeedClasses.members`). ``dim`` is the student's embedding size; a
    teacher of another size is a :class:`TeacherSizeError` before any audio goes through it.
    ``precision`` is the autocast type the teacher's network runs under (None: float32); its
    features stay float32 either way. bf16 took 753 classes of 10 s from 114 s to 89 s on a 2-core
    AMX CPU, and CAM++'s bf16 embeddings are within cosine 0.996 of float32 ones.
    """
    t0 = time.perf_counter()
    precision_name = dtype_name(precision)
    weights = campplus_weights_path()
    excerpts = [speech_excerpt(c, int(round(centre_s * audio.TARGET_SR))) for c in clips]
    path = cache_path(layout, segment_ids, excerpts, classes, centre_s, sha256_file(weights), precision)
    if path.exists():
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
        if table.num_rows == len(classes) and table.column("speaker_id").to_pylist() == [labels[s] for s, _ in classes]:
            emb = embeddings_matrix(table)
            _check_dim(emb.shape[1], dim)
            log.info("reusing teacher centres %s (%d classes)", path, len(classes))
            return TeacherCentres(
                path,
                str(meta.get("teacher_model_id", "")),
                torch.tensor(emb),
                reused=True,
                seconds=round(time.perf_counter() - t0, 2),
                precision=precision_name,
            )
        log.warning("teacher centres %s do not match the training classes; recomputing them", path)

    teacher = load_campplus(weights, device=device)
    _check_dim(teacher.dim, dim)
    waves = [torch.from_numpy(e) for e in excerpts]
    # Similar lengths batched together, CAM++'s masks keeping the padding out of the result. On a
    # 2-core AMX CPU in bf16, 1,800 classes of 4 s took 97 s four per forward and 65 s sixteen per
    # forward (centres within cosine 0.9999996 of each other); one per forward was slower still.
    order = sorted(range(len(classes)), key=lambda c: len(waves[classes[c][0]]) / classes[c][1])
    rows: list[torch.Tensor | None] = [None] * len(classes)
    batches = [order[i : i + TEACHER_BATCH] for i in range(0, len(order), TEACHER_BATCH)]
    for batch in tqdm(batches, desc="teacher centres", unit="batch", disable=not progress, leave=False):
        played = [played_at(waves[classes[c][0]].unsqueeze(0), classes[c][1])[0] for c in batch]
        longest = max(len(w) for w in played)
        wavs = torch.stack([F.pad(w, (0, longest - len(w))) for w in played])
        lengths = torch.tensor([len(w) / longest for w in played])
        with torch.autocast(device_type=device.type, dtype=precision or torch.float32, enabled=precision is not None):
            embedded = teacher.embed(wavs, lengths)
        for c, emb in zip(batch, F.normalize(embedded.float(), dim=1).cpu()):
            rows[c] = emb
    centres = torch.stack(rows)
    table = pa.table(
        {
            "speaker_id": pa.array([labels[s] for s, _ in classes], pa.string()),
            "speed": pa.array([v for _, v in classes], pa.float64()),
            "embedding": embedding_column(centres.numpy()),
        }
    )
    meta = {"teacher_model_id": teacher.model_id, "centre_s": centre_s, "precision": precision_name}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    write_table(path, table)
    seconds = round(time.perf_counter() - t0, 2)
    log.info("wrote teacher centres %s (%d classes, %.1f s)", path, len(classes), seconds)
    return TeacherCentres(path, teacher.model_id, centres, reused=False, seconds=seconds, precision=precision_name)


class TeacherSizeError(ValueError):
    """The teacher's embedding size is not the student's: its embeddings cannot be class centres."""


def _check_dim(teacher_dim: int, dim: int) -> None:
    if teacher_dim != dim:
        raise TeacherSizeError(f"the teacher's embeddings have {teacher_dim} dimensions, the model's {dim}")
