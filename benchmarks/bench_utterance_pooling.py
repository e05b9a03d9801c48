"""How should an utterance embedding be formed from a trained project's encoder? EER and top-1 of five ways.

The embed stage writes one embedding per VAD segment and, per utterance, the renormalised mean of
its segments' embeddings; the evaluate stage scores those. This script re-scores a finished
project (``dvc repro`` done: ``models/ecapa``, ``data/segments.parquet``, ``data/embeddings``)
with the utterance embedding formed in other ways, using the evaluate stage's own trial list and
identification protocol:

* ``segment_mean``: the shipped way (read from ``utterances.parquet``);
* ``duration_weighted``: segments weighted by their duration;
* ``centered``: the shipped mean minus the train split's mean embedding (WeSpeaker's ``cal_mean``);
* ``speech_concat``: one encoder pass over the utterance's VAD segments, concatenated in order;
* ``whole_file``: one encoder pass over the whole file, silences included.

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
from voiceprint import audio  # noqa: E402
from voiceprint.config import load_params  # noqa: E402
from voiceprint.encoders.base import SpeakerEncoder  # noqa: E402
from voiceprint.encoders.registry import load_encoder  # noqa: E402
from voiceprint.evaluate import _identification, all_pairs_scores  # noqa: E402
from voiceprint.layout import Layout  # noqa: E402
from voiceprint.metrics import eer  # noqa: E402
from voiceprint.schema import embeddings_matrix, l2_normalise  # noqa: E402


def _one_pass(encoder: SpeakerEncoder, waves: list[np.ndarray]) -> np.ndarray:
    """One encoder call per wave, whatever its length (no batching: this measures accuracy)."""
    with torch.no_grad():
        return np.stack([encoder.embed(torch.from_numpy(w).unsqueeze(0), torch.ones(1)).float().numpy()[0] for w in waves])


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
    ways = {
        "segment_mean": shipped,
        "duration_weighted": l2_normalise(np.stack([(vectors[r] * duration[r, None]).sum(0) for r in map(rows_of.get, ids)])),
        "centered": l2_normalise(shipped - shipped[~is_eval].mean(0)),
        "speech_concat": l2_normalise(_one_pass(encoder, [
            np.concatenate([files[u][int(seg["start_s"][i] * sr):int(seg["end_s"][i] * sr)] for i in rows_of[u]])
            for u in ids
        ])),
        "whole_file": l2_normalise(_one_pass(encoder, [files[u] for u in ids])),
    }
    for name, x in ways.items():
        scores, same = all_pairs_scores(x[is_eval], speakers[is_eval])
        ident = _identification(x, speakers, is_eval, params)
        emit({
            "bench": "utterance_pooling", "way": name, "model_id": encoder.model_id,
            "eer_pct": round(100 * eer(scores, same)[0], 2), "top1_pct": round(100 * ident["top1"], 1),
            "hardware": hardware(),
        }, args.out)


if __name__ == "__main__":
    main()
