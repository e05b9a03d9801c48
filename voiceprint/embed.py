"""The ``embed`` stage: speech segments in, L2-normalised speaker embeddings out (Parquet).

The engine sorts segments by duration and cuts batches by total padded audio seconds
(``embed.max_batch_s``), so batches carry little padding; decoding and resampling run in a
DataLoader worker process while the model computes. On CUDA the model runs under bf16/fp16
autocast with pinned, non-blocking host-to-device copies. Segment rows stream to Parquet in row
groups; only per-utterance running sums are kept in memory for the utterance-level embeddings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from voiceprint import atomic, audio, schema
from voiceprint.config import EmbedParams
from voiceprint.encoders.base import SpeakerEncoder
from voiceprint.layout import Layout

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def length_buckets(durations: np.ndarray, max_batch_s: float) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, each with padded size <= max_batch_s.

    Sorting by duration means a batch's padded size is its longest member times its count; a
    segment longer than the cap still gets a batch of its own.
    """
    order = np.argsort(durations, kind="stable")
    batches: list[np.ndarray] = []
    current: list[int] = []
    for idx in order:
        longest = durations[idx]  # ascending order: the newest member is the longest
        if current and longest * (len(current) + 1) > max_batch_s:
            batches.append(np.asarray(current))
            current = []
        current.append(int(idx))
    if current:
        batches.append(np.asarray(current))
    return batches


@dataclass(frozen=True)
class _Item:
    path: Path
    start_s: float
    end_s: float


class _SegmentAudio(Dataset):
    def __init__(self, items: list[_Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        item = self.items[i]
        try:
            return i, audio.load(item.path, item.start_s, item.end_s), None
        except audio.AudioError as err:
            return i, None, err.reason


def _collate(batch: list[tuple[int, np.ndarray | None, str | None]]):
    good = [(i, w) for i, w, _ in batch if w is not None]
    bad = [(i, reason) for i, w, reason in batch if w is None]
    if not good:
        return [], None, None, bad
    longest = max(len(w) for _, w in good)
    wavs = torch.zeros(len(good), longest)
    for row, (_, w) in enumerate(good):
        wavs[row, : len(w)] = torch.from_numpy(w)
    lengths = torch.tensor([len(w) / longest for _, w in good], dtype=torch.float32)
    return [i for i, _ in good], wavs, lengths, bad


def run_encoder(
    encoder: SpeakerEncoder,
    items: list[_Item],
    durations: np.ndarray,
    params: EmbedParams,
    *,
    progress: bool = True,
    num_workers: int = 1,
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Yield ``(item indices, normalised embeddings, rejected (index, reason))`` batch by batch."""
    device = encoder.device
    cuda = device.type == "cuda"
    batches = length_buckets(durations, params.max_batch_s)
    loader = DataLoader(
        _SegmentAudio(items),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=cuda,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    bar = tqdm(total=float(durations.sum()), desc="embed", unit="audio-s", disable=not progress or None,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]")
    with torch.inference_mode():
        for idx, wavs, lengths, bad in loader:
            if idx:
                wavs = wavs.to(device, non_blocking=True)
                lengths = lengths.to(device, non_blocking=True)
                with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=cuda and params.amp):
                    emb = encoder.embed(wavs, lengths)
                vectors = schema.l2_normalise(emb.float().cpu().numpy())
            else:
                vectors = np.zeros((0, encoder.dim), dtype=np.float32)
            bar.update(float(durations[idx].sum()) + float(durations[[i for i, _ in bad]].sum()))
            yield idx, vectors, bad
    bar.close()


def load_pipeline_encoder(layout: Layout, device: torch.device) -> SpeakerEncoder:
    from voiceprint.encoders.registry import load_encoder

    return load_encoder("ecapa", model_dir=layout.model_dir, device=str(device))


def embed_segments(
    layout: Layout,
    params: EmbedParams,
    *,
    encoder: SpeakerEncoder | None = None,
    progress: bool = True,
    rows_per_group: int = 4096,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Embed every row of ``layout.segments`` into ``out_dir`` (default ``data/embeddings``).

    ``segments.parquet`` (one row per segment), ``utterances.parquet`` (mean per utterance) and
    ``rejects.parquet`` are written there; the comparison stage passes its own directory and encoder.
    """
    out_dir = Path(out_dir) if out_dir is not None else layout.embeddings
    device = pick_device(params.device) if encoder is None else encoder.device
    encoder = encoder or load_pipeline_encoder(layout, device)
    segments = pq.read_table(layout.segments)
    seg = segments.to_pydict()
    n = segments.num_rows
    items = [_Item(layout.resolve(p), s, e) for p, s, e in zip(seg["path"], seg["start_s"], seg["end_s"])]
    durations = np.asarray(seg["end_s"], dtype=np.float64) - np.asarray(seg["start_s"], dtype=np.float64)

    seg_schema = schema.embedding_schema(encoder.dim)
    utt_sums: dict[str, np.ndarray] = {}
    utt_meta: dict[str, dict[str, Any]] = {}
    rejects: list[dict[str, str]] = []
    started = time.perf_counter()
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out_dir / layout.segment_embeddings.name, suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp, seg_schema) as writer:
            for idx, vectors, bad in run_encoder(encoder, items, durations, params, progress=progress):
                for i, reason in bad:
                    rejects.append({"path": seg["path"][i], "stage": "embed", "reason": reason})
                if not idx:
                    continue
                pending.append(_segment_batch(seg, idx, vectors, encoder.model_id, seg_schema))
                pending_rows += len(idx)
                for row, i in enumerate(idx):
                    _accumulate(utt_sums, utt_meta, seg, i, vectors[row])
                if pending_rows >= rows_per_group:
                    writer.write_table(pa.Table.from_batches(pending, seg_schema))
                    pending, pending_rows = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending, seg_schema))
    elapsed = time.perf_counter() - started

    utterances = _utterance_table(utt_sums, utt_meta, encoder)
    atomic.write_table(out_dir / layout.utterance_embeddings.name, utterances)
    atomic.write_table(out_dir / "rejects.parquet", pa.Table.from_pylist(rejects, schema=schema.REJECTS))
    audio_s = float(durations.sum())
    return {
        "segments": n - len(rejects),
        "utterances": utterances.num_rows,
        "rejected": len(rejects),
        "dim": encoder.dim,
        "model_id": encoder.model_id,
        "device": str(device),
        "audio_s": round(audio_s, 2),
        "seconds": round(elapsed, 2),
        "realtime_factor": round(audio_s / elapsed, 1) if elapsed > 0 else None,
    }


def _segment_batch(seg: dict[str, list], idx: list[int], vectors: np.ndarray, model_id: str, sch: pa.Schema) -> pa.RecordBatch:
    cols = {
        "segment_id": pa.array([seg["segment_id"][i] for i in idx]),
        "utterance_id": pa.array([seg["utterance_id"][i] for i in idx]),
        "speaker_id": pa.array([seg["speaker_id"][i] for i in idx]),
        "split": pa.array([seg["split"][i] for i in idx]),
        "start_s": pa.array([seg["start_s"][i] for i in idx], pa.float64()),
        "end_s": pa.array([seg["end_s"][i] for i in idx], pa.float64()),
        "model_id": pa.array([model_id] * len(idx)),
        "embedding": schema.embedding_column(vectors),
    }
    return pa.RecordBatch.from_arrays([cols[f.name] for f in sch], schema=sch)


def _accumulate(sums: dict[str, np.ndarray], meta: dict[str, dict[str, Any]], seg: dict[str, list], i: int, vector: np.ndarray) -> None:
    utt = seg["utterance_id"][i]
    if utt not in sums:
        sums[utt] = np.zeros_like(vector, dtype=np.float64)
        meta[utt] = {"speaker_id": seg["speaker_id"][i], "split": seg["split"][i],
                     "start_s": seg["start_s"][i], "end_s": seg["end_s"][i], "num_segments": 0}
    sums[utt] += vector
    m = meta[utt]
    m["start_s"] = min(m["start_s"], seg["start_s"][i])
    m["end_s"] = max(m["end_s"], seg["end_s"][i])
    m["num_segments"] += 1


def _utterance_table(sums: dict[str, np.ndarray], meta: dict[str, dict[str, Any]], encoder: SpeakerEncoder) -> pa.Table:
    """Utterance embedding = mean of its (normalised) segment embeddings, renormalised."""
    sch = schema.embedding_schema(encoder.dim, utterance_level=True)
    ids = sorted(sums)
    vectors = schema.l2_normalise(np.stack([sums[u] for u in ids])) if ids else np.zeros((0, encoder.dim), np.float32)
    cols = {
        "utterance_id": pa.array(ids, pa.string()),
        "speaker_id": pa.array([meta[u]["speaker_id"] for u in ids], pa.string()),
        "split": pa.array([meta[u]["split"] for u in ids], pa.string()),
        "start_s": pa.array([meta[u]["start_s"] for u in ids], pa.float64()),
        "end_s": pa.array([meta[u]["end_s"] for u in ids], pa.float64()),
        "num_segments": pa.array([meta[u]["num_segments"] for u in ids], pa.int32()),
        "model_id": pa.array([encoder.model_id] * len(ids), pa.string()),
        "embedding": schema.embedding_column(vectors),
    }
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


def embed_utterance_file(encoder: SpeakerEncoder, path: str | Path, vad_params: Any | None = None) -> np.ndarray:
    """One utterance embedding the way the pipeline builds them: VAD segments, mean, renormalise.

    Used by ``verify``/``identify``/``enroll`` so ad-hoc files are scored in the same space as the
    indexed ones. Falls back to the whole file when VAD finds no segment (short clips).
    """
    from voiceprint.config import VadParams
    from voiceprint.vad import detect

    vad_params = vad_params or VadParams()
    duration = audio.probe(path).duration_s
    spans = detect(path, duration, vad_params) or [None]
    vectors = []
    with torch.inference_mode():
        for span in spans:
            wav = audio.load(path) if span is None else audio.load(path, span.start_s, span.end_s)
            x = torch.from_numpy(wav).unsqueeze(0).to(encoder.device)
            vectors.append(encoder.embed(x, torch.ones(1, device=encoder.device)).float().cpu().numpy()[0])
    return schema.l2_normalise(schema.l2_normalise(np.stack(vectors)).mean(axis=0, keepdims=True))[0]
