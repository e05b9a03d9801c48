"""Whole-utterance embeddings: files cut into equal chunks, chunk embeddings averaged.

With ``embed.utterance: file`` the embed stage embeds every utterance that has speech in one pass
over the whole file, chunked by :func:`utterance_chunks` so hour-long recordings stay within memory
(:func:`file_chunk_rows` lists the chunks as rows of the segment table). :func:`embed_utterance_file`
embeds one ad-hoc file the same way for ``verify``/``identify``/``enroll``.
"""

from __future__ import annotations

import math
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from voiceprint.common import audio, schema
from voiceprint.common.layout import Layout
from voiceprint.config import EmbedParams
from voiceprint.encoders.base import SpeakerEncoder


def utterance_chunks(duration_s: float, chunk_s: float) -> list[tuple[float, float]]:
    """``[0, duration_s)`` cut into the fewest equal chunks of at most ``chunk_s`` seconds.

    Equal chunks rather than ``chunk_s`` pieces plus a remainder: a last chunk of a fraction of a
    second would weigh as much as a full one in the mean.
    """
    n = max(1, math.ceil(duration_s / chunk_s - 1e-9))
    step = duration_s / n
    return [(k * step, duration_s if k == n - 1 else (k + 1) * step) for k in range(n)]


def file_chunk_rows(layout: Layout, seg: pa.Table, chunk_s: float) -> pa.Table:
    """Rows (the segment table's columns) for the whole-file pass: the chunks of every utterance that has a segment."""
    codes = seg.column("utterance_id").combine_chunks().dictionary_encode().indices.to_numpy()
    _, first_rows = np.unique(codes, return_index=True)  # each utterance's first row, in the table's order
    paths = seg.column("path")
    source, chunk, starts, ends = array("q"), array("q"), array("d"), array("d")
    for row in first_rows.tolist():
        try:
            duration = audio.probe(layout.resolve(paths[row].as_py())).duration_s
        except audio.AudioError:
            continue  # unreadable: the segment pass rejects it, or the utterance keeps its segments' mean
        for k, (a, b) in enumerate(utterance_chunks(duration, chunk_s)):
            source.append(row)
            chunk.append(k)
            starts.append(a)
            ends.append(b)
    rows = seg.select(["utterance_id", "speaker_id", "split", "path"]).take(np.frombuffer(source, np.int64))
    number = pc.utf8_lpad(pc.cast(pa.array(np.frombuffer(chunk, np.int64)), pa.string()), 3, "0")  # f"{k:03d}"
    return pa.table(
        {
            "segment_id": pc.binary_join_element_wise(rows.column("utterance_id"), "@file", number, ""),
            **{name: rows.column(name) for name in rows.column_names},
            "start_s": pa.array(np.frombuffer(starts, np.float64)),
            "end_s": pa.array(np.frombuffer(ends, np.float64)),
        }
    )


def embed_utterance_file(
    encoder: SpeakerEncoder, path: str | Path, vad_params: Any | None = None, embed_params: EmbedParams | None = None
) -> np.ndarray:
    """One utterance embedding the way the pipeline builds them (``embed.utterance``).

    Used by ``verify``/``identify``/``enroll`` so ad-hoc files are scored in the same space as the
    indexed ones. ``file``: the whole file in one pass (chunked like the embed stage); ``segments``:
    VAD segments, mean, renormalise, falling back to the whole file when VAD finds no segment.
    """
    from voiceprint.config import VadParams
    from voiceprint.segment.vad import detect

    embed_params = embed_params or EmbedParams()
    duration = audio.probe(path).duration_s
    if embed_params.utterance == "file":
        spans = utterance_chunks(duration, embed_params.utterance_chunk_s)
    else:
        found = detect(path, duration, vad_params or VadParams())
        spans = [(s.start_s, s.end_s) for s in found] or [(0.0, None)]
    vectors = []
    with torch.inference_mode():
        for start_s, end_s in spans:
            x = torch.from_numpy(audio.load(path, start_s, end_s)).unsqueeze(0).to(encoder.device)
            vectors.append(encoder.embed(x, torch.ones(1, device=encoder.device)).float().cpu().numpy()[0])
    return schema.l2_normalise(schema.l2_normalise(np.stack(vectors)).mean(axis=0, keepdims=True))[0]
