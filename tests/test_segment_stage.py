"""The segment stage on real excerpts plus files it must reject without stopping."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from voiceprint.common import audio, schema
from voiceprint.common.layout import Layout
from voiceprint.config import VadParams
from voiceprint.segment.stage import segment_manifest


def _manifest(layout: Layout, paths: list[Path]) -> None:
    rows = []
    for p in paths:
        try:
            info = audio.probe(p)
            duration, sr, ch = info.duration_s, info.sample_rate, info.channels
        except audio.AudioError:
            duration, sr, ch = 1.0, 16000, 1
        rows.append(
            {
                "utterance_id": p.stem,
                "speaker_id": p.parent.name,
                "split": "eval",
                "path": str(p),
                "duration_s": duration,
                "sample_rate": sr,
                "channels": ch,
                "sha256": "-",
            }
        )
    layout.data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.MANIFEST), layout.manifest)


def test_segments_real_audio_and_records_rejects(tmp_path: Path, test_other_files: list[Path]):
    layout = Layout.at(tmp_path)
    bad_dir = tmp_path / "bad" / "spk"
    bad_dir.mkdir(parents=True)
    garbage = bad_dir / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file" * 10)
    silent = bad_dir / "silent.wav"
    sf.write(silent, np.zeros(32000, dtype=np.float32), 16000)
    good = test_other_files[:4]
    _manifest(layout, [*good, garbage, silent])

    summary = segment_manifest(layout, VadParams(), progress=False)

    segments = pq.read_table(layout.segments)
    assert segments.schema.equals(schema.SEGMENTS)
    assert set(segments.column("utterance_id").to_pylist()) == {p.stem for p in good}
    assert summary["segments"] == segments.num_rows >= len(good)
    rejects = pq.read_table(layout.rejects("segment")).to_pylist()
    reasons = {Path(r["path"]).name: r["reason"] for r in rejects}
    assert set(reasons) == {"garbage.wav", "silent.wav"}
    assert "not a readable audio file" in reasons["garbage.wav"]
    assert "no speech" in reasons["silent.wav"]
    ids = segments.column("segment_id").to_pylist()
    assert len(ids) == len(set(ids))
