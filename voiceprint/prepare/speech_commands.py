"""Speech Commands v0.02 grouped by speaker: the files, and the fixed speaker-disjoint split.

The folder holds ``<speaker>/<word>_<speaker>_<n>.flac`` and a ``MANIFEST.sha256``
(``../shared/datasets/speech-commands-test``, see its README). Speakers are split by
:func:`split_speakers`: sorted by the SHA-256 of their id, the first half (rounded up) is the eval
split, the rest the train split. The rule needs nothing but the ids, so every checkout, machine and
run draws the same halves, and no speaker is on both sides.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

DEFAULT_FOLDER = "speech-commands-test"
CHECKSUMS = "MANIFEST.sha256"
TRAIN, EVAL = "train", "eval"


def speaker_rank_key(speaker_id: str) -> str:
    """The order the split follows: the hex SHA-256 of the speaker id (UTF-8)."""
    return hashlib.sha256(speaker_id.encode("utf-8")).hexdigest()


def split_speakers(speaker_ids: Iterable[str]) -> dict[str, str]:
    """``{speaker: "eval" | "train"}``: the first ⌈n/2⌉ speakers by :func:`speaker_rank_key` evaluate."""
    ranked = sorted(set(speaker_ids), key=lambda s: (speaker_rank_key(s), s))
    n_eval = math.ceil(len(ranked) / 2)
    return {speaker: EVAL if rank < n_eval else TRAIN for rank, speaker in enumerate(ranked)}


def word_of(utterance_id: str) -> str:
    """The spoken word of ``<word>_<speaker>_<n>`` (the file stem)."""
    return utterance_id.rsplit("_", 2)[0]
