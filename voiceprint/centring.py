"""``model.centre_embeddings``: shift the trained ECAPA-TDNN's output so the training speech has mean zero.

Trained with the teacher's fixed AAM centres (:mod:`voiceprint.teacher_centres`), the student's
embeddings share a common direction: the raw mean over the training segments is about a quarter
of a typical embedding's length. Every cosine then carries that shared part, which lifts the
impostor scores of the voices nearest to it. Subtracting the training mean before scoring is
WeSpeaker's ``cal_mean`` back-end step; here it is folded into the network instead, as a shift of
the bias of the final linear layer (``fc``), so the checkpoint itself produces centred embeddings
for every consumer (embed stage, FAISS index, ``verify``, SpeechBrain's ``EncoderClassifier``) and
stays an unmodified SpeechBrain ``ECAPA_TDNN``. Only training-split audio is used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
from tqdm.auto import tqdm

from voiceprint.encoders.ecapa import EcapaConfig

if TYPE_CHECKING:
    from voiceprint.encoders.moe import MoeConfig

log = logging.getLogger(__name__)


def embedding_mean(
    model: ECAPA_TDNN, cfg: EcapaConfig, clips: Iterable[np.ndarray], device: torch.device, *,
    total: int | None = None, progress: bool = True,
) -> torch.Tensor:
    """Mean raw (not normalised) float32 embedding of ``clips``, each embedded whole and alone.

    One clip per forward, in float32 and eval mode, so neither padding nor bf16 rounding enters
    the statistic.
    """
    fbank = cfg.build_fbank().to(device)
    norm = cfg.build_norm().to(device)
    was_training = model.training
    model.eval()
    total_emb: torch.Tensor | None = None
    count = 0
    with torch.inference_mode():
        for clip in tqdm(clips, total=total, desc="centre embeddings", unit="seg", disable=not progress):
            wav = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None].to(device)
            lengths = torch.ones(1, device=device)
            emb = model(norm(fbank(wav), lengths), lengths).reshape(-1).float()
            total_emb = emb if total_emb is None else total_emb + emb
            count += 1
    model.train(was_training)
    if total_emb is None:
        raise ValueError("no clips to compute the embedding mean from")
    return (total_emb / count).cpu()


def centre_output(model: ECAPA_TDNN, mean: torch.Tensor) -> None:
    """Subtract ``mean`` from every output of ``model`` by shifting ``fc``'s bias (in place)."""
    bias = model.fc.conv.bias
    if bias is None or bias.shape != mean.shape:
        raise ValueError(f"cannot centre: fc bias {None if bias is None else tuple(bias.shape)}, mean {tuple(mean.shape)}")
    with torch.no_grad():
        bias.sub_(mean.to(bias.device, bias.dtype))


def centre_embeddings(
    model: torch.nn.Module, cfg: "EcapaConfig | MoeConfig", clips: list[list[np.ndarray]], device: torch.device, *,
    progress: bool = True,
) -> dict[str, float] | None:
    """Centre ``model`` on the training clips; the card's statistics, or None where it does not apply.

    Applies to one ECAPA-TDNN; the mixture of experts normalises each expert before mixing, so
    there is no single linear output to shift, and it is left as trained.
    """
    if not (isinstance(model, ECAPA_TDNN) and isinstance(cfg, EcapaConfig)):
        log.info("model.centre_embeddings: not an ECAPA_TDNN (%s), left uncentred", type(model).__name__)
        return None
    flat = [clip for speaker in clips for clip in speaker]
    mean = embedding_mean(model, cfg, flat, device, total=len(flat), progress=progress)
    centre_output(model, mean)
    return {"centred_on_segments": len(flat), "centre_norm": round(float(mean.norm()), 4)}
