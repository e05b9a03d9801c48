"""VAD on real speech and on synthetic edge cases."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voiceprint.common import audio
from voiceprint.config import VadParams
from voiceprint.segment.vad import Span, detect, shape_segments


@pytest.mark.parametrize("method", ["silero", "energy"])
def test_real_speech_yields_segments_inside_the_file(test_other_files: list[Path], method: str):
    params = VadParams(method=method)
    for path in test_other_files[:5]:
        duration = audio.probe(path).duration_s
        spans = detect(path, duration, params)
        assert spans, f"no speech found in {path}"
        speech = sum(s.duration_s for s in spans)
        # Read LibriSpeech is mostly speech, with pauses between phrases.
        assert 0.5 * duration < speech <= duration + 1e-6
        assert all(0.0 <= s.start_s < s.end_s <= duration for s in spans)
        assert all(params.min_segment_s <= s.duration_s <= params.max_segment_s + 1e-6 for s in spans)
        assert all(a.end_s <= b.start_s + 1e-6 for a, b in zip(spans, spans[1:]))


def test_silence_has_no_speech(tmp_path: Path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000 * 3, dtype=np.float32), 16000)
    assert detect(path, 3.0, VadParams()) == []


def test_speech_survives_resampling_to_48k_stereo(tmp_path: Path, test_other_files: list[Path]):
    wav = audio.load(test_other_files[0])
    up = audio.resample(wav, 16000, 48000)
    path = tmp_path / "stereo48k.wav"
    sf.write(path, np.stack([up, up], axis=1), 48000)
    ref = detect(test_other_files[0], len(wav) / 16000, VadParams())
    got = detect(path, len(up) / 48000, VadParams())
    assert len(got) == len(ref)
    assert max(abs(a.start_s - b.start_s) for a, b in zip(got, ref)) < 0.1


def test_shape_segments_splits_long_and_drops_short():
    params = VadParams(max_segment_s=4.0, min_segment_s=0.5)
    spans = shape_segments([Span(0.0, 0.3), Span(1.0, 10.0), Span(11.0, 12.0)], 11.5, params)
    assert spans[0].start_s == 1.0 and spans[-1].end_s == 11.5
    assert len(spans) == 4  # 9 s split into three 3-s pieces, then 11.0-11.5 clipped to the file
    assert all(s.duration_s <= 4.0 for s in spans)
