"""How should an utterance embedding be formed from a trained project's encoder? EER and top-1 of ten ways.

The embed stage writes one embedding per VAD segment and one per utterance (``embed.utterance``:
one pass over the whole file, or the renormalised mean of its segments' embeddings); the evaluate
stage scores the utterance table. This script re-scores a finished project (``dvc repro`` done:
``models/ecapa``, ``data/segments.parquet``, ``data/embeddings``) with the utterance embedding
formed in other ways, using the evaluate stage's own trial list and identification protocol:

* ``shipped``: what the embed stage wrote (``utterances.parquet``), whichever way it was set to;
* ``segment_mean``: the renormalised mean of the segment embeddings (``embed.utterance: segments``);
* ``duration_weighted``: segments weighted by their duration;
* ``centered``: the segment mean minus the train split's mean embedding (WeSpeaker's ``cal_mean``);
* ``speech_concat``: one encoder pass over the utterance's VAD segments, concatenated in order;
* ``whole_file``: one encoder pass over the whole file, silences included (``embed.utterance: file``,
  here one file a call in float32 rather than in the stage's padded bf16 batches);
* ``segment_float32``: each segment in its own float32 call (the shipped stage pads segments into
  length-bucketed batches and runs bf16 autocast where the CPU has native bf16);
* ``segment_bf16``: each segment in its own call under bf16 autocast (only where bf16 is native),
  which with ``segment_float32`` separates the effect of the precision from that of the padding;
* ``tiled_2s``: segments shorter than the training crop (2 s) tiled cyclically up to it, as the
  training sampler tiles short clips, the others as they are; float32;
* ``windows_2s``: segments longer than 2 s cut into 2-s windows with a 1-s hop (the last window
  ending at the segment's end), the windows' normalised embeddings averaged; float32.

The segment-level ways are pooled into utterances like the shipped stage: the renormalised mean of
the utterance's normalised segment embeddings. Every way is then scored through the stage's
``evaluate.backend`` (centred on the train split by default), so ``centered`` differs from
``segment_mean`` only where the back-end is off.

    python benchmarks/bench_utterance_pooling.py [--project .] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import emit, hardware  # noqa: E402
from voiceprint.common import audio  # noqa: E402
from voiceprint.common.layout import Layout  # noqa: E402
from voiceprint.common.precision import autocast_dtype  # noqa: E402
from voiceprint.common.schema import embeddings_matrix, l2_normalise  # noqa: E402
from voiceprint.config import load_params  # noqa: E402
from voiceprint.encoders.base import SpeakerEncoder  # noqa: E402
from voiceprint.encoders.loader import load_encoder  # noqa: E402
from voiceprint.evaluate.backend import fit_backend, in_domain_train  # noqa: E402
from voiceprint.evaluate.metrics import eer  # noqa: E402
from voiceprint.evaluate.stage import _identification, all_pairs_scores  # noqa: E402

WINDOW_S, HOP_S = 2.0, 1.0  # the training crop (model.crop_s default) and half of it


def _one_pass(encoder: SpeakerEncoder, waves: list[np.ndarray], dtype: torch.dtype | None = None) -> np.ndarray:
    """One encoder call per wave, whatever its length (no batching: this measures accuracy); autocast to ``dtype``."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        return np.stack(
            [
                encoder.embed(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).unsqueeze(0), torch.ones(1))
                .float()
                .numpy()[0]
                for w in waves
            ]
        )


def tile_to(wave: np.ndarray, samples: int) -> np.ndarray:
    """``wave`` repeated cyclically up to ``samples`` when shorter (as the training sampler does), else as it is."""
    return np.resize(wave, samples) if len(wave) < samples else wave


def windows(wave: np.ndarray, window: int, hop: int) -> list[np.ndarray]:
    """``window``-sample slices every ``hop`` samples, the last one ending at the end; a short wave whole."""
    if len(wave) <= window:
        return [wave]
    starts = list(range(0, len(wave) - window + 1, hop))
    if starts[-1] != len(wave) - window:
        starts.append(len(wave) - window)
    return [wave[s : s + window] for s in starts]


def _windowed(encoder: SpeakerEncoder, waves: list[np.ndarray], window: int, hop: int) -> np.ndarray:
    """Per wave, the mean of its windows' normalised embeddings (one batch of calls for all windows)."""
    cuts = [windows(w, window, hop) for w in waves]
    flat = l2_normalise(_one_pass(encoder, [c for wave_cuts in cuts for c in wave_cuts]))
    ends = np.cumsum([len(c) for c in cuts])
    return np.stack([flat[end - len(c) : end].mean(axis=0) for c, end in zip(cuts, ends)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", default=".", help="a project after dvc repro")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = ap.parse_args(argv)
    root = Path(args.project).resolve()
    layout = Layout.at(root)
    params = load_params(root / "params.yaml")

    utt_table = pq.read_table(layout.utterance_embeddings)
    utts = utt_table.select(["utterance_id", "speaker_id", "split"]).to_pydict()
    ids = utts["utterance_id"]
    speakers = np.asarray(utts["speaker_id"]).astype(str)
    is_eval = np.asarray(utts["split"]) == "eval"
    shipped = l2_normalise(embeddings_matrix(utt_table))

    seg_emb = pq.read_table(layout.embeddings / "segments.parquet")
    seg = seg_emb.select(["utterance_id", "start_s", "end_s"]).to_pydict()
    vectors = embeddings_matrix(seg_emb).astype(np.float64)
    duration = np.asarray(seg["end_s"]) - np.asarray(seg["start_s"])
    rows_of: dict[str, list[int]] = {}
    for i, u in enumerate(seg["utterance_id"]):
        rows_of.setdefault(u, []).append(i)
    for rows in rows_of.values():
        rows.sort(key=lambda i: seg["start_s"][i])

    encoder = load_encoder("ecapa", model_dir=layout.model_dir)
    vad = pq.read_table(layout.segments, columns=["utterance_id", "path"]).to_pydict()
    path_of = dict(zip(vad["utterance_id"], vad["path"]))
    files = {u: audio.load(layout.resolve(path_of[u])) for u in ids}
    sr = audio.TARGET_SR
    segment_waves = [
        files[u][int(s * sr) : int(e * sr)] for u, s, e in zip(seg["utterance_id"], seg["start_s"], seg["end_s"])
    ]

    def pooled(segment_vectors: np.ndarray) -> np.ndarray:
        unit = l2_normalise(segment_vectors)
        return l2_normalise(np.stack([unit[rows_of[u]].mean(axis=0) for u in ids]))

    crop, hop = int(WINDOW_S * sr), int(HOP_S * sr)
    bf16 = autocast_dtype(torch.device("cpu"), amp=True)
    segment_mean = pooled(vectors)
    ways = {
        "shipped": shipped,
        "segment_mean": segment_mean,
        "duration_weighted": l2_normalise(
            np.stack([(vectors[r] * duration[r, None]).sum(0) for r in map(rows_of.get, ids)])
        ),
        "centered": l2_normalise(segment_mean - segment_mean[~is_eval].mean(0)),
        "speech_concat": l2_normalise(
            _one_pass(encoder, [np.concatenate([segment_waves[i] for i in rows_of[u]]) for u in ids])
        ),
        "whole_file": l2_normalise(_one_pass(encoder, [files[u] for u in ids])),
        "segment_float32": pooled(_one_pass(encoder, segment_waves)),
        **({"segment_bf16": pooled(_one_pass(encoder, segment_waves, bf16))} if bf16 is not None else {}),
        "tiled_2s": pooled(_one_pass(encoder, [tile_to(w, crop) for w in segment_waves])),
        "windows_2s": pooled(_windowed(encoder, segment_waves, crop, hop)),
    }
    # Every way is scored as the evaluate stage scores a single set: through evaluate.backend,
    # fitted on the train split (all of it: this script does not split the eval utterances by source).
    split = np.where(is_eval, "eval", "train")
    fit_rows = in_domain_train(np.asarray(ids), split, {}, None)
    for name, raw in ways.items():
        x = fit_backend(raw, speakers, fit_rows, params.evaluate.backend, seed=params.evaluate.seed, name=name).apply(
            raw
        )
        scores, same = all_pairs_scores(x[is_eval], speakers[is_eval])
        ident = _identification(x, speakers, is_eval, params)
        emit(
            {
                "bench": "utterance_pooling",
                "way": name,
                "model_id": encoder.model_id,
                "eer_pct": round(100 * eer(scores, same)[0], 2),
                "top1_pct": round(100 * ident["top1"], 1),
                "hardware": hardware(),
            },
            args.out,
        )


if __name__ == "__main__":
    main()
