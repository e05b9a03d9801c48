"""Compressed input formats (M4A/AAC, MP3, Ogg Opus, Ogg Vorbis) and the ``voxceleb`` layout.

A real LibriSpeech utterance is encoded at test time with PyAV (no ffmpeg binary needed) into
each format, and the files go through ``prepare`` as a ``folder`` dataset and as a VoxCeleb tree.
Each must decode to the original's duration and embed (CAM++, the bundled pretrained encoder) to
within cosine 0.98 of the WAV original; a cut or damaged M4A must be an :class:`AudioError` naming
the file, and one reject of ``prepare``, while the run goes on.

Duration tolerance: one codec frame (:data:`FRAME_SAMPLES`: AAC 1024 samples = 64 ms at 16 kHz;
MP3 1152 samples = 26 ms at 44.1 kHz; Opus 20 ms; Vorbis 1024 samples = 21 ms at 48 kHz, the hop
of a long block). An encoder pads the last frame to a whole frame, and only container metadata
(the MP4 sample table and edit list, the LAME header, the Ogg granule position and Opus pre-skip)
says how much of the decoded audio is priming and padding; a decoder that ignored it would be up
to about one frame off. With the metadata honoured the measured difference is 0 samples for all
four (Vorbis at 44.1 kHz: 2 samples), so the test also catches priming samples left in (an AAC
or MP3 file then starts one frame late and is that much longer).
"""

from __future__ import annotations

import hashlib
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from voiceprint.common import audio, schema
from voiceprint.common.layout import Layout
from voiceprint.config import DataParams
from voiceprint.prepare.stage import prepare

av = pytest.importorskip("av")

pytestmark = pytest.mark.timeout(300)

#: name -> (file suffix, PyAV muxer, encoder, coded rate, channel layout, encoder options), each
#: as such files usually come: AAC at 16 kHz mono 64 kb/s (like VoxCeleb2's), MP3 at 44.1 kHz
#: 64 kb/s, Opus at 48 kHz (its only internal rate) and FFmpeg's defaults, Vorbis at 48 kHz stereo
#: (FFmpeg's own Vorbis encoder, the wheel has no libvorbis, is experimental and stereo only).
#: The rates matter for the embedding test: coded *at 16 kHz*, LAME's and FFmpeg-Vorbis's low-pass
#: filters remove the 6-8 kHz band CAM++ relies on, and the CAM++ cosine to the WAV falls to
#: 0.84-0.93 (the same with libsndfile's decoders: it is the encoding, not the decoding).
FORMATS: dict[str, tuple[str, str, str, int, str, dict[str, str]]] = {
    "aac": (".m4a", "ipod", "aac", 16_000, "mono", {"b": "64000"}),
    "mp3": (".mp3", "mp3", "libmp3lame", 44_100, "mono", {"b": "64000"}),
    "opus": (".ogg", "ogg", "libopus", 48_000, "mono", {}),
    "vorbis": (".ogg", "ogg", "vorbis", 48_000, "stereo", {"strict": "-2"}),
}
#: Samples per codec frame at the coded rate (the duration tolerance, see the module docstring).
FRAME_SAMPLES = {"aac": 1024, "mp3": 1152, "opus": 960, "vorbis": 1024}
MIN_COSINE = 0.98


def encode(wav: np.ndarray, sr: int, path: Path, fmt: str, *, faststart: bool = False) -> Path:
    """Encode mono float32 ``wav`` into ``path`` as ``fmt`` with PyAV, timestamps and all.

    Frames carry their pts: without them FFmpeg's muxers write no edit list (MP4) and wrong
    granule positions (Ogg), and the files would not say where the audio starts and ends.
    """
    _suffix, muxer, codec, rate, layout, options = FORMATS[fmt]
    container_options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=muxer, options=container_options) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        stream.codec_context.options = dict(options)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[None, :]), format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = sr, 0, Fraction(1, sr)
        fmt_name = stream.codec_context.format.name
        resampler = av.AudioResampler(
            format=fmt_name, layout=layout, rate=rate, frame_size=stream.codec_context.frame_size or None
        )
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def original(test_other_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A real test-other utterance as 16 kHz mono WAV, and its samples."""
    wav, sr = sf.read(test_other_files[0], dtype="float32")
    assert sr == audio.TARGET_SR and wav.ndim == 1 and len(wav) > 5 * sr
    path = tmp_path_factory.mktemp("original") / "original.wav"
    sf.write(path, wav, sr)
    return path, wav


@pytest.fixture(scope="module")
def encoded(original: tuple[Path, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The utterance in every format of :data:`FORMATS`, written by PyAV."""
    _, wav = original
    folder = tmp_path_factory.mktemp("encoded")
    return {fmt: encode(wav, audio.TARGET_SR, folder / f"{fmt}{FORMATS[fmt][0]}", fmt) for fmt in FORMATS}


def damaged_m4a(original: tuple[Path, np.ndarray], folder: Path) -> dict[str, Path]:
    """Two broken M4As: cut in half as FFmpeg writes it (the index, moov, comes last and is lost),
    and cut with the index first (``faststart``: the header promises 15 s, the AAC data stops)."""
    _, wav = original
    folder.mkdir(parents=True, exist_ok=True)
    whole = encode(wav, audio.TARGET_SR, folder / "whole.m4a", "aac").read_bytes()
    fast = encode(wav, audio.TARGET_SR, folder / "fast.m4a", "aac", faststart=True).read_bytes()
    (folder / "whole.m4a").unlink()
    (folder / "fast.m4a").unlink()
    cut = folder / "cut.m4a"
    cut.write_bytes(whole[: len(whole) // 2])
    cut_indexed = folder / "cut-indexed.m4a"
    cut_indexed.write_bytes(fast[: len(fast) // 2])
    return {"cut": cut, "cut-indexed": cut_indexed}


@pytest.fixture(scope="module")
def campplus():
    from voiceprint.encoders.loader import load_encoder

    return load_encoder("campplus")


def embedding(encoder, wav: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        vec = encoder.embed(torch.from_numpy(wav).unsqueeze(0), torch.ones(1)).float().numpy()[0]
    return vec / np.linalg.norm(vec)


# -- decoding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_decodes_to_the_original_duration(fmt: str, encoded, original) -> None:
    path, wav = original
    rate = FORMATS[fmt][3]
    info = audio.validate(encoded[fmt])
    assert info == audio.probe(encoded[fmt])
    assert info.sample_rate == rate and info.channels == (2 if FORMATS[fmt][4] == "stereo" else 1)
    tolerance_s = FRAME_SAMPLES[fmt] / rate
    original_s = len(wav) / audio.TARGET_SR
    assert abs(info.duration_s - original_s) <= tolerance_s, (fmt, info.duration_s, original_s)
    decoded = audio.load(encoded[fmt])
    assert abs(len(decoded) - len(wav)) <= FRAME_SAMPLES[fmt] * audio.TARGET_SR / rate
    # Aligned, not shifted by priming samples: the waveforms correlate at lag 0.
    n = min(len(decoded), len(wav))
    corr = float(np.dot(decoded[:n], wav[:n]) / np.sqrt(np.dot(decoded[:n], decoded[:n]) * np.dot(wav[:n], wav[:n])))
    assert corr > 0.95, (fmt, corr)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_range_reads_are_the_same_samples_as_a_whole_decode(fmt: str, encoded) -> None:
    """VAD windows and segments read ranges; a range must be that part of the file, from any start."""
    whole = audio.load(encoded[fmt])
    sr = audio.TARGET_SR
    for start, stop in ((0, sr), (3 * sr + 123, 5 * sr), (7 * sr + 5, 7 * sr + 4000), (len(whole) - sr, len(whole))):
        part = audio.load(encoded[fmt], start / sr, stop / sr)
        # Off by one at most: the range is cut at the coded rate (44.1 kHz: not a whole number of samples).
        assert abs(len(part) - (stop - start)) <= 1, (fmt, start, stop, len(part))
        n = min(len(part), stop - start)
        inner = slice(64, n - 64)  # resampling to 16 kHz sees a different edge at a range's ends
        a, b = part[inner], whole[start:stop][inner]
        corr = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
        assert corr > 0.999, (fmt, start, stop, corr)


def test_damaged_m4a_is_an_audio_error_naming_the_file(original, tmp_path: Path) -> None:
    broken = damaged_m4a(original, tmp_path)
    for name, path in broken.items():
        for read in (audio.validate, audio.load):
            with pytest.raises(audio.AudioError) as caught:
                read(path)
            assert caught.value.path == str(path) and str(path) in str(caught.value), name
    with pytest.raises(audio.AudioError, match="not a readable audio file .*moov atom not found"):
        audio.validate(broken["cut"])
    with pytest.raises(audio.AudioError, match=r"truncated or corrupt audio: the header announces \d+\.\d\d s"):
        audio.validate(broken["cut-indexed"])
    # Bytes that are not an MP4 at all, and text, under an .m4a name.
    (tmp_path / "noise.m4a").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "notes.m4a").write_text("speaker notes, not audio\n" * 20)
    with pytest.raises(audio.AudioError, match="not a readable audio file"):
        audio.probe(tmp_path / "noise.m4a")
    with pytest.raises(audio.AudioError, match="it holds text"):
        audio.validate(tmp_path / "notes.m4a")


# -- prepare: a folder dataset and a VoxCeleb tree -------------------------------------------------------


def _manifest(layout: Layout) -> dict[str, dict]:
    table = pq.read_table(layout.manifest)
    assert table.schema.equals(schema.MANIFEST)
    return {r["utterance_id"]: r for r in table.to_pylist()}


def _rejects(layout: Layout) -> list[dict[str, str]]:
    table = pq.read_table(layout.rejects("prepare"))
    assert table.schema.equals(schema.REJECTS)
    return table.to_pylist()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folder_run(original, encoded, tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, dict, Path, dict]:
    """A ``folder`` dataset: speaker ``reader`` holds the WAV original and each encoding, speaker
    ``broken`` the two damaged M4As."""
    tmp = tmp_path_factory.mktemp("folder-run")
    voices = tmp / "voices"
    (voices / "reader").mkdir(parents=True)
    shutil.copyfile(original[0], voices / "reader" / "original.wav")
    for path in encoded.values():
        shutil.copyfile(path, voices / "reader" / path.name)
    broken = damaged_m4a(original, voices / "broken")
    layout = Layout.at(tmp / "project")
    result = prepare(DataParams(dataset="folder", path=str(voices)), layout, progress=False)
    return layout, {"result": result}, voices, broken


def test_folder_dataset_takes_every_format_and_rejects_the_damaged_m4a(folder_run, encoded, original) -> None:
    layout, out, voices, broken = folder_run
    rows = _manifest(layout)
    assert set(rows) == {"original", *FORMATS}
    assert out["result"].utterances == {"eval": len(FORMATS) + 1} and out["result"].rejects == 2
    for fmt, source in encoded.items():
        row = rows[fmt]
        # Listed where it lies, extension included, and its facts are the decoder's.
        assert row["path"] == f"{voices.as_posix()}/reader/{source.name}"
        assert row["sha256"] == _sha256(source) == _sha256(layout.resolve(row["path"]))
        assert row["size_bytes"] == source.stat().st_size
        assert row["sample_rate"] == FORMATS[fmt][3]
        assert abs(row["duration_s"] - rows["original"]["duration_s"]) <= FRAME_SAMPLES[fmt] / FORMATS[fmt][3]
    rejects = {Path(r["path"]).name: r for r in _rejects(layout)}
    assert set(rejects) == {p.name for p in broken.values()}
    # Rejects name the source file and say what is wrong; rejected files never reach the manifest.
    assert rejects["cut.m4a"]["path"] == (voices / "broken" / "cut.m4a").as_posix()
    assert "moov atom not found" in rejects["cut.m4a"]["reason"]
    assert "truncated or corrupt audio" in rejects["cut-indexed.m4a"]["reason"]
    assert all(r["stage"] == "prepare" for r in rejects.values())
    assert not [r for r in rows.values() if "/broken/" in r["path"]]
    assert not audio_in_project(layout)


def test_prepared_files_embed_like_the_wav_original(folder_run, campplus) -> None:
    layout, _, _, _ = folder_run
    rows = _manifest(layout)
    reference = embedding(campplus, audio.load(layout.resolve(rows["original"]["path"])))
    cosines = {
        fmt: float(embedding(campplus, audio.load(layout.resolve(rows[fmt]["path"]))) @ reference) for fmt in FORMATS
    }
    assert min(cosines.values()) >= MIN_COSINE, cosines


def test_voxceleb_layout(original, encoded, tmp_path: Path) -> None:
    """``idXXXXX/<video>/<nnnnn>.<ext>``: ids from the path, every depth mistake one reject."""
    root = tmp_path / "vox"
    files = {
        "id10001/1zcIwhmdeo4/00001.m4a": encoded["aac"],
        "id10001/1zcIwhmdeo4/00002.mp3": encoded["mp3"],
        "id10001/7w0IBEWc-Y_/00001.ogg": encoded["opus"],  # YouTube ids hold '-' and '_'
        "id10002/1zcIwhmdeo4/00001.wav": original[0],  # same video and clip number, other speaker
        "id10002/Ab3_xYz9Q0k/00001.ogg": encoded["vorbis"],
    }
    for rel, source in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / rel)
    shutil.copyfile(encoded["aac"], root / "id10001" / "00009.m4a")  # no video folder
    shutil.copyfile(encoded["aac"], root / "loose.m4a")  # not in a speaker folder
    broken = damaged_m4a(original, root / "id10002" / "brokenvid")
    layout = Layout.at(tmp_path / "project")

    result = prepare(DataParams(dataset="voxceleb", path=str(root)), layout, progress=False)

    rows = _manifest(layout)
    expected = {rel.rsplit(".", 1)[0].replace("/", "-"): rel for rel in files}
    assert set(rows) == set(expected)
    assert result.utterances == {"eval": len(files)} and result.speakers == {"eval": 2}
    for utt, rel in expected.items():
        row = rows[utt]
        speaker = rel.split("/")[0]
        assert row["speaker_id"] == speaker and row["split"] == "eval"
        assert row["path"] == f"{root.as_posix()}/{rel}"
        assert row["sha256"] == _sha256(root / rel)
        assert row["duration_s"] == pytest.approx(len(original[1]) / audio.TARGET_SR, abs=0.064)  # <= 1 frame
    reasons = {r["path"].removeprefix(root.as_posix() + "/"): r["reason"] for r in _rejects(layout)}
    assert set(reasons) == {"id10001/00009.m4a", "loose.m4a", *(f"id10002/brokenvid/{p.name}" for p in broken.values())}
    assert "<speaker>/<video>/<utterance> depth" in reasons["id10001/00009.m4a"]
    assert "outside a speaker folder" in reasons["loose.m4a"]
    assert "moov atom not found" in reasons["id10002/brokenvid/cut.m4a"]
    assert not audio_in_project(layout)


def test_voxceleb_train_and_test_folders_are_the_splits(encoded, tmp_path: Path) -> None:
    root = tmp_path / "vox"
    for split, speaker in (("train", "id00012"), ("train", "id00015"), ("test", "id10270")):
        for clip in ("00001", "00002"):
            dest = root / split / speaker / "vid_A-1" / f"{clip}.m4a"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(encoded["aac"], dest)
    layout = Layout.at(tmp_path / "project")

    result = prepare(
        DataParams(dataset="voxceleb", path=str(root), max_utterances_per_speaker=1), layout, progress=False
    )

    assert result.utterances == {"eval": 1, "train": 2} and result.rejects == 0
    rows = _manifest(layout)
    assert {(r["split"], r["utterance_id"]) for r in rows.values()} == {
        ("train", "id00012-vid_A-1-00001"),
        ("train", "id00015-vid_A-1-00001"),
        ("eval", "id10270-vid_A-1-00001"),
    }


def audio_in_project(layout: Layout) -> list[str]:
    """Audio files under the project: prepare reads the dataset in place and copies none."""
    return [p.as_posix() for p in layout.root.rglob("*") if p.suffix.lower() in audio.AUDIO_SUFFIXES]
