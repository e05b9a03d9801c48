"""The ``segment`` stage: manifest in, one row per speech segment out (``data/segments.parquet``).

:func:`run` (through :func:`segment_manifest`) runs the VAD on every file; a file it cannot use
(too short, undecodable, no speech, an error while scoring) becomes a row in
``data/rejects/segment.parquet``, and the stage raises only when every file fails.
Design: docs/stages.md#segment.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from voiceprint.common import atomic, schema
from voiceprint.common.audio import AudioError
from voiceprint.common.layout import Layout
from voiceprint.config import ComputeParams, Params, VadParams
from voiceprint.segment.vad import Span, detect

log = logging.getLogger(__name__)

STAGE = "segment"


class SegmentError(RuntimeError):
    """The stage as a whole cannot run (as opposed to one file being unusable)."""


def segment_manifest(
    layout: Layout, params: VadParams, *, progress: bool = True, compute: ComputeParams | None = None
) -> dict[str, Any]:
    """Segment every manifest row and write the segment and rejects tables (atomically).

    With ``compute.engine: dask`` the rows are cut into shards that Dask workers segment
    (:mod:`voiceprint.segment.sharded`); the tables are the same bytes either way.
    """
    manifest = pq.read_table(layout.manifest).to_pylist()
    store = None
    if compute is not None and compute.engine == "dask":
        from voiceprint.segment.sharded import segment_sharded

        rows, rejects, store = segment_sharded(layout, params, compute, manifest, progress=progress)
        unexpected = [f"{r['path']}: {r['reason']}" for r in rejects if r["reason"].startswith(UNEXPECTED)]
    else:
        rows, rejects, unexpected = segment_rows(layout, manifest, params, progress=progress)
    if manifest and len(unexpected) == len(manifest):
        if store is not None:
            store.remove()  # the environment failed, not the data: a rerun must score every file again
        raise SegmentError(f"VAD failed on every file ({len(manifest)}); the first: {unexpected[0]}")
    atomic.write_table(layout.segments, pa.Table.from_pylist(rows, schema=schema.SEGMENTS))
    atomic.write_table(layout.rejects(STAGE), pa.Table.from_pylist(rejects, schema=schema.REJECTS))
    if store is not None:
        store.remove()
    total_s = sum(u["duration_s"] for u in manifest)
    speech_s = sum(row["end_s"] - row["start_s"] for row in rows)
    return {
        "utterances": len(manifest),
        "segments": len(rows),
        "rejected": len(rejects),
        "audio_s": round(total_s, 2),
        "speech_s": round(speech_s, 2),
    }


#: How the reason of a file that failed for an unexpected error begins.
UNEXPECTED = "VAD failed ("


def segment_rows(
    layout: Layout, manifest: list[dict[str, Any]], params: VadParams, *, progress: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[str]]:
    """(segment rows, rejects, unexpected failures) of ``manifest`` rows, file by file in order."""
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    unexpected: list[str] = []
    for utt in tqdm(manifest, desc="VAD", unit="utt", disable=not progress or None):
        try:
            spans = _speech_spans(layout, utt, params)
        except AudioError as err:
            _reject(rejects, utt["path"], err.reason)
            continue
        except Exception as err:  # one file must not stop the run (docs/stages.md#segment)
            log.exception("VAD failed on %s", utt["path"])
            reason = f"{UNEXPECTED}{type(err).__name__}: {err})"
            unexpected.append(f"{utt['path']}: {reason}")
            _reject(rejects, utt["path"], reason)
            continue
        rows.extend(_segment_row(utt, k, span) for k, span in enumerate(spans))
    return rows, rejects, unexpected


def _speech_spans(layout: Layout, utt: dict[str, Any], params: VadParams) -> list[Span]:
    """The segments of one manifest row; :class:`AudioError` with a reason when there are none."""
    path = layout.resolve(utt["path"])
    duration = float(utt["duration_s"])
    if duration < params.min_segment_s:
        raise AudioError(path, f"too short: {duration:.2f} s < vad.min_segment_s ({params.min_segment_s} s)")
    spans = detect(path, duration, params)
    if not spans:
        reason = f"no speech found by {params.method} VAD (no segment of at least {params.min_segment_s} s)"
        raise AudioError(path, reason)
    return spans


def _reject(rejects: list[dict[str, str]], path: str, reason: str) -> None:
    rejects.append({"path": path, "stage": STAGE, "reason": reason})
    log.warning("rejected %s: %s", path, reason)


def _segment_row(utt: dict[str, Any], k: int, span: Span) -> dict[str, Any]:
    return {
        "segment_id": f"{utt['utterance_id']}#{k:03d}",
        "utterance_id": utt["utterance_id"],
        "speaker_id": utt["speaker_id"],
        "split": utt["split"],
        "path": utt["path"],
        "start_s": span.start_s,
        "end_s": span.end_s,
    }


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``segment`` stage: :func:`segment_manifest` with ``params.vad``, on ``params.compute``."""
    return segment_manifest(layout, params.vad, compute=params.compute)
