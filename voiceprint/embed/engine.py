"""The batching engine of the ``embed`` stage: audio spans in, L2-normalised embeddings out.

Spans are sorted by duration and cut into batches by total padded audio seconds
(``embed.max_batch_s``), so batches carry little padding; on CUDA they are copied pinned and
non-blocking. On CPU a large model gets one segment per call instead (faster there, see
:func:`batch_plan`). Decoding and resampling run in a DataLoader worker process while the model
computes (on CPU only when a core is free for it, :func:`decode_workers`). The model runs under bf16
autocast where the hardware has native bf16 (CUDA; CPUs with AVX512-BF16/AMX), fp16 on older GPUs
(:func:`engine_dtype`); ``embed.backend: openvino`` runs it in OpenVINO on CPU instead
(:func:`load_pipeline_encoder`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from voiceprint.common import audio, schema
from voiceprint.common.cores import usable_cores
from voiceprint.common.layout import Layout
from voiceprint.common.memory import release_free_heap
from voiceprint.common.precision import autocast_dtype, dtype_name
from voiceprint.config import EmbedParams
from voiceprint.encoders.base import SpeakerEncoder


def pick_device(requested: str) -> torch.device:
    """The torch device for ``embed.device`` (``auto``: CUDA when available, else CPU)."""
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
class Item:
    """One span of audio to embed: ``path`` from ``start_s`` to ``end_s`` seconds."""

    path: Path
    start_s: float
    end_s: float


class Spans(Sequence[Item]):
    """The rows of a table with ``path``, ``start_s`` and ``end_s`` columns as :class:`Item` s, each
    made when it is read: a list of Items (a ``Path`` object each) would cost about 0.5 KB a row."""

    def __init__(self, layout: Layout, rows: pa.Table):
        self.layout = layout
        # One chunk: indexing a ChunkedArray walks its chunks (a shard's rows come from take()).
        self.paths = rows.column("path").combine_chunks()
        self.starts = rows.column("start_s").to_numpy()
        self.ends = rows.column("end_s").to_numpy()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Item:  # type: ignore[override]  # no slices
        return Item(self.layout.resolve(self.paths[i].as_py()), float(self.starts[i]), float(self.ends[i]))


class _SegmentAudio(Dataset):
    def __init__(self, items: Sequence[Item]):
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


def engine_dtype(encoder: SpeakerEncoder, params: EmbedParams) -> torch.dtype | None:
    """The autocast type the engine runs ``encoder`` under, or None for float32."""
    return autocast_dtype(encoder.device, params.amp) if encoder.autocast_safe else None


def precision_key(encoder: SpeakerEncoder, params: EmbedParams) -> str:
    """The precision in the embed stage's fingerprints: ``str(engine_dtype)`` (``torch.bfloat16``,
    ``None``), or the encoder's :attr:`~SpeakerEncoder.fixed_precision` (another backend)."""
    return encoder.fixed_precision or str(engine_dtype(encoder, params))


def precision_name(encoder: SpeakerEncoder, params: EmbedParams) -> str:
    """The precision ``embed.json`` records: ``bfloat16``, ``float32``, ... or ``openvino-bf16``."""
    return encoder.fixed_precision or dtype_name(engine_dtype(encoder, params))


def decode_workers(device: torch.device) -> int:
    """One decode worker process, unless on CPU it would take a core from the model's threads.

    Measured on 2 cores: a decode worker beside two intra-op threads cost ECAPA-TDNN C=1024 half
    its throughput (33 vs 75 audio s/s) and C=128 a third (~350 vs ~500), while decoding FLAC in
    the main process costs ~1 %.
    """
    if device.type != "cpu":
        return 1
    return 1 if usable_cores() > torch.get_num_threads() else 0


#: Seconds between returns of free heap pages to the kernel during a run.
TRIM_EVERY_S = 2.0

#: On CPU, encoders at least this large get one segment per call (``embed.cpu_batching: auto``).
CPU_PER_SEGMENT_MIN_PARAMS = 10_000_000


def batch_plan(durations: np.ndarray, params: EmbedParams, encoder: SpeakerEncoder) -> list[np.ndarray]:
    """Length-bucketed batches (``max_batch_s`` of padded audio each), or one segment per call.

    Measured on 2 CPU cores (benchmarks/RESULTS.md): a large model (ECAPA-TDNN C=1024, 20.8 M
    parameters) runs 1.8x faster one segment at a time than in padded batches (padding is wasted
    work and its activations fall out of cache), while a small one (C=128, 0.76 M) runs 3x faster
    in batches (per-call overhead dominates). ``cpu_batching: auto`` picks by parameter count;
    accelerators always batch.
    """
    choice = params.cpu_batching
    if choice == "auto":
        choice = encoder.num_parameters() < CPU_PER_SEGMENT_MIN_PARAMS
    if encoder.device.type == "cpu" and not choice:
        return [np.asarray([i]) for i in np.argsort(durations, kind="stable")]
    return length_buckets(durations, params.max_batch_s)


#: Bump when length_buckets or the engine's batching changes: staged parts from another plan would
#: mix batch compositions (the embed stage puts it in its staging fingerprint).
BATCH_PLAN_VERSION = 1


def run_encoder(
    encoder: SpeakerEncoder,
    items: Sequence[Item],
    durations: np.ndarray,
    params: EmbedParams,
    *,
    batches: list[np.ndarray] | None = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Yield ``(item indices, normalised embeddings, rejected (index, reason))`` batch by batch.

    ``batches`` defaults to :func:`batch_plan`; a resumed run passes the ones still to do.
    ``num_workers`` defaults to :func:`decode_workers`.
    """
    device = encoder.device
    cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = decode_workers(device)
    if batches is None:
        batches = batch_plan(durations, params, encoder)
    if not batches:
        return
    loader = DataLoader(
        _SegmentAudio(items),
        batch_sampler=batches,
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=cuda,
        prefetch_factor=8 if num_workers else None,
        persistent_workers=False,
    )
    amp_dtype = engine_dtype(encoder, params)
    total = float(sum(durations[b].sum() for b in batches))
    bar = tqdm(
        total=total,
        desc="embed",
        unit="audio-s",
        disable=not progress or None,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]",
    )
    trimmed = time.monotonic()
    with torch.inference_mode():
        for idx, wavs, lengths, bad in loader:
            if idx:
                wavs = wavs.to(device, non_blocking=True)
                lengths = lengths.to(device, non_blocking=True)
                with torch.autocast(
                    device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    emb = encoder.embed(wavs, lengths)
                vectors = schema.l2_normalise(emb.float().cpu().numpy())
            else:
                vectors = np.zeros((0, encoder.dim), dtype=np.float32)
            bar.update(float(durations[idx].sum()) + float(durations[[i for i, _ in bad]].sum()))
            if time.monotonic() - trimmed >= TRIM_EVERY_S:
                release_free_heap()  # keeps peak RSS independent of the batch count (voiceprint.common.memory)
                trimmed = time.monotonic()
            yield idx, vectors, bad
    bar.close()


def load_pipeline_encoder(
    layout: Layout, device: torch.device, backend: str = "torch", *, amp: bool = True
) -> SpeakerEncoder:
    """The project's model (``models/ecapa``) on ``device``, its network run by ``backend`` (``embed.backend``).

    ``openvino``: CPU only (ValueError otherwise); bf16 where native and ``amp``, else f32; the ONNX
    export and OpenVINO's compiled blobs are cached in ``data/cache/openvino`` (no DVC output).
    """
    from voiceprint.encoders.loader import load_encoder

    if backend == "openvino" and device.type != "cpu":
        raise ValueError(
            f"embed.backend openvino runs on CPU only, but embed.device resolved to {device}: "
            "set embed.device: cpu, or embed.backend: torch to use the GPU"
        )
    encoder = load_encoder("ecapa", model_dir=layout.model_dir, device=str(device))
    if backend == "torch":
        return encoder
    if backend == "openvino":
        from voiceprint.encoders.openvino_backend import openvino_encoder

        return openvino_encoder(encoder, bf16=amp, cache_dir=layout.data / "cache" / "openvino")
    raise ValueError(f"unknown embed.backend {backend!r}: expected torch or openvino")
