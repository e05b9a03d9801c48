"""prepare(): real LibriSpeech excerpts read in place (nothing copied, reruns read only what changed),
corrupted mirrors, caps, folder datasets, and OpenSLR-shaped LibriSpeech served by a local HTTP
server."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

import voiceprint.prepare.stage as prepare_stage
from voiceprint.common import schema
from voiceprint.common.checksums import parse_checksum_file, sha256_file
from voiceprint.common.layout import Layout
from voiceprint.config import DataParams
from voiceprint.prepare import librispeech
from voiceprint.prepare.archive import read_marker
from voiceprint.prepare.download import DownloadError
from voiceprint.prepare.stage import PrepareError, prepare

pytestmark = pytest.mark.timeout(120)


def read_manifest(layout: Layout) -> list[dict[str, object]]:
    table = pq.read_table(layout.manifest)
    assert table.schema.equals(schema.MANIFEST)
    return table.to_pylist()


def read_rejects(layout: Layout) -> list[dict[str, str]]:
    table = pq.read_table(layout.rejects("prepare"))
    assert table.schema.equals(schema.REJECTS)
    return table.to_pylist()


def project_files(layout: Layout) -> dict[str, int]:
    """Every file under the project (relative path -> size)."""
    return {p.relative_to(layout.root).as_posix(): p.stat().st_size for p in layout.root.rglob("*") if p.is_file()}


def assert_no_audio_in_project(layout: Layout) -> None:
    """prepare wrote its tables and nothing else: no audio, no file holding a listed file's bytes.
    ``data/downloads`` is left out: an OpenSLR archive is extracted there once and read in place."""
    files = {f for f in project_files(layout) if not f.startswith("data/downloads/")}
    assert files <= {
        "params.yaml",
        "data/manifest.parquet",
        "data/rejects/prepare.parquet",
        "data/cache/prepare-files.parquet",
    }, files
    listed = {r["sha256"] for r in read_manifest(layout)}
    assert not [f for f in files if sha256_file(layout.root / f) in listed], files


def count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Path]]:
    """Record every file the stage hashes (``sha256_file``) or decodes (``validate``) from now on."""
    calls: dict[str, list[Path]] = {"sha256_file": [], "validate": []}
    for name in calls:
        real = getattr(prepare_stage, name)

        def spy(path: Path, *args: object, _real=real, _name=name) -> object:
            calls[_name].append(Path(path))
            return _real(path, *args)

        monkeypatch.setattr(prepare_stage, name, spy)
    return calls


# -- the real excerpts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_excerpts(excerpts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, object]:
    layout = Layout.at(tmp_path_factory.mktemp("excerpts-project"))
    result = prepare(DataParams(mirror=str(excerpts_dir.parent)), layout, progress=False)
    return layout, result


def test_excerpts_counts(prepared_excerpts: tuple[Layout, object]) -> None:
    layout, result = prepared_excerpts
    assert result.utterances == {"train": 251, "eval": 100}
    assert result.speakers == {"train": 251, "eval": 10}
    assert result.rejects == 0
    assert read_rejects(layout) == []  # written even when empty: DVC needs a stable output


def test_excerpts_manifest_matches_published_checksums(
    prepared_excerpts: tuple[Layout, object], excerpts_dir: Path
) -> None:
    layout, _ = prepared_excerpts
    rows = read_manifest(layout)
    reference = parse_checksum_file(excerpts_dir / "MANIFEST.sha256")
    subset = {"eval": "test-other", "train": "train-clean-100"}
    got = {f"{subset[r['split']]}/{r['speaker_id']}/{r['utterance_id']}.flac": r["sha256"] for r in rows}
    assert got == reference
    keys = [(r["split"], r["speaker_id"], r["utterance_id"]) for r in rows]
    assert keys == sorted(keys)
    first = next(r for r in rows if r["utterance_id"] == "1688-142285-0000")
    # The mirror was configured as an absolute path, so the file is named by it, where it lies.
    source = excerpts_dir / "test-other/1688/1688-142285-0000.flac"
    assert first["path"] == source.as_posix() and layout.resolve(first["path"]) == source
    assert first["sample_rate"] == 16000 and first["channels"] == 1 and first["duration_s"] > 1.0
    assert first["size_bytes"] == source.stat().st_size
    assert sha256_file(source) == reference["test-other/1688/1688-142285-0000.flac"]
    for r in rows:
        assert layout.resolve(r["path"]).stat().st_size == r["size_bytes"] > 0
    assert_no_audio_in_project(layout)


def test_excerpts_rerun_reads_nothing(
    prepared_excerpts: tuple[Layout, object], excerpts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, first = prepared_excerpts
    assert (first.hashed, first.reused, first.decoded) == (351, 0, 351)
    manifest = layout.manifest.read_bytes()
    calls = count_reads(monkeypatch)
    result = prepare(DataParams(mirror=str(excerpts_dir.parent)), layout, progress=False)
    assert result.utterances == {"train": 251, "eval": 100}
    assert calls == {"sha256_file": [], "validate": []}
    assert (result.hashed, result.reused, result.decoded) == (0, 351, 0)
    assert layout.manifest.read_bytes() == manifest


def test_mirror_is_resolved_against_the_project_root(excerpts_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    mirror = os.path.relpath(excerpts_dir.parent, root)  # like the default "../shared/datasets"
    layout = Layout.at(root)
    result = prepare(DataParams(mirror=mirror, max_speakers=3, max_utterances_per_speaker=2), layout, progress=False)
    assert result.utterances == {"train": 3, "eval": 6}
    assert result.speakers == {"train": 3, "eval": 3}
    rows = read_manifest(layout)
    eval_speakers = sorted({r["speaker_id"] for r in rows if r["split"] == "eval"})
    all_eval = sorted(p.name for p in (excerpts_dir / "test-other").iterdir() if p.is_dir())
    assert eval_speakers == all_eval[:3]
    for speaker in eval_speakers:
        utts = sorted(r["utterance_id"] for r in rows if r["speaker_id"] == speaker)
        assert utts == sorted(p.stem for p in (excerpts_dir / "test-other" / speaker).glob("*.flac"))[:2]

    # Files are named by the mirror as written, and found again from the project root.
    for r in rows:
        assert str(r["path"]).startswith(f"{mirror}/librispeech-excerpts/")
        assert layout.resolve(r["path"]).resolve().is_relative_to(excerpts_dir)

    # Tightening the caps lists fewer files; nothing was copied that would need pruning.
    result = prepare(DataParams(mirror=mirror, max_speakers=1, train_subset=None), layout, progress=False)
    assert result.utterances == {"eval": 10} and result.speakers == {"eval": 1}
    assert {r["speaker_id"] for r in read_manifest(layout)} == {eval_speakers[0]}
    assert (result.hashed, result.reused) == (8, 2)  # its first 2 files were verified by the first run
    assert_no_audio_in_project(layout)


def test_missing_mirror_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match=r"looked for .*nowhere.*data\.mirror"):
        prepare(DataParams(mirror=str(tmp_path / "nowhere")), Layout.at(tmp_path), progress=False)


@pytest.fixture
def small_mirror(excerpts_dir: Path, tmp_path: Path) -> Path:
    """A private copy of test-other (the eval subset) that a test may damage."""
    mirror = tmp_path / "mirror"
    shutil.copytree(excerpts_dir / "test-other", mirror / "librispeech-excerpts" / "test-other")
    shutil.copy2(excerpts_dir / "MANIFEST.sha256", mirror / "librispeech-excerpts" / "MANIFEST.sha256")
    return mirror


def test_corrupted_file_is_one_reject(small_mirror: Path, tmp_path: Path) -> None:
    victim = small_mirror / "librispeech-excerpts/test-other/1688/1688-142285-0003.flac"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    layout = Layout.at(tmp_path / "project")

    result = prepare(DataParams(mirror=str(small_mirror), train_subset=None), layout, progress=False)

    assert result.rejects == 1 and result.utterances == {"eval": 99} and result.speakers == {"eval": 10}
    (reject,) = read_rejects(layout)
    assert reject["path"] == victim.as_posix()
    assert reject["stage"] == "prepare"
    assert "sha256 mismatch" in reject["reason"] and sha256_file(victim) in reject["reason"]
    assert "1688-142285-0003" not in {r["utterance_id"] for r in read_manifest(layout)}

    # The rerun takes the digest from the file cache and still compares it with the reference.
    rejects = layout.rejects("prepare").read_bytes()
    again = prepare(DataParams(mirror=str(small_mirror), train_subset=None), layout, progress=False)
    assert (again.rejects, again.hashed, again.reused) == (1, 0, 100)
    assert layout.rejects("prepare").read_bytes() == rejects


def test_missing_and_unlisted_files_are_rejects(small_mirror: Path, tmp_path: Path) -> None:
    base = small_mirror / "librispeech-excerpts/test-other"
    (base / "1688/1688-142285-0001.flac").unlink()
    shutil.copy2(base / "1688/1688-142285-0002.flac", base / "1688/1688-999999-0000.flac")
    layout = Layout.at(tmp_path / "project")

    result = prepare(DataParams(mirror=str(small_mirror), train_subset=None), layout, progress=False)

    assert result.utterances == {"eval": 99}  # 100 listed - 1 missing; the unlisted one is not trusted
    reasons = {Path(r["path"]).name: r["reason"] for r in read_rejects(layout)}
    assert set(reasons) == {"1688-142285-0001.flac", "1688-999999-0000.flac"}
    assert "missing" in reasons["1688-142285-0001.flac"]
    assert "not listed" in reasons["1688-999999-0000.flac"]


# -- read in place, verified incrementally --------------------------------------------------------------


def test_in_place_corpus_is_read_not_copied(excerpts_dir: Path, tmp_path: Path) -> None:
    """The default setup (a relative data.mirror): each manifest path is the corpus file itself."""
    layout = Layout.at(tmp_path / "project")
    layout.root.mkdir()
    mirror = os.path.relpath(excerpts_dir.parent, layout.root)  # like the default "../shared/datasets"
    result = prepare(DataParams(mirror=mirror), layout, progress=False)

    rows = read_manifest(layout)
    assert len(rows) == result.total_utterances == 351
    reference = parse_checksum_file(excerpts_dir / "MANIFEST.sha256")
    subset = {"eval": "test-other", "train": "train-clean-100"}
    for r in rows:
        rel = f"{subset[r['split']]}/{r['speaker_id']}/{r['utterance_id']}.flac"
        assert r["path"] == f"{mirror}/librispeech-excerpts/{rel}"
        listed, source = layout.resolve(r["path"]).stat(), (excerpts_dir / rel).stat()
        assert (listed.st_dev, listed.st_ino) == (source.st_dev, source.st_ino)  # the same file, not a copy
        assert r["size_bytes"] == source.st_size and r["sha256"] == reference[rel]
    assert_no_audio_in_project(layout)
    assert sum(project_files(layout).values()) < sum(r["size_bytes"] for r in rows) / 20


def test_rerun_reads_only_new_or_changed_files(
    small_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout.at(tmp_path / "project")
    params = DataParams(mirror=str(small_mirror), train_subset=None)
    first = prepare(params, layout, progress=False)
    assert (first.hashed, first.reused, first.decoded, first.rejects) == (100, 0, 100, 0)
    assert pq.read_table(layout.file_cache).num_rows == 100
    manifest = layout.manifest.read_bytes()

    calls = count_reads(monkeypatch)
    second = prepare(params, layout, progress=False)
    assert calls == {"sha256_file": [], "validate": []}
    assert (second.hashed, second.reused, second.decoded) == (0, 100, 0)
    assert layout.manifest.read_bytes() == manifest

    # A touched file (same bytes, new mtime) is read again, alone; the manifest does not change.
    files = sorted((small_mirror / "librispeech-excerpts/test-other").glob("*/*.flac"))
    touched = files[17]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = prepare(params, layout, progress=False)
    assert calls == {"sha256_file": [touched], "validate": [touched]}
    assert (third.hashed, third.reused, third.decoded) == (1, 99, 1)
    assert layout.manifest.read_bytes() == manifest

    # New content of the same size: hashed again, alone, and caught by the published digest.
    changed = files[42]
    data = bytearray(changed.read_bytes())
    data[-100] ^= 0xFF
    changed.write_bytes(bytes(data))
    for seen in calls.values():
        seen.clear()
    fourth = prepare(params, layout, progress=False)
    assert calls == {"sha256_file": [changed], "validate": []}  # a digest mismatch is not decoded
    assert (fourth.hashed, fourth.reused, fourth.rejects) == (1, 99, 1)
    (reject,) = read_rejects(layout)
    assert reject["path"] == changed.as_posix() and "sha256 mismatch" in reject["reason"]

    # Another version of the decode check decodes again, without hashing anything.
    monkeypatch.setattr(prepare_stage, "validator_fingerprint", lambda: "another decode check")
    fifth = prepare(params, layout, progress=False)
    assert calls["sha256_file"] == [changed] and len(calls["validate"]) == 99
    assert (fifth.hashed, fifth.reused, fifth.decoded, fifth.rejects) == (0, 100, 99, 1)


def test_unreadable_file_cache_is_rebuilt(small_mirror: Path, tmp_path: Path) -> None:
    layout = Layout.at(tmp_path / "project")
    params = DataParams(mirror=str(small_mirror), train_subset=None)
    prepare(params, layout, progress=False)
    manifest = layout.manifest.read_bytes()
    layout.file_cache.write_bytes(b"PAR1 not really parquet")
    again = prepare(params, layout, progress=False)
    assert (again.hashed, again.reused, again.utterances) == (100, 0, {"eval": 100})
    assert layout.manifest.read_bytes() == manifest
    assert pq.read_table(layout.file_cache).num_rows == 100


def test_sibling_checkouts_write_identical_tables(excerpts_dir: Path, tmp_path: Path) -> None:
    """Two checkouts side by side with the same params.yaml (relative bases) write the same bytes:
    files outside the project are named by the base as written, and resolve from either checkout."""
    speaker = sorted(p for p in (excerpts_dir / "test-other").iterdir() if p.is_dir())[0]
    files = sorted(speaker.glob("*.flac"))[:4]
    mirror = tmp_path / "mirror" / "librispeech-excerpts" / "test-other" / speaker.name
    mirror.mkdir(parents=True)
    listed = [
        line
        for line in (excerpts_dir / "MANIFEST.sha256").read_text().splitlines()
        if any(line.endswith(f"test-other/{speaker.name}/{f.name}") for f in files)
    ]
    (mirror.parents[1] / "MANIFEST.sha256").write_text("\n".join(listed) + "\n")
    for f in files[:3]:  # files[3] is listed but missing
        shutil.copy2(f, mirror / f.name)
    corrupt = bytearray((mirror / files[1].name).read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (mirror / files[1].name).write_bytes(bytes(corrupt))
    voices = tmp_path / "voices"
    (voices / "alice").mkdir(parents=True)
    shutil.copy2(files[0], voices / "alice" / "one.flac")
    (voices / "alice" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    shutil.copy2(files[2], voices / "loose.flac")  # outside a speaker folder

    kinds = {
        "excerpts": DataParams(mirror="../mirror", train_subset=None),
        "folder": DataParams(dataset="folder", path="../voices", mirror="../mirror"),
    }
    written: dict[str, list[tuple[Layout, bytes, bytes]]] = {kind: [] for kind in kinds}
    for checkout in ("a", "a-much-longer-sibling-checkout"):
        layout = Layout.at(tmp_path / checkout)
        for kind, params in kinds.items():
            prepare(params, layout, progress=False)
            written[kind].append((layout, layout.manifest.read_bytes(), layout.rejects("prepare").read_bytes()))

    for kind, ((one, manifest, rejects), (other, manifest2, rejects2)) in written.items():
        assert manifest == manifest2 and rejects == rejects2, kind
        assert str(tmp_path).encode() not in manifest + rejects, kind
        rows = pq.read_table(pa.BufferReader(manifest)).to_pylist()
        bad = pq.read_table(pa.BufferReader(rejects)).to_pylist()
        base = "../mirror/" if kind == "excerpts" else "../voices/"
        assert rows and len(bad) == 2 and all(r["path"].startswith(base) for r in rows + bad), (rows, bad)
        for r in rows:
            assert os.path.samefile(one.resolve(r["path"]), other.resolve(r["path"]))
            assert sha256_file(one.resolve(r["path"])) == r["sha256"]
    reasons = {
        Path(r["path"]).name: r["reason"] for r in pq.read_table(pa.BufferReader(written["excerpts"][0][2])).to_pylist()
    }
    assert "sha256 mismatch" in reasons[files[1].name] and "missing from ../mirror/" in reasons[files[3].name]


def test_home_relative_base_is_kept_as_written(
    test_other_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "voices" / "bob").mkdir(parents=True)
    shutil.copy2(test_other_files[0], tmp_path / "home" / "voices" / "bob" / "hi.flac")
    layout = Layout.at(tmp_path / "project")
    prepare(DataParams(dataset="folder", path="~/voices"), layout, progress=False)
    (row,) = read_manifest(layout)
    assert row["path"] == "~/voices/bob/hi.flac"
    assert layout.resolve(row["path"]) == tmp_path / "home" / "voices" / "bob" / "hi.flac"


def test_dvc_yaml_tracks_no_copy_of_the_corpus(repo_root: Path) -> None:
    """No stage writes or reads data/raw; prepare always runs (it is what notices a changed corpus)."""
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    assert stages["prepare"]["outs"] == ["data/manifest.parquet", "data/rejects/prepare.parquet"]
    assert stages["prepare"]["always_changed"] is True
    for name, stage in stages.items():
        body = stage.get("do", stage)
        paths = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", []) + body.get("outs", [])]
        assert not [p for p in paths if p.startswith(("data/raw", "data/cache", "data/downloads"))], name


# -- folder datasets -----------------------------------------------------------------------------------


def _speaker_files(excerpts_dir: Path, n_speakers: int, n_utts: int) -> dict[str, list[Path]]:
    speakers = sorted(p for p in (excerpts_dir / "test-other").iterdir() if p.is_dir())[:n_speakers]
    return {s.name: sorted(s.glob("*.flac"))[:n_utts] for s in speakers}


def test_folder_without_splits_is_all_eval(excerpts_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    for speaker, files in _speaker_files(excerpts_dir, 2, 2).items():
        (folder / speaker).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, folder / speaker / f.name)
    # A WAV file, and one that only pretends to be audio.
    sf.write(folder / "alice.wav", np.zeros(16000, dtype=np.float32), 16000)  # not in a speaker folder
    (folder / "alice").mkdir()
    sf.write(folder / "alice" / "hello.wav", 0.1 * np.sin(np.arange(32000) / 5.0).astype(np.float32), 16000)
    (folder / "alice" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    layout = Layout.at(tmp_path / "project")

    result = prepare(DataParams(dataset="folder", path=str(folder)), layout, progress=False)

    assert result.utterances == {"eval": 5} and result.speakers == {"eval": 3}
    rows = read_manifest(layout)
    hello = next(r for r in rows if r["utterance_id"] == "hello")
    assert hello["path"] == f"{folder.as_posix()}/alice/hello.wav" and hello["duration_s"] == pytest.approx(2.0)
    assert hello["sha256"] == hashlib.sha256((folder / "alice/hello.wav").read_bytes()).hexdigest()
    reasons = {r["path"].removeprefix(folder.as_posix() + "/"): r["reason"] for r in read_rejects(layout)}
    assert set(reasons) == {"alice/broken.wav", "alice.wav"}
    assert "not a readable audio file" in reasons["alice/broken.wav"]
    assert "outside a speaker folder" in reasons["alice.wav"]


def test_folder_with_train_and_test_splits(excerpts_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "voices"
    speakers = _speaker_files(excerpts_dir, 4, 2)
    for i, (speaker, files) in enumerate(speakers.items()):
        split = "train" if i < 2 else "test"
        (folder / split / speaker).mkdir(parents=True)
        for k, f in enumerate(files):
            # Per-speaker names like 000.flac are common; ids must still be unique.
            shutil.copy2(f, folder / split / speaker / f"{k:03d}.flac")
    layout = Layout.at(tmp_path / "project")

    result = prepare(
        DataParams(dataset="folder", path=str(folder), max_utterances_per_speaker=1), layout, progress=False
    )

    assert result.utterances == {"eval": 2, "train": 2}
    assert result.speakers == {"eval": 2, "train": 2}
    rows = read_manifest(layout)
    names = list(speakers)
    assert {r["speaker_id"] for r in rows if r["split"] == "train"} == set(names[:2])
    assert {r["utterance_id"] for r in rows} == {f"{s}-000" for s in names}
    for r in rows:  # the id carries the speaker; the path names the file as it is
        split = "train" if r["split"] == "train" else "test"
        assert r["path"] == f"{folder.as_posix()}/{split}/{r['speaker_id']}/000.flac"


def test_folder_with_train_but_no_test_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "voices" / "train" / "spk").mkdir(parents=True)
    with pytest.raises(PrepareError, match="no test/ or eval/"):
        prepare(DataParams(dataset="folder", path=str(tmp_path / "voices")), Layout.at(tmp_path), progress=False)


# -- OpenSLR-shaped LibriSpeech over HTTP -------------------------------------------------------------


class _Server:
    def __init__(self, directory: Path):
        self.paths: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.paths.append(self.path)
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resources/12"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _librispeech_tarball(path: Path, subset: str, files: dict[str, list[Path]]) -> str:
    """LibriSpeech/<subset>/<speaker>/<chapter>/<utt>.flac plus the top-level text files; returns md5."""
    with tarfile.open(path, "w:gz") as tar:
        readme = path.parent / "README.TXT"
        readme.write_text("LibriSpeech test archive\n")
        tar.add(readme, "LibriSpeech/README.TXT")
        for speaker, flacs in files.items():
            for flac in flacs:
                chapter = flac.stem.split("-")[1]
                tar.add(flac, f"LibriSpeech/{subset}/{speaker}/{chapter}/{flac.name}")
        readme.unlink()
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def openslr(excerpts_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[_Server, dict]]:
    served = tmp_path / "www" / "resources" / "12"
    served.mkdir(parents=True)
    eval_files = _speaker_files(excerpts_dir, 3, 2)
    train_speakers = sorted(p for p in (excerpts_dir / "train-clean-100").iterdir() if p.is_dir())[:4]
    train_files = {s.name: sorted(s.glob("*.flac")) for s in train_speakers}
    for subset, files in (("test-tiny", eval_files), ("train-tiny", train_files)):
        monkeypatch.setitem(
            librispeech.SUBSET_MD5, subset, _librispeech_tarball(served / f"{subset}.tar.gz", subset, files)
        )
    with _Server(tmp_path / "www") as server:
        yield server, {"eval": eval_files, "train": train_files}


def test_librispeech_end_to_end_over_http(openslr: tuple[_Server, dict], tmp_path: Path) -> None:
    server, files = openslr
    layout = Layout.at(tmp_path / "project")
    params = DataParams(
        dataset="librispeech", train_subset="train-tiny", eval_subset="test-tiny", url_base=server.url, mirror=None
    )

    result = prepare(params, layout, progress=False)

    assert result.utterances == {"train": 4, "eval": 6}
    assert result.speakers == {"train": 4, "eval": 3}
    assert result.rejects == 0
    assert sorted(server.paths) == ["/resources/12/test-tiny.tar.gz", "/resources/12/train-tiny.tar.gz"]
    rows = read_manifest(layout)
    originals = {f.stem: f for split_files in files.values() for fs in split_files.values() for f in fs}
    assert {r["utterance_id"] for r in rows} == set(originals)
    subsets = {"eval": "test-tiny", "train": "train-tiny"}
    for r in rows:
        assert r["sha256"] == sha256_file(originals[str(r["utterance_id"])])
        # Read where it was extracted (once, under data/downloads), named relative to the project.
        subset, chapter = subsets[str(r["split"])], str(r["utterance_id"]).split("-")[1]
        assert r["path"] == (
            f"data/downloads/{subset}/LibriSpeech/{subset}/{r['speaker_id']}/{chapter}/{r['utterance_id']}.flac"
        )
        assert sha256_file(layout.resolve(r["path"])) == r["sha256"]
    assert (layout.downloads / "test-tiny.tar.gz").is_file()
    assert read_marker(layout.downloads / "test-tiny")["archive"] == "test-tiny.tar.gz"
    assert_no_audio_in_project(layout)
    assert len(list(layout.downloads.rglob("*.flac"))) == 10  # the one extraction, no second copy

    # A rerun neither downloads nor re-extracts, nor reads the extracted files again.
    server.paths.clear()
    again = prepare(params, layout, progress=False)
    assert again.utterances == {"train": 4, "eval": 6} and (again.hashed, again.reused) == (0, 10)
    assert server.paths == []


def test_librispeech_prefers_the_local_mirror(openslr: tuple[_Server, dict], tmp_path: Path) -> None:
    server, _ = openslr
    mirror = tmp_path / "mirror" / "LibriSpeech"
    mirror.mkdir(parents=True)
    shutil.copy2(tmp_path / "www/resources/12/test-tiny.tar.gz", mirror / "test-tiny.tar.gz")
    layout = Layout.at(tmp_path / "project")
    params = DataParams(
        dataset="librispeech",
        train_subset=None,
        eval_subset="test-tiny",
        url_base=server.url,
        mirror=str(mirror.parent),
    )
    assert prepare(params, layout, progress=False).utterances == {"eval": 6}
    assert server.paths == []

    # An already-extracted tree in the mirror is used in place.
    tree = tmp_path / "mirror2"
    with tarfile.open(mirror / "test-tiny.tar.gz") as tar:
        tar.extractall(tree, filter="data")
    other = Layout.at(tmp_path / "project2")
    params = params.model_copy(update={"mirror": str(tree)})
    assert prepare(params, other, progress=False).utterances == {"eval": 6}
    assert server.paths == [] and not other.downloads.exists()
    for r in read_manifest(other):
        assert str(r["path"]).startswith(f"{tree.as_posix()}/LibriSpeech/test-tiny/")
    assert_no_audio_in_project(other)


def test_librispeech_bad_archive_checksum(
    openslr: tuple[_Server, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = openslr
    monkeypatch.setitem(librispeech.SUBSET_MD5, "test-tiny", "0" * 32)
    layout = Layout.at(tmp_path / "project")
    params = DataParams(
        dataset="librispeech", train_subset=None, eval_subset="test-tiny", url_base=server.url, mirror=None
    )
    with pytest.raises(DownloadError, match="0{32}") as exc:
        prepare(params, layout, progress=False)
    assert "test-tiny.tar.gz" in str(exc.value)
    assert not layout.manifest.exists()
    assert not (layout.downloads / "test-tiny.tar.gz").exists()


def test_unknown_librispeech_subset(tmp_path: Path) -> None:
    params = DataParams(dataset="librispeech", train_subset=None, eval_subset="test-nonsense", mirror=None)
    with pytest.raises(PrepareError, match="unknown LibriSpeech subset 'test-nonsense'.*test-other"):
        prepare(params, Layout.at(tmp_path), progress=False)


def test_published_md5_table() -> None:
    assert set(librispeech.SUBSET_MD5) >= {
        "dev-clean",
        "dev-other",
        "test-clean",
        "test-other",
        "train-clean-100",
        "train-clean-360",
        "train-other-500",
    }
    assert librispeech.subset_url("test-other") == "https://www.openslr.org/resources/12/test-other.tar.gz"
