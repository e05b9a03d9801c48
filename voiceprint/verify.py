"""Speaker verification with a warm model: load once, score many pairs.

``voiceprint verify`` is a one-shot CLI; services and notebooks keep a :class:`Verifier` alive so
each pair costs only decoding, VAD and two forward passes (tens of milliseconds on CPU) instead of
seconds of imports and model loading. The threshold is the EER operating point the evaluate stage
measured, and the pair is scored through the back-end it measured it with (data/backend/), so
"same speaker" means what the reported EER means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voiceprint.common.layout import Layout
from voiceprint.config import load_params
from voiceprint.embed.engine import load_pipeline_encoder, pick_device
from voiceprint.embed.utterances import embed_utterance_file
from voiceprint.encoders.base import SpeakerEncoder
from voiceprint.evaluate.backend import Backend, backend_path, read_backend


class VerifyError(RuntimeError):
    """Missing model, metrics or input file: something the user fixes, reported without a traceback."""


@dataclass(frozen=True)
class Verdict:
    score: float
    threshold: float
    same_speaker: bool

    def as_dict(self) -> dict[str, object]:
        return {"score": round(self.score, 4), "threshold": round(self.threshold, 4), "same_speaker": self.same_speaker}


def _set_block(layout: Layout, eval_set: str | None) -> tuple[str | None, dict[str, object]]:
    """``(set name, its metrics.json block)``; the name is None for a metrics.json from before eval sets."""
    if not layout.metrics.exists():
        raise VerifyError(f"no {layout.metrics}: run the evaluate stage first or pass --threshold")
    metrics = json.loads(layout.metrics.read_text())
    blocks = {name: block for name, block in metrics.items() if isinstance(block, dict)}
    if not blocks:  # metrics.json from before eval sets: one flat block
        return None, metrics
    name = eval_set or next(iter(blocks))
    if name not in blocks:
        raise VerifyError(f"{layout.metrics} has no eval set {name!r} (it has {sorted(blocks)})")
    return name, blocks[name]


def eer_threshold(layout: Layout, eval_set: str | None = None) -> float:
    """The EER operating point of ``eval_set`` in metrics.json (default: its first set, the primary source's)."""
    name, block = _set_block(layout, eval_set)
    if block.get("eer_threshold") is None:
        raise VerifyError(f"{layout.metrics}: eval set {name!r} has no eer_threshold; pass --threshold")
    return float(block["eer_threshold"])  # type: ignore[arg-type]


def scoring_backend(layout: Layout, eval_set: str | None = None) -> Backend:
    """The back-end the evaluate stage scored ``eval_set`` with (data/backend/<set>.json), so a score
    here is on the scale of that set's threshold; none (raw cosine) where the stage used none."""
    if not layout.metrics.exists():
        return Backend()
    name, block = _set_block(layout, eval_set)
    if name is None or not (block.get("backend_centre_utterances") or block.get("backend_lda_dim")):
        return Backend()
    path = backend_path(layout, name)
    if not path.exists():
        raise VerifyError(f"{path}: missing, but {layout.metrics} was scored through it; run `dvc repro evaluate`")
    try:
        return read_backend(path)
    except (ValueError, KeyError) as err:
        raise VerifyError(f"{path}: {err}; run `dvc repro evaluate`") from err


def load_project_encoder(layout: Layout) -> SpeakerEncoder:
    if not (layout.model_dir / "embedding_model.ckpt").exists():
        raise VerifyError(f"no model at {layout.model_dir}: run `dvc repro` (or `make run`) first")
    params = load_params(layout.params)
    return load_pipeline_encoder(layout, pick_device(params.embed.device), params.embed.backend, amp=params.embed.amp)


class Verifier:
    """Holds the encoder, VAD settings and threshold of one project."""

    def __init__(self, layout: Layout, *, threshold: float | None = None, encoder: SpeakerEncoder | None = None):
        self.layout = layout
        self.params = load_params(layout.params)
        self.encoder = encoder or load_project_encoder(layout)
        self._threshold = threshold
        self._backend: Backend | None = None

    @property
    def threshold(self) -> float:
        if self._threshold is None:
            self._threshold = eer_threshold(self.layout)
        return self._threshold

    def embed(self, path: str | Path) -> np.ndarray:
        if not Path(path).is_file():
            raise VerifyError(f"{path}: no such file")
        return embed_utterance_file(self.encoder, path, self.params.vad, self.params.embed)

    @property
    def backend(self) -> Backend:
        """The scoring back-end of the project's first eval set (what its threshold was measured with)."""
        if self._backend is None:
            self._backend = scoring_backend(self.layout)
        return self._backend

    def score(self, a: str | Path, b: str | Path) -> float:
        pair = self.backend.apply(np.stack([self.embed(a), self.embed(b)]))
        return float(pair[0] @ pair[1])

    def verify(self, a: str | Path, b: str | Path) -> Verdict:
        score = self.score(a, b)
        return Verdict(score, self.threshold, score >= self.threshold)

    def warm_up(self) -> None:
        """Run the VAD model and the encoder once, so the first real call is not the slow one."""
        from voiceprint.segment.vad import _silero_sequence_model

        if self.params.vad.method == "silero":
            _silero_sequence_model()
        with torch.inference_mode():
            self.encoder.embed(
                torch.zeros(1, 16_000, device=self.encoder.device), torch.ones(1, device=self.encoder.device)
            )
