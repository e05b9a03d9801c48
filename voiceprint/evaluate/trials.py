"""Verification trial lists of the evaluate stage: all pairs, a seeded balanced sample, or a trial file.

:func:`load_trials` turns ``evaluate.trials`` into a :class:`TrialList` (``all-pairs``, ``sampled:N``
through :func:`sample_trials`, or a VoxCeleb-format file through :func:`read_trial_file`), and
:func:`score_trials` scores one block by block. A bad line is an error, never a skipped trial.
Design (the name-matching rules, the all-pairs limit): docs/design/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voiceprint.common.schema import l2_normalise
from voiceprint.config import ALL_PAIRS, ConfigError, parse_trials

__all__ = [
    "MAX_ALL_PAIRS_TRIALS",
    "TrialList",
    "TrialListError",
    "load_trials",
    "read_trial_file",
    "sample_trials",
    "score_trials",
    "utterance_keys",
]

#: The most trials ``all-pairs`` (and ``sampled:N``) may hold: all pairs of ~14,100 eval utterances.
#: The stage keeps every trial's score and flag and, for the metrics, the AS-norm matrix and the
#: bootstrap, sorted and index copies of them: measured at 125-150 bytes a trial at its peak (4.5
#: million trials, defaults), so 10^8 trials need ~15 GB, and each 10^8 more another ~15 GB. Above
#: it, choose a trial list (``sampled:N`` or a trial file).
MAX_ALL_PAIRS_TRIALS = 100_000_000
_TRIAL_BLOCK = 8192  # trials scored at once: two gathered (block x D) float32 arrays, ~13 MB at D=192
_SHOWN = 5  # unknown names quoted in an error message


class TrialListError(ConfigError):
    """A trial list that cannot be used: the message names the file and line, or the parameter."""


@dataclass(frozen=True)
class TrialList:
    """The verification trials of one evaluation: indices into the eval utterances (rows of the stage's matrix).

    ``left``/``right``/``same`` are None for ``all-pairs``, which is scored and resampled by the
    all-pairs code path (the strict upper triangle in row-major order).
    """

    spec: str
    left: np.ndarray | None = None
    right: np.ndarray | None = None
    same: np.ndarray | None = None

    @property
    def all_pairs(self) -> bool:
        return self.left is None

    def __len__(self) -> int:
        return 0 if self.left is None else len(self.left)


def score_trials(vectors: np.ndarray, left: np.ndarray, right: np.ndarray, *, block: int = _TRIAL_BLOCK) -> np.ndarray:
    """Cosine score (float32) of each trial ``(vectors[left[k]], vectors[right[k]])``, a block of trials at a time.

    Rows are L2-normalised first. Peak extra memory is two ``block x D`` gathers plus the scores.
    """
    x = l2_normalise(np.asarray(vectors, dtype=np.float32))
    left, right = np.asarray(left, dtype=np.int64).reshape(-1), np.asarray(right, dtype=np.int64).reshape(-1)
    if left.shape != right.shape:
        raise ValueError(f"left ({left.size}) and right ({right.size}) differ in length")
    out = np.empty(left.size, dtype=np.float32)
    for start in range(0, left.size, block):
        stop = min(left.size, start + block)
        out[start:stop] = np.einsum("ij,ij->i", x[left[start:stop]], x[right[start:stop]])
    return out


# ----------------------------------------------------------------------------------------------
# all-pairs: the size check
# ----------------------------------------------------------------------------------------------


def check_all_pairs(n_utterances: int) -> None:
    """ConfigError when all pairs of ``n_utterances`` exceed :data:`MAX_ALL_PAIRS_TRIALS`."""
    n_trials = n_utterances * (n_utterances - 1) // 2
    if n_trials > MAX_ALL_PAIRS_TRIALS:
        suggested = min(MAX_ALL_PAIRS_TRIALS, 1_000_000)
        raise TrialListError(
            f"evaluate.trials: {ALL_PAIRS} over {n_utterances:,} eval utterances is {n_trials:,} trials, more "
            f"than the {MAX_ALL_PAIRS_TRIALS:,} the evaluate stage holds in memory; set evaluate.trials to "
            f"sampled:N (e.g. sampled:{suggested}, N balanced trials drawn with evaluate.seed) or to a trial "
            "file in the VoxCeleb format (e.g. the official VoxCeleb1 list)"
        )


# ----------------------------------------------------------------------------------------------
# sampled:N
# ----------------------------------------------------------------------------------------------


def _choose(rng: np.random.Generator, total: int, k: int) -> np.ndarray:
    """``k`` distinct integers of ``[0, total)``, uniformly (every k-subset equally likely), sorted.

    Memory ``O(k)`` even for ``total`` ~ 10^10: draws with replacement until ``k`` distinct values
    are in hand, then keeps a uniform k-subset of them (exchangeable, so the subset is uniform).
    A dense request (``k > total / 8``) permutes ``[0, total)`` instead, which is then ``O(k)`` too.
    """
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if 8 * k > total:
        return np.sort(rng.permutation(total)[:k]).astype(np.int64)
    chosen = np.zeros(0, dtype=np.int64)
    while chosen.size < k:
        draw = rng.integers(0, total, size=int(1.05 * (k - chosen.size)) + 16, dtype=np.int64)
        chosen = np.unique(np.concatenate([chosen, draw]))
    if chosen.size > k:
        chosen = np.sort(rng.choice(chosen, size=k, replace=False))
    return chosen


def _pick_pairs(
    rng: np.random.Generator, k: int, first: np.ndarray, count: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` distinct pairs ``(p, first[p] + o)`` with ``0 <= o < count[p]``, uniformly among all such pairs."""
    ends = np.cumsum(count, dtype=np.int64)
    ordinals = _choose(rng, int(ends[-1]) if ends.size else 0, k)
    rows = np.searchsorted(ends, ordinals, side="right")
    offsets = ordinals - (ends[rows] - count[rows])
    return rows, first[rows] + offsets


def sample_trials(speakers: np.ndarray, n_trials: int, seed: int, spec: str | None = None) -> TrialList:
    """``n_trials`` balanced trials over utterances with these ``speakers`` (any labels), drawn with ``seed``.

    ``n_trials // 2`` target trials are drawn uniformly without replacement from the same-speaker
    pairs ``i != j``, the rest likewise from the different-speaker pairs; both sides of a trial are
    indices into ``speakers`` (left < right in speaker-sorted order), and the trials are sorted by
    ``(left, right)``. TrialListError when the eval set has fewer pairs of a kind than asked for.
    """
    spec = spec or f"sampled:{n_trials}"
    labels = np.asarray(speakers).astype(str)
    n_target = n_trials // 2
    n_nontarget = n_trials - n_target
    codes = np.unique(labels, return_inverse=True)[1].reshape(-1)
    order = np.argsort(codes, kind="stable")  # position p in speaker-sorted order -> utterance index
    sorted_codes = codes[order]
    n = len(labels)
    group_end = np.searchsorted(sorted_codes, sorted_codes, side="right").astype(np.int64)  # one past the speaker
    position = np.arange(n, dtype=np.int64)
    # Position p pairs with the later positions of its own speaker (targets) and with every position
    # after its speaker's block (non-targets): each unordered pair counted once, self-pairs never.
    target_count = group_end - position - 1
    nontarget_count = n - group_end
    available_target, available_nontarget = int(target_count.sum()), int(nontarget_count.sum())
    if n_target > available_target or n_nontarget > available_nontarget:
        # The largest N with N // 2 targets and N - N // 2 non-targets available.
        limit = 2 * available_target + 1 if available_nontarget > available_target else 2 * available_nontarget
        raise TrialListError(
            f"evaluate.trials: {spec} asks for {n_target:,} same-speaker and {n_nontarget:,} different-speaker "
            f"trials, but the {n:,} eval utterances form only {available_target:,} same-speaker and "
            f"{available_nontarget:,} different-speaker pairs; use at most sampled:{limit} "
            "(or all-pairs, or a trial file)"
        )
    rng = np.random.default_rng(seed)
    t_rows, t_cols = _pick_pairs(rng, n_target, position + 1, target_count)
    n_rows, n_cols = _pick_pairs(rng, n_nontarget, group_end, nontarget_count)
    rows = np.concatenate([t_rows, n_rows])
    cols = np.concatenate([t_cols, n_cols])
    same = np.concatenate([np.ones(n_target, bool), np.zeros(n_nontarget, bool)])
    left, right = order[rows], order[cols]
    by_pair = np.lexsort((right, left))
    return TrialList(spec, left[by_pair], right[by_pair], same[by_pair])


# ----------------------------------------------------------------------------------------------
# trial files
# ----------------------------------------------------------------------------------------------


def utterance_keys(utterance_ids: np.ndarray, speakers: np.ndarray) -> dict[str, int]:
    """Name -> row, rules 1 and 2 of docs/design/evaluation.md: ``<speaker_id>/<utterance_id>``, ``<utterance_id>``.

    A key two rows would share maps to -1 (ambiguous), reported if a trial uses it.
    """
    keys: dict[str, int] = {}
    for row, (utt, spk) in enumerate(zip(utterance_ids.tolist(), speakers.tolist(), strict=True)):
        for key in (f"{spk}/{utt}", str(utt)):
            keys[key] = row if keys.get(key, row) == row else -1
    return keys


def _lookup(name: str, keys: dict[str, int]) -> int | None:
    """The row a trial name names (-1: ambiguous), trying the rules of docs/design/evaluation.md in turn."""
    while name.startswith("./"):
        name = name[2:]
    last = name.rpartition("/")[2]
    dot = last.rfind(".")
    has_suffix = 0 < dot < len(last) - 1  # as pathlib's suffix: not a leading dot, not a trailing one
    forms = [name, name[: len(name) - len(last) + dot]] if has_suffix else [name]
    for form in forms:  # rules 1 and 2: <speaker_id>/<utterance_id>, <utterance_id>
        if form in keys:
            return keys[form]
    for form in forms:  # rule 3: '/' read as '-'
        if "/" in form and (row := keys.get(form.replace("/", "-"))) is not None:
            return row
    for form in forms:  # rule 4: LibriSpeech, <speaker>/<chapter>/<speaker>-<chapter>-<n>
        folders, _, stem = form.rpartition("/")
        if folders and "/" not in stem and stem.startswith(folders.replace("/", "-") + "-"):
            row = keys.get(stem)
            if row is not None:
                return row
    return None


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def read_trial_file(
    path: Path,
    utterance_ids: np.ndarray,
    speakers: np.ndarray,
    is_eval: np.ndarray,
    spec: str | None = None,
) -> TrialList:
    """The trials of a VoxCeleb-format file as indices into the eval rows (``utterance_ids[is_eval]``).

    ``utterance_ids``, ``speakers`` and ``is_eval`` describe every utterance of the embeddings
    table (train ones too, so that a trial naming a train-split utterance says so). Raises
    :class:`TrialListError` naming ``path``, the line number and the offending name or label.
    """
    ids = np.asarray(utterance_ids).astype(str)
    spk = np.asarray(speakers).astype(str)
    is_eval = np.asarray(is_eval, dtype=bool)
    keys = utterance_keys(ids, spk)
    eval_row = np.full(len(ids), -1, dtype=np.int64)
    eval_row[is_eval] = np.arange(int(is_eval.sum()))
    shown = str(path)

    lines: list[int] = []
    labels: list[bool] = []
    left: list[int] = []
    right: list[int] = []
    unknown: list[tuple[int, str, str]] = []  # line, name, what it matched instead
    found: dict[str, int | None] = {}  # name -> row: a list names each utterance many times
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TrialListError(f"{shown}: trial file could not be read ({err})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise TrialListError(
                f"{shown}:{number}: malformed trial {line.strip()!r}: expected 'LABEL UTTERANCE UTTERANCE' with "
                "LABEL 1 (same speaker) or 0 (different speakers), e.g. "
                "'1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav'"
            )
        sides = []
        for name in fields[1:]:
            row = found[name] if name in found else found.setdefault(name, _lookup(name, keys))
            if row == -1:
                raise TrialListError(f"{shown}:{number}: utterance name {name!r} matches several utterances")
            if row is None or eval_row[row] < 0:
                unknown.append((number, name, "a train-split utterance" if row is not None else "no utterance"))
                sides = []
                break
            sides.append(row)
        if not sides:
            continue
        if sides[0] == sides[1]:
            raise TrialListError(f"{shown}:{number}: trial of utterance {fields[1]!r} with itself")
        lines.append(number)
        labels.append(fields[0] == "1")
        left.append(int(eval_row[sides[0]]))
        right.append(int(eval_row[sides[1]]))
    if unknown:
        number, name, matched = unknown[0]
        more = ""
        if len(unknown) > 1:
            listed = ", ".join(f"line {n} {u!r}" for n, u, _ in unknown[1 : 1 + _SHOWN])
            more = f"; {_plural(len(unknown) - 1, 'more line')} name utterances not in the eval split ({listed}"
            more += ", ...)" if len(unknown) > 1 + _SHOWN else ")"
        raise TrialListError(
            f"{shown}:{number}: utterance {name!r} is not in the eval-split embeddings (it matches {matched}){more}. "
            "A name matches an eval utterance as <speaker_id>/<utterance_id>, as <utterance_id>, with each '/' "
            "read as '-', or as LibriSpeech's <speaker>/<chapter>/<utterance_id>, with or without its extension "
            "(voiceprint/evaluate/trials.py)"
        )
    if not lines:
        raise TrialListError(f"{shown}: no trials in the trial file")
    left_a, right_a = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
    eval_speakers = spk[is_eval]
    same = eval_speakers[left_a] == eval_speakers[right_a]
    label = np.asarray(labels, dtype=bool)
    wrong = np.flatnonzero(same != label)
    if wrong.size:
        k = int(wrong[0])
        a, b = str(eval_speakers[left_a[k]]), str(eval_speakers[right_a[k]])
        said = "1 (same speaker)" if label[k] else "0 (different speakers)"
        truth = f"both utterances are speaker {a!r}" if a == b else f"the utterances are speakers {a!r} and {b!r}"
        more = f" ({_plural(wrong.size, 'line')} contradict them in all)" if wrong.size > 1 else ""
        raise TrialListError(f"{shown}:{lines[k]}: label {said} contradicts the speaker ids: {truth}{more}")
    return TrialList(spec or str(path), left_a, right_a, same)


# ----------------------------------------------------------------------------------------------
# the stage's entry point
# ----------------------------------------------------------------------------------------------


def load_trials(
    spec: str,
    utterance_ids: np.ndarray,
    speakers: np.ndarray,
    is_eval: np.ndarray,
    *,
    root: Path,
    seed: int,
) -> TrialList:
    """The trials ``evaluate.trials`` names, over the eval rows of an embeddings table.

    ``utterance_ids``/``speakers``/``is_eval`` cover every row of the table; the trial indices
    count eval rows in table order. A relative trial-file path is resolved against ``root``
    (the project root).
    """
    kind, value = parse_trials(spec)
    is_eval = np.asarray(is_eval, dtype=bool)
    n_eval = int(is_eval.sum())
    if kind == "all-pairs":
        check_all_pairs(n_eval)
        return TrialList(spec)
    if kind == "sampled":
        assert isinstance(value, int)
        if value > MAX_ALL_PAIRS_TRIALS:
            raise TrialListError(
                f"evaluate.trials: {spec} is more than the {MAX_ALL_PAIRS_TRIALS:,} trials the evaluate stage "
                "holds in memory; use a smaller N"
            )
        return sample_trials(np.asarray(speakers)[is_eval], value, seed, spec)
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise TrialListError(
            f"evaluate.trials: trial file {path} does not exist (evaluate.trials={spec!r}; relative paths are "
            f"resolved against {root})"
        )
    return read_trial_file(path, utterance_ids, speakers, is_eval, spec)
