"""The ``segment`` stage: manifest in, one row per speech segment out (``data/segments.parquet``).

A file the VAD cannot use (undecodable, no speech) becomes a row in ``data/rejects/segment.parquet``
and the stage carries on with the rest.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from voiceprint import atomic, schema
from voiceprint.audio import AudioError
from voiceprint.config import VadParams
from voiceprint.layout import Layout
from voiceprint.vad import detect

log = logging.getLogger(__name__)


def segment_manifest(layout: Layout, params: VadParams, *, progress: bool = True) -> dict[str, Any]:
    manifest = pq.read_table(layout.manifest).to_pylist()
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    speech_s = 0.0
    for utt in tqdm(manifest, desc="VAD", unit="utt", disable=not progress or None):
        path = layout.resolve(utt["path"])
        try:
            spans = detect(path, utt["duration_s"], params)
        except AudioError as err:
            rejects.append({"path": utt["path"], "stage": "segment", "reason": err.reason})
            log.warning("rejected %s: %s", utt["path"], err.reason)
            continue
        if not spans:
            reason = f"no speech segment of at least {params.min_segment_s} s found by {params.method} VAD"
            rejects.append({"path": utt["path"], "stage": "segment", "reason": reason})
            log.warning("rejected %s: %s", utt["path"], reason)
            continue
        for k, span in enumerate(spans):
            rows.append(
                {
                    "segment_id": f"{utt['utterance_id']}#{k:03d}",
                    "utterance_id": utt["utterance_id"],
                    "speaker_id": utt["speaker_id"],
                    "split": utt["split"],
                    "path": utt["path"],
                    "start_s": span.start_s,
                    "end_s": span.end_s,
                }
            )
            speech_s += span.duration_s
    atomic.write_table(layout.segments, pa.Table.from_pylist(rows, schema=schema.SEGMENTS))
    atomic.write_table(layout.rejects("segment"), pa.Table.from_pylist(rejects, schema=schema.REJECTS))
    total_s = sum(u["duration_s"] for u in manifest)
    return {
        "utterances": len(manifest),
        "segments": len(rows),
        "rejected": len(rejects),
        "audio_s": round(total_s, 2),
        "speech_s": round(speech_s, 2),
    }
