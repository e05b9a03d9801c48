"""The OpenSLR LibriSpeech corpus (SLR12): subsets, published checksums and acquisition.

Acquisition prefers what is already on disk: an extracted ``LibriSpeech/<subset>/`` tree or the
``<subset>.tar.gz`` archive in a local mirror, then a previous extraction under ``downloads``, and
only then the network. Archives are verified against the MD5 sums OpenSLR publishes in
``md5sum.txt`` whatever their origin, and extracted with :func:`safe_extract`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from voiceprint.common.checksums import md5_file
from voiceprint.prepare.archive import read_marker, safe_extract
from voiceprint.prepare.download import download

log = logging.getLogger(__name__)

DEFAULT_URL_BASE = "https://www.openslr.org/resources/12"

# From https://www.openslr.org/resources/12/md5sum.txt. A mutable module-level table on purpose:
# tests (and private mirrors) register extra subset names here.
SUBSET_MD5: dict[str, str] = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}

AUDIO_SUFFIX = ".flac"


class LibriSpeechError(RuntimeError):
    """A subset that cannot be obtained or does not look like LibriSpeech."""


@dataclass(frozen=True)
class Utterance:
    speaker_id: str
    chapter_id: str
    utterance_id: str
    path: Path


def check_subset(subset: str) -> str:
    """Return ``subset`` if it is a known subset name, else raise naming the allowed ones."""
    if subset not in SUBSET_MD5:
        raise LibriSpeechError(f"unknown LibriSpeech subset {subset!r} (known: {', '.join(sorted(SUBSET_MD5))})")
    return subset


def subset_url(subset: str, url_base: str = DEFAULT_URL_BASE) -> str:
    return f"{url_base.rstrip('/')}/{check_subset(subset)}.tar.gz"


def fetch_subset(
    subset: str,
    *,
    downloads: Path,
    mirror: Path | None = None,
    url_base: str = DEFAULT_URL_BASE,
    progress: bool = True,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30,
) -> Path:
    """Make ``LibriSpeech/<subset>/`` available locally and return that directory.

    Looked for, in order: ``{mirror}/LibriSpeech/<subset>/`` (used in place), a finished extraction
    in ``{downloads}/<subset>/``, ``{mirror}/LibriSpeech/<subset>.tar.gz`` and finally
    ``{url_base}/<subset>.tar.gz`` downloaded (resumably) to ``{downloads}/<subset>.tar.gz``.
    """
    check_subset(subset)
    expected_md5 = SUBSET_MD5[subset]
    if mirror is not None:
        tree = Path(mirror) / "LibriSpeech" / subset
        if tree.is_dir():
            log.info("using the extracted LibriSpeech %s in the mirror at %s", subset, tree)
            return tree

    target = Path(downloads) / subset
    extracted = target / "LibriSpeech" / subset
    marker = read_marker(target)
    # Checking the marker first keeps reruns cheap: no multi-gigabyte MD5 pass, no network, and the
    # archive may even have been deleted to save space.
    if marker is not None and marker.get("archive") == f"{subset}.tar.gz" and extracted.is_dir():
        return extracted

    archive: Path | None = None
    if mirror is not None:
        candidate = Path(mirror) / "LibriSpeech" / f"{subset}.tar.gz"
        if candidate.is_file():
            actual = md5_file(candidate)
            if actual != expected_md5:
                raise LibriSpeechError(
                    f"{candidate}: md5 {actual} does not match the published {expected_md5}; "
                    f"the mirror copy is corrupt or not LibriSpeech {subset}"
                )
            archive = candidate
    if archive is None:
        archive = download(
            subset_url(subset, url_base),
            Path(downloads) / f"{subset}.tar.gz",
            md5=expected_md5,
            retries=retries,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
            progress=progress,
        )
    safe_extract(archive, target)
    if not extracted.is_dir():
        raise LibriSpeechError(f"{archive}: does not contain LibriSpeech/{subset}/")
    return extracted


def iter_utterances(subset_root: Path) -> list[Utterance]:
    """Every ``<speaker>/<chapter>/<utterance>.flac`` under ``subset_root``, sorted by path."""
    root = Path(subset_root)
    out: list[Utterance] = []
    for speaker in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for chapter in sorted(p for p in speaker.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for flac in sorted(chapter.glob(f"*{AUDIO_SUFFIX}")):
                if flac.name.startswith("."):
                    continue
                out.append(Utterance(speaker.name, chapter.name, flac.stem, flac))
    return out
