"""``model.centre_embeddings``: shift the trained ECAPA-TDNN's output so the training speech has mean zero.

:func:`centre_embeddings` folds the training embeddings' mean (and, with ``model.wccn``, a WCCN
transform) into the final linear layer, so the checkpoint itself gives centred embeddings and stays
an unmodified ``ECAPA_TDNN``. Design: docs/design/training.md#centring-and-wccn.
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


#: Clips of one length per forward, at most this many: no padding, and far fewer calls than one
#: clip each (the default's 3,217 training segments have 351 lengths: 20 s -> 10 s on 2 cores, every
#: embedding within 3e-6 of its one-clip value).
SAME_LENGTH_BATCH = 64


def segment_embeddings(
    model: ECAPA_TDNN,
    cfg: EcapaConfig,
    clips: Iterable[np.ndarray],
    device: torch.device,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Raw (not normalised) float32 embeddings ``(N, D)`` of ``clips``, each embedded whole.

    Clips of the same length share a forward, in float32 and eval mode, so neither padding nor bf16
    rounding enters the statistics computed from them.
    """
    fbank = cfg.build_fbank().to(device)
    norm = cfg.build_norm().to(device)
    waves = [np.ascontiguousarray(clip, dtype=np.float32) for clip in clips]
    if not waves:
        raise ValueError("no clips to compute the embedding statistics from")
    by_length: dict[int, list[int]] = {}
    for i, wav in enumerate(waves):
        by_length.setdefault(len(wav), []).append(i)
    batches = [
        group[k : k + SAME_LENGTH_BATCH]
        for _, group in sorted(by_length.items())
        for k in range(0, len(group), SAME_LENGTH_BATCH)
    ]
    rows: list[torch.Tensor | None] = [None] * len(waves)
    was_training = model.training
    model.eval()
    with (
        torch.inference_mode(),
        tqdm(total=len(waves), desc="centre embeddings", unit="seg", disable=not progress) as bar,
    ):
        for batch in batches:
            wav = torch.from_numpy(np.stack([waves[i] for i in batch])).to(device)
            lengths = torch.ones(len(batch), device=device)
            out = model(norm(fbank(wav), lengths), lengths).reshape(len(batch), -1).float().cpu()
            for i, row in zip(batch, out):
                rows[i] = row
            bar.update(len(batch))
    model.train(was_training)
    return torch.stack(rows)


def wccn_transform(embeddings: torch.Tensor, speakers: torch.Tensor, alpha: float) -> tuple[torch.Tensor, int]:
    """``(S_w / mean eigenvalue + alpha I)^(-1/2)`` of the length-normalised ``embeddings``.

    ``embeddings`` ``(N, D)`` must already be centred; ``speakers`` ``(N,)`` labels them. Speakers
    with one segment add nothing to ``S_w``. Returns the symmetric ``(D, D)`` transform and the
    degrees of freedom ``S_w`` was estimated from (segments minus speakers that have two or more).
    """
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    labels, inverse, counts = torch.unique(speakers, return_inverse=True, return_counts=True)
    means = torch.zeros(len(labels), unit.shape[1], dtype=unit.dtype).index_add_(0, inverse, unit)
    means /= counts[:, None].to(unit.dtype)
    deviations = unit - means[inverse]
    dof = int(counts[counts > 1].sum() - (counts > 1).sum())
    if dof == 0:
        raise ValueError("model.wccn needs a training speaker with two or more segments")
    scatter = deviations.T @ deviations / dof
    scatter *= scatter.shape[0] / torch.trace(scatter)
    values, vectors = torch.linalg.eigh(scatter + alpha * torch.eye(scatter.shape[0], dtype=scatter.dtype))
    if float(values.min()) <= 1e-9:
        raise ValueError(f"model.wccn {alpha}: the within-speaker scatter is singular; use a regulariser > 0")
    return ((vectors * values.rsqrt()) @ vectors.T).float(), dof


def centre_output(model: ECAPA_TDNN, mean: torch.Tensor) -> None:
    """Subtract ``mean`` from every output of ``model`` by shifting ``fc``'s bias (in place)."""
    bias = model.fc.conv.bias
    if bias is None or bias.shape != mean.shape:
        raise ValueError(
            f"cannot centre: fc bias {None if bias is None else tuple(bias.shape)}, mean {tuple(mean.shape)}"
        )
    with torch.no_grad():
        bias.sub_(mean.to(bias.device, bias.dtype))


def transform_output(model: ECAPA_TDNN, matrix: torch.Tensor) -> None:
    """Multiply every output of ``model`` by ``matrix`` ``(D, D)`` by folding it into ``fc`` (in place)."""
    conv = model.fc.conv
    if conv.bias is None or matrix.shape != (conv.out_channels, conv.out_channels):
        raise ValueError(f"cannot transform: fc has {conv.out_channels} outputs, matrix {tuple(matrix.shape)}")
    with torch.no_grad():
        m = matrix.to(conv.weight.device, conv.weight.dtype)
        conv.weight.copy_(torch.einsum("oi,ick->ock", m, conv.weight))
        conv.bias.copy_(m @ conv.bias)


def centre_embeddings(
    model: torch.nn.Module,
    cfg: EcapaConfig | MoeConfig,
    clips: list[list[np.ndarray]],
    device: torch.device,
    *,
    wccn: float | None = None,
    progress: bool = True,
) -> dict[str, float] | None:
    """Centre ``model`` on the training clips (``clips[i]``: speaker ``i``'s segments), then apply
    WCCN with regulariser ``wccn`` unless it is None; the card's statistics, or None where it does
    not apply.

    Applies to one ECAPA-TDNN; the mixture of experts normalises each expert before mixing, so
    there is no single linear output to shift, and it is left as trained.
    """
    if not (isinstance(model, ECAPA_TDNN) and isinstance(cfg, EcapaConfig)):
        log.info("model.centre_embeddings: not an ECAPA_TDNN (%s), left uncentred", type(model).__name__)
        return None
    flat = [clip for speaker in clips for clip in speaker]
    embeddings = segment_embeddings(model, cfg, flat, device, progress=progress)
    mean = embeddings.mean(0)
    centre_output(model, mean)
    stats: dict[str, float] = {"centred_on_segments": len(flat), "centre_norm": round(float(mean.norm()), 4)}
    if wccn is not None:
        speakers = torch.cat([torch.full((len(c),), i) for i, c in enumerate(clips)])
        matrix, dof = wccn_transform(embeddings - mean, speakers, wccn)
        transform_output(model, matrix)
        stats.update(wccn=wccn, wccn_dof=dof)
    return stats
