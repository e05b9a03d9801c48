"""The ``prepare`` stage: acquire a dataset, verify every file where it lies, and list it.

Whatever the source (the LibriSpeech excerpts mirror, OpenSLR LibriSpeech extracted once under
``data/downloads``, a plain folder, or a VoxCeleb tree), :func:`run` (through :func:`prepare`)
copies no audio: it writes a manifest (:data:`voiceprint.common.schema.MANIFEST`) naming each file
in place, and a rejects table (:data:`voiceprint.common.schema.REJECTS`). Digests and decode checks
are kept in ``Layout.file_cache`` (:mod:`voiceprint.prepare.filecache`), so a rerun reads only new
or changed files. Design: docs/stages.md#prepare, docs/data-versioning.md.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from voiceprint.common import schema
from voiceprint.common.atomic import write_table
from voiceprint.common.audio import AUDIO_SUFFIXES, AudioError, os_reason, validate
from voiceprint.common.checksums import parse_checksum_file, sha256_file
from voiceprint.common.cores import usable_cores
from voiceprint.common.layout import Layout
from voiceprint.config import DataParams, Params, SourceParams
from voiceprint.prepare import librispeech, speech_commands
from voiceprint.prepare.filecache import Entry, FileCache, RowBatches, validator_fingerprint

log = logging.getLogger(__name__)

STAGE = "prepare"
TRAIN, EVAL = "train", "eval"
#: The manifest's sort order.
MANIFEST_ORDER = ("split", "speaker_id", "utterance_id", "source")
EXCERPTS_DIR = "librispeech-excerpts"
EXCERPTS_MANIFEST = "MANIFEST.sha256"
#: Where earlier versions copied the corpus; only named in a warning now.
LEGACY_RAW = Path("data") / "raw"


class PrepareError(RuntimeError):
    """The dataset as configured cannot be prepared at all (as opposed to individual bad files)."""


@dataclass(frozen=True)
class PrepareResult:
    """Counts per split of what went into the manifest, how many files were rejected, and how many
    were read this run (``hashed``, ``decoded``) versus taken from the file cache (``reused``).

    Plain JSON types throughout (paths as strings) because stages report this dict as a summary.
    """

    utterances: dict[str, int]
    speakers: dict[str, int]
    rejects: int
    manifest: str
    rejects_path: str
    hashed: int = 0
    reused: int = 0
    decoded: int = 0
    #: Utterances per source and split (``{"speech-commands": {"train": 2120, "eval": 2198}}``).
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total_utterances(self) -> int:
        return sum(self.utterances.values())


@dataclass(frozen=True, slots=True)
class _Candidate:
    """One file to verify. Slots and a ``str`` path, not a ``Path``: a corpus holds millions."""

    split: str
    speaker_id: str
    utterance_id: str
    source: str  # the file's absolute path (posix)
    expected_sha256: str | None = None  # the reference digest, when the source publishes one
    problem: str | None = None  # known unusable before looking at it (missing, unlisted, ...)
    origin: str = ""  # the name of the source (data.name or a data.sources key)


@dataclass
class _Outcome:
    rows: RowBatches = field(default_factory=lambda: RowBatches(schema.MANIFEST))
    rejects: list[dict[str, str]] = field(default_factory=list)
    hashed: int = 0
    reused: int = 0
    decoded: int = 0
    rows_by_source: Counter[tuple[str, str]] = field(default_factory=Counter)  # (source, split) -> rows
    speakers: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # by split

    def sorted_manifest(self) -> pa.Table:
        """The manifest rows in :data:`MANIFEST_ORDER`; the unsorted rows, as large, are let go."""
        rows, self.rows = self.rows, RowBatches(schema.MANIFEST)
        manifest = rows.table().sort_by([(key, "ascending") for key in MANIFEST_ORDER])
        del rows
        # Arrow's allocator keeps freed pages for reuse: hand them back before the Parquet writer
        # takes its own, or the unsorted rows (and the file cache's tables) count twice at the peak.
        pa.default_memory_pool().release_unused()
        return manifest


def prepare(params: DataParams, layout: Layout, *, progress: bool = True) -> PrepareResult:
    """Acquire every source of ``params``, verify each file in place, write manifest and rejects."""
    outcome = _Outcome()
    sources = params.all_sources()
    namer = _Namer(params, layout)
    candidates, splits = _all_candidates(params, layout, namer, outcome, progress=progress)
    if (layout.root / LEGACY_RAW).is_dir():
        log.warning("prepare: %s is no longer used (the corpus is read in place); delete it", LEGACY_RAW)

    candidates = _drop_eval_speakers_from_train(candidates, outcome, namer)
    _verify(candidates, layout.file_cache, namer, outcome, progress=progress)
    del candidates  # the run's largest Python objects: gone before the manifest is sorted and written

    manifest = outcome.sorted_manifest()
    write_table(layout.manifest, manifest)
    rejects = sorted((namer.reject(r) for r in outcome.rejects), key=lambda r: r["path"])
    rejects_path = layout.rejects(STAGE)
    write_table(rejects_path, pa.Table.from_pylist(rejects, schema=schema.REJECTS))

    utterances, speakers, by_source = _counts(outcome, splits, sources)
    result = PrepareResult(
        utterances=utterances,
        speakers=speakers,
        sources=by_source,
        rejects=len(rejects),
        manifest=str(layout.manifest),
        rejects_path=str(rejects_path),
        hashed=outcome.hashed,
        reused=outcome.reused,
        decoded=outcome.decoded,
    )
    log.info(
        "prepare: %d file(s) hashed, %d taken from %s, %d decoded",
        outcome.hashed,
        outcome.reused,
        layout.file_cache,
        outcome.decoded,
    )
    if rejects:
        log.warning("prepare: %d file(s) rejected; see %s", len(rejects), rejects_path)
    if not utterances.get(EVAL):
        log.warning("prepare: the eval split is empty")
    for name, counts in by_source.items():
        if len(sources) > 1 and not counts.get(EVAL):
            log.warning("prepare: source %r has no eval utterances", name)
    return result


def _counts(
    outcome: _Outcome, splits: list[str], sources: Iterable[str]
) -> tuple[dict[str, int], dict[str, int], dict[str, dict[str, int]]]:
    """Utterances and speakers per split, and utterances per source and split, of the manifest:
    every split in ``splits`` and every source named first, then the rest in sorted order."""
    utterances = {split: 0 for split in splits}
    speakers = {split: 0 for split in splits}
    by_source: dict[str, dict[str, int]] = {name: {} for name in sources}
    for (source, split), count in sorted(outcome.rows_by_source.items(), key=lambda item: item[0][1]):
        utterances[split] = utterances.get(split, 0) + count
        by_source.setdefault(source, {})[split] = count
    for split in sorted(outcome.speakers):
        speakers[split] = len(outcome.speakers[split])
    return utterances, speakers, by_source


# --------------------------------------------------------------------------------------------------
# sources


def _all_candidates(
    params: DataParams, layout: Layout, namer: _Namer, outcome: _Outcome, *, progress: bool
) -> tuple[list[_Candidate], list[str]]:
    """Every source's candidates, capped and named after their source, and the splits present;
    files outside any speaker folder go to ``outcome``'s rejects."""
    candidates: list[_Candidate] = []
    splits: list[str] = []
    for name, source in params.all_sources().items():
        found, source_splits, stray = _source_candidates(source, params, layout, progress=progress)
        for path, problem in stray:
            tree = "<speaker>/<video>/<utterance>" if source.dataset == "voxceleb" else "<speaker>/<utterance>"
            reason = problem or f"audio file outside a speaker folder (expected {tree}.{{{_SUFFIX_LIST}}})"
            outcome.rejects.append({"path": namer.name(path), "stage": STAGE, "reason": reason})
        if not params.trains(name):
            found = [c for c in found if c.split != TRAIN]
            source_splits = [split for split in source_splits if split != TRAIN]
        found = _apply_caps(found, source.max_speakers, source.max_utterances_per_speaker)
        candidates.extend(replace(c, origin=name) for c in found)
        splits.extend(split for split in source_splits if split not in splits)
    return candidates, splits


def _resolve(layout: Layout, path: str) -> Path:
    """Config paths are relative to the project root, not to wherever the command was started."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else layout.root / p).resolve()


_SUFFIX_LIST = ",".join(s.lstrip(".") for s in AUDIO_SUFFIXES)


def _source_candidates(
    source: SourceParams, data: DataParams, layout: Layout, *, progress: bool
) -> tuple[list[_Candidate], list[str], list[tuple[Path, str | None]]]:
    """One source's candidates, the splits it has, and its stray files (folder kinds only)."""
    if source.dataset == "librispeech-excerpts":
        return (*_excerpts_candidates(source, data, layout), [])
    if source.dataset == "librispeech":
        return (*_librispeech_candidates(source, data, layout, progress=progress), [])
    if source.dataset == "speech-commands":
        return (*_speech_commands_candidates(source, data, layout), [])
    if source.dataset in ("folder", "voxceleb"):
        return _folder_candidates(source, layout)
    raise PrepareError(f"unknown dataset kind {source.dataset!r}")  # pragma: no cover - validated


def _is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")


def _excerpts_candidates(params: SourceParams, data: DataParams, layout: Layout) -> tuple[list[_Candidate], list[str]]:
    if data.mirror is None:
        raise PrepareError(
            "data.dataset is 'librispeech-excerpts' but data.mirror is not set; set data.mirror in "
            f"params.yaml to the folder that contains {EXCERPTS_DIR}/"
        )
    source = _resolve(layout, data.mirror) / EXCERPTS_DIR
    checksum_file = source / EXCERPTS_MANIFEST
    if not checksum_file.is_file():
        raise PrepareError(
            f"LibriSpeech excerpts not found: looked for {checksum_file} (data.mirror={data.mirror!r}, "
            f"resolved against {layout.root}); set data.mirror in params.yaml to the folder that "
            f"contains {EXCERPTS_DIR}/"
        )
    reference = parse_checksum_file(checksum_file)
    subsets = {TRAIN: params.train_subset, EVAL: params.eval_subset}
    available = sorted(p.name for p in source.iterdir() if p.is_dir())
    candidates: list[_Candidate] = []
    splits: list[str] = []
    for split, subset in subsets.items():
        if subset is None:
            continue
        listed = {rel for rel in reference if rel.startswith(f"{subset}/")}
        if not (source / subset).is_dir() and not listed:
            raise PrepareError(
                f"{source} has no {subset!r} folder for the {split} split (available: {', '.join(available)}); "
                f"set data.{'train' if split == TRAIN else 'eval'}_subset accordingly"
            )
        splits.append(split)
        on_disk = {p.relative_to(source).as_posix() for p in (source / subset).glob("*/*") if _is_audio(p)}
        for rel in sorted(listed | on_disk):
            parts = rel.split("/")
            path = source / rel
            if len(parts) != 3 or not _is_audio(path):
                continue
            problem = _listing_problem(rel, reference, on_disk, EXCERPTS_MANIFEST, source)
            candidates.append(_Candidate(split, parts[1], path.stem, path.as_posix(), reference.get(rel), problem))
    return candidates, splits


def _listing_problem(
    rel: str, reference: dict[str, str] | None, on_disk: set[str], checksums: str, base: Path
) -> str | None:
    """Why a file of a checksum-listed source cannot be verified: unlisted (when there is a list) or missing."""
    if reference is not None and rel not in reference:
        return f"not listed in {checksums}, so it cannot be verified"
    if rel not in on_disk:
        return f"listed in {checksums} but missing from {base}"
    return None


def _librispeech_candidates(
    params: SourceParams, data: DataParams, layout: Layout, *, progress: bool
) -> tuple[list[_Candidate], list[str]]:
    mirror = _resolve(layout, data.mirror) if data.mirror else None
    candidates: list[_Candidate] = []
    splits: list[str] = []
    for split, subset in ((TRAIN, params.train_subset), (EVAL, params.eval_subset)):
        if subset is None:
            continue
        try:
            root = librispeech.fetch_subset(
                subset, downloads=layout.downloads, mirror=mirror, url_base=data.url_base, progress=progress
            )
        except librispeech.LibriSpeechError as err:
            raise PrepareError(f"data.{'train' if split == TRAIN else 'eval'}_subset: {err}") from None
        splits.append(split)
        for utt in librispeech.iter_utterances(root):
            candidates.append(_Candidate(split, utt.speaker_id, utt.utterance_id, utt.path.as_posix()))
    return candidates, splits


def _speech_commands_candidates(
    params: SourceParams, data: DataParams, layout: Layout
) -> tuple[list[_Candidate], list[str]]:
    """Every clip of a Speech Commands folder, verified against its ``MANIFEST.sha256`` when it has one,
    in the train or eval split by :func:`voiceprint.prepare.speech_commands.split_speakers`."""
    if params.path:
        base = _resolve(layout, params.path)
    elif data.mirror:
        base = _resolve(layout, data.mirror) / speech_commands.DEFAULT_FOLDER
    else:
        raise PrepareError(
            "a speech-commands source needs its path, or data.mirror holding "
            f"{speech_commands.DEFAULT_FOLDER}/; set the source's path"
        )
    if not base.is_dir():
        raise PrepareError(
            f"Speech Commands not found: {base} is not a directory (path={params.path!r}, "
            f"data.mirror={data.mirror!r}, resolved against {layout.root})"
        )
    checksum_file = base / speech_commands.CHECKSUMS
    reference = parse_checksum_file(checksum_file) if checksum_file.is_file() else None
    on_disk = {p.relative_to(base).as_posix() for p in base.glob("*/*") if _is_audio(p)}
    listed = set(reference) if reference is not None else set()
    relatives = sorted(rel for rel in on_disk | listed if len(rel.split("/")) == 2)
    split_of = speech_commands.split_speakers(rel.split("/")[0] for rel in relatives)
    candidates = []
    for rel in relatives:
        speaker, name = rel.split("/")
        path = base / rel
        problem = _listing_problem(rel, reference, on_disk, checksum_file.name, base)
        expected = reference.get(rel) if reference is not None else None
        candidates.append(_Candidate(split_of[speaker], speaker, Path(name).stem, path.as_posix(), expected, problem))
    return candidates, [EVAL, TRAIN]


def _folder_candidates(
    params: SourceParams, layout: Layout
) -> tuple[list[_Candidate], list[str], list[tuple[Path, str | None]]]:
    """Candidates, the splits present, and what lies outside any speaker folder: stray audio files
    (problem None) and symlinks that cannot be followed (with the problem).

    ``folder``: ``<speaker>/<utterance>.<ext>`` (deeper sub-folders too); ``voxceleb``:
    ``<speaker>/<video>/<utterance>.<ext>`` exactly, anything at another depth is a reject.
    """
    assert params.path is not None  # DataParams requires it for dataset=folder and voxceleb
    root = _resolve(layout, params.path)
    if not root.is_dir():
        raise PrepareError(
            f"data.path: {root} is not a directory (data.path={params.path!r}, resolved against {layout.root})"
        )
    split_dirs = {name: root / name for name in ("train", "test", "eval") if (root / name).is_dir()}
    if split_dirs:
        if "test" in split_dirs and "eval" in split_dirs:
            raise PrepareError(f"{root}: has both test/ and eval/; keep one of them as the evaluation split")
        eval_dir = split_dirs.get("test") or split_dirs.get("eval")
        if eval_dir is None:
            raise PrepareError(f"{root}: has train/ but no test/ or eval/ folder for the evaluation split")
        layout_by_split = {EVAL: eval_dir, **({TRAIN: split_dirs["train"]} if "train" in split_dirs else {})}
    else:
        layout_by_split = {EVAL: root}

    candidates: list[_Candidate] = []
    bases = [root, *(base for base in layout_by_split.values() if base != root)]
    stray: list[tuple[Path, str | None]] = [item for base in bases for item in _loose_entries(base)]
    for split, base in layout_by_split.items():
        for speaker in _speaker_dirs(base):
            speaker_id = speaker.name  # one string per speaker, shared by its candidates
            for path, problem in _walk_audio(speaker):
                if params.dataset == "voxceleb":
                    utterance_id, problem = _voxceleb_id(speaker, path, problem)
                else:
                    utterance_id = path.stem
                candidates.append(_Candidate(split, speaker_id, utterance_id, path.as_posix(), problem=problem))
    if params.dataset == "voxceleb":
        return candidates, list(layout_by_split), stray
    # Folder datasets often name files 001.wav per speaker; file stems are then not unique ids, so
    # the speaker becomes part of every id (the manifest's path still names the file as it is).
    owners: dict[str, tuple[str, str]] = {}
    if any(owners.setdefault(c.utterance_id, (c.split, c.speaker_id)) != (c.split, c.speaker_id) for c in candidates):
        candidates = [replace(c, utterance_id=f"{c.speaker_id}-{c.utterance_id}") for c in candidates]
    return candidates, list(layout_by_split), stray


def _voxceleb_id(speaker: Path, path: Path, problem: str | None) -> tuple[str, str | None]:
    """``idXXXXX-<video>-<nnnnn>`` for ``<speaker>/<video>/<nnnnn>.<ext>``; a problem for any other depth."""
    parts = path.relative_to(speaker).parts
    if problem is None and len(parts) != 2:
        problem = (
            f"not at <speaker>/<video>/<utterance> depth in a voxceleb dataset (found {speaker.name}/"
            f"{'/'.join(parts)}); expected e.g. id10001/1zcIwhmdeo4/00001.wav"
        )
    return "-".join((speaker.name, *parts[:-1], path.stem)), problem


def _link_problem(path: Path) -> str | None:
    """Why a symlink cannot be followed (loop, dangling target), or None when it resolves."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as err:
        return os_reason(path, err)
    return None


def _loose_entries(base: Path) -> list[tuple[Path, str | None]]:
    """What lies directly in ``base`` that is no speaker folder but matters: audio files (strays) and
    symlinks that cannot be followed, each with its problem (None for a plain stray file)."""
    out: list[tuple[Path, str | None]] = []
    for path in sorted(base.iterdir()):
        if path.name.startswith("."):
            continue
        problem = _link_problem(path)
        if problem or (path.is_file() and _is_audio(path)):
            out.append((path, problem))
    return out


def _speaker_dirs(base: Path) -> list[Path]:
    """Speaker folders of a split, symlinked ones included (broken links are _loose_entries' rows)."""
    return [
        path
        for path in sorted(base.iterdir())
        if not path.name.startswith(".") and _link_problem(path) is None and path.is_dir()
    ]


def _walk_audio(folder: Path) -> list[tuple[Path, str | None]]:
    """Audio files under a speaker folder, sorted, each with a problem that makes it unusable (or None).

    Written out instead of ``rglob`` so that links are decided explicitly: a symlinked sub-folder is
    followed once; one that leads back to a folder on the current path is a symlink loop (reported,
    not followed); a link that loops or dangles is reported whatever its name, since the scan
    cannot tell whether it was meant to be a file or a folder (``rglob``/``is_file`` would silently
    drop it). Hidden entries are skipped.
    """
    found: list[tuple[Path, str | None]] = []
    visited: set[str] = set()

    def visit(directory: Path, ancestors: tuple[str, ...]) -> None:
        real = os.path.realpath(directory)
        visited.add(real)
        try:
            entries = sorted(directory.iterdir())
        except OSError as err:
            found.append((directory, f"folder could not be listed ({err.strerror or err})"))
            return
        for path in entries:
            if path.name.startswith("."):
                continue
            problem = _link_problem(path)
            if problem:
                found.append((path, problem))
            elif path.is_dir():
                target = os.path.realpath(path)
                if target in ancestors or target == real:
                    found.append((path, f"symlink loop: links back to the enclosing folder {target}; not followed"))
                elif target not in visited:
                    visit(path, (*ancestors, real))
            elif path.is_file() and _is_audio(path):
                found.append((path, None))

    visit(folder, ())
    return sorted(found, key=lambda item: item[0].as_posix())


# --------------------------------------------------------------------------------------------------
# selection and verification


def _drop_eval_speakers_from_train(candidates: list[_Candidate], outcome: _Outcome, namer: _Namer) -> list[_Candidate]:
    """Train candidates of a speaker who is also evaluated (in any source) become rejects: a speaker
    the model trained on would flatter the eval set. Speakers are matched by id across sources."""
    evaluated = {c.speaker_id: c.origin for c in candidates if c.split == EVAL}
    kept = []
    for c in candidates:
        if c.split == TRAIN and c.speaker_id in evaluated:
            reason = f"speaker {c.speaker_id!r} is also in the eval split of source {evaluated[c.speaker_id]!r}"
            outcome.rejects.append({"path": namer.name(c.source), "stage": STAGE, "reason": reason})
        else:
            kept.append(c)
    return kept


def _apply_caps(candidates: Iterable[_Candidate], max_speakers: int | None, max_utts: int | None) -> list[_Candidate]:
    grouped: dict[str, dict[str, list[_Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in candidates:
        grouped[c.split][c.speaker_id].append(c)
    out: list[_Candidate] = []
    for split in sorted(grouped):
        speakers = sorted(grouped[split])
        if max_speakers is not None:
            speakers = speakers[:max_speakers]
        for speaker in speakers:
            utts = sorted(grouped[split][speaker], key=lambda c: (c.utterance_id, c.source))
            out.extend(utts[:max_utts] if max_utts is not None else utts)
    return out


def _duplicate_ids(candidates: list[_Candidate]) -> dict[_Candidate, str]:
    """Candidates whose utterance id was already taken: ids key every later table, so keep the first."""
    first: dict[str, _Candidate] = {}
    dupes: dict[_Candidate, str] = {}
    for c in candidates:
        if c.utterance_id in first:
            dupes[c] = f"duplicate utterance id {c.utterance_id!r} (also {first[c.utterance_id].source})"
        else:
            first[c.utterance_id] = c
    return dupes


class _Namer:
    """How tables name files: relative to the project root when inside it, else under the corpus
    base as params.yaml writes it (``../shared/datasets/...``), absolute only when that base is
    written absolute. Tables are DVC outputs: two checkouts with the same params.yaml must write the
    same bytes, and :meth:`Layout.resolve` must find the file again from the name."""

    def __init__(self, params: DataParams, layout: Layout):
        # (resolved prefix, written prefix); the project root first, so a base inside the project
        # is named relative to the root too, then the longest base first.
        bases: list[tuple[str, str]] = []
        paths = [source.path for source in params.all_sources().values()]
        for written in dict.fromkeys([params.mirror, *paths]):
            if not written:
                continue
            resolved = _resolve(layout, written).as_posix()
            # Only a spelling that resolves back to the same folder may stand in for it.
            if os.path.realpath(layout.resolve(written)) == resolved:
                bases.append((_prefix(resolved), written.rstrip("/") + "/"))
        bases.sort(key=lambda b: len(b[0]), reverse=True)
        self.bases = [(_prefix(layout.root.as_posix()), ""), *bases]

    def name(self, path: str | Path) -> str:
        text = path if isinstance(path, str) else path.as_posix()
        for resolved, shown in self.bases:
            if text.startswith(resolved):
                return shown + text[len(resolved) :]
        return text

    def text(self, text: str) -> str:
        """``text`` (a reason) with every path under a base written as configured. A prefix counts
        only where a path starts (not inside another path), the longest first."""
        for resolved, shown in sorted(self.bases, key=lambda b: len(b[0]), reverse=True):
            text = re.sub(r"(?<![^\s'\"(])" + re.escape(resolved), lambda _m, shown=shown: shown, text)
        return text

    def reject(self, reject: dict[str, str]) -> dict[str, str]:
        return {**reject, "reason": self.text(reject["reason"])}


def _prefix(posix: str) -> str:
    return posix if posix.endswith("/") else posix + "/"


@dataclass(frozen=True)
class _Checked:
    """What reading one candidate found: its cache entry (None with ``error``) and what was read."""

    entry: Entry | None
    error: str | None = None
    hashed: bool = False
    decoded: bool = False


def _verify(
    candidates: list[_Candidate], cache_path: Path, namer: _Namer, outcome: _Outcome, *, progress: bool
) -> None:
    """Check every candidate, through the file cache at ``cache_path``, into ``outcome``'s rows or rejects."""
    duplicates = _duplicate_ids(candidates)
    cache = FileCache(cache_path, validator_fingerprint())
    candidates = [replace(c, problem=duplicates[c]) if c in duplicates else c for c in candidates]
    checked = _checked_in_order(candidates, cache, usable_cores())  # hashing and decoding are CPU-bound
    bar = tqdm(candidates, desc="prepare", unit="file", disable=None if progress else True)
    for cand, found in zip(bar, checked):
        _record(cand, found, namer, cache, outcome)
    cache.save()


def _check(cand: _Candidate, cache: FileCache) -> _Checked:
    """Hash and decode-check one candidate where it lies, or take both from ``cache``.

    Reads only (it runs in a thread pool): the SHA-256 and the decode check (``validate``) come
    from ``cache`` when the file's size and mtime are those recorded; otherwise the file is read
    again. The file is stat'ed before it is read, so a change during the read shows as a new
    mtime on the next run.
    """
    if cand.problem:
        return _Checked(None, cand.problem)
    hashed = decoded = False
    try:
        st = os.stat(cand.source)
        entry = cache.lookup(cand.source, st)
        if entry is None:
            entry = Entry(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha256_file(cand.source))
            hashed = True
    except OSError as err:  # unreadable now, perhaps not on the next run: nothing is cached
        return _Checked(None, f"could not be read ({err.strerror or err})")
    if cand.expected_sha256 is not None and entry.sha256 != cand.expected_sha256:
        return _Checked(entry, hashed=hashed)  # _record rejects it; the decode check is not needed
    if entry.validator != cache.validator:
        try:
            info = validate(cand.source)
            facts = {"duration_s": info.duration_s, "sample_rate": info.sample_rate, "channels": info.channels}
            entry = replace(entry, validator=cache.validator, reason=None, **facts)
        except AudioError as err:
            entry = replace(
                entry, validator=cache.validator, duration_s=None, sample_rate=None, channels=None, reason=err.reason
            )
        decoded = True
    return _Checked(entry, hashed=hashed, decoded=decoded)


def _record(cand: _Candidate, checked: _Checked, namer: _Namer, cache: FileCache, outcome: _Outcome) -> None:
    """Store what :func:`_check` found in ``cache`` and add a manifest row, or a reject."""

    def reject(reason: str) -> None:
        outcome.rejects.append({"path": namer.name(cand.source), "stage": STAGE, "reason": reason})

    entry = checked.entry
    if entry is None:
        reject(checked.error or "could not be read")
        return
    outcome.hashed += checked.hashed
    outcome.reused += not checked.hashed
    outcome.decoded += checked.decoded
    cache.store(cand.source, entry)
    if cand.expected_sha256 is not None and entry.sha256 != cand.expected_sha256:
        reject(f"sha256 mismatch: expected {cand.expected_sha256}, got {entry.sha256} (corrupt or modified file)")
        return
    if entry.reason is not None:
        reject(entry.reason)
        return
    outcome.rows.append(
        {
            "utterance_id": cand.utterance_id,
            "speaker_id": cand.speaker_id,
            "split": cand.split,
            "path": namer.name(cand.source),
            "duration_s": entry.duration_s,
            "sample_rate": entry.sample_rate,
            "channels": entry.channels,
            "sha256": entry.sha256,
            "size_bytes": entry.size,
            "source": cand.origin,
        }
    )
    outcome.rows_by_source[cand.origin, cand.split] += 1
    outcome.speakers[cand.split].add(cand.speaker_id)


def _checked_in_order(candidates: list[_Candidate], cache: FileCache, threads: int) -> Iterator[_Checked]:
    """:func:`_check` of each candidate, in order, ``threads`` files at a time.

    Threads, not processes: hashing and decoding run in C with the GIL released, and the cache is
    read in place. At most a few windows of futures exist at once, whatever the corpus size.
    """
    if threads <= 1:
        yield from (_check(c, cache) for c in candidates)
        return
    window = 64 * threads
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="prepare") as pool:
        for start in range(0, len(candidates), window):
            yield from pool.map(_check, candidates[start : start + window], [cache] * window)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """The ``prepare`` stage: :func:`prepare` on ``params.data``."""
    return asdict(prepare(params.data, layout))
