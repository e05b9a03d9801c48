"""model.centre_embeddings / model.wccn: the final-layer fold removes the training mean, whitens the
within-speaker scatter, and changes nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from voiceprint.common import audio
from voiceprint.config import ModelParams
from voiceprint.encoders.ecapa import EcapaConfig
from voiceprint.encoders.moe import MoeConfig
from voiceprint.training.centring import (
    centre_embeddings,
    centre_output,
    segment_embeddings,
    transform_output,
    wccn_transform,
)


def _clips(excerpts_dir: Path, n: int = 6) -> list[np.ndarray]:
    files = sorted((excerpts_dir / "train-clean-100").glob("*/*.flac"))[:n]
    return [audio.load(f, 0.0, 1.5 + 0.5 * k) for k, f in enumerate(files)]  # unequal lengths


def _embed(model: torch.nn.Module, cfg: EcapaConfig, clips: list[np.ndarray]) -> torch.Tensor:
    fbank, norm = cfg.build_fbank(), cfg.build_norm()
    model.eval()
    with torch.inference_mode():
        out = []
        for clip in clips:
            wav, lengths = torch.from_numpy(clip)[None], torch.ones(1)
            out.append(model(norm(fbank(wav), lengths), lengths).reshape(-1))
    return torch.stack(out)


@pytest.fixture
def model_and_cfg() -> tuple[torch.nn.Module, EcapaConfig]:
    torch.manual_seed(0)
    cfg = EcapaConfig.from_channels(16, lin_neurons=24)
    model = cfg.build()
    with torch.no_grad():  # a trained net's output has an offset; a fresh one's bias is near zero
        model.fc.conv.bias.add_(torch.linspace(-2.0, 3.0, 24))
    return model, cfg


def test_centring_removes_the_training_mean_and_keeps_every_difference(
    model_and_cfg: tuple[torch.nn.Module, EcapaConfig], excerpts_dir: Path
) -> None:
    model, cfg = model_and_cfg
    clips = _clips(excerpts_dir)
    before = _embed(model, cfg, clips)
    assert before.mean(0).norm() > 0.5 * before.norm(dim=1).mean()  # the offset dominates

    stats = centre_embeddings(model, cfg, [clips[:2], clips[2:]], torch.device("cpu"), progress=False)
    after = _embed(model, cfg, clips)
    assert stats == {"centred_on_segments": 6, "centre_norm": pytest.approx(float(before.mean(0).norm()), rel=1e-4)}
    assert after.mean(0).norm() < 1e-4 * after.norm(dim=1).mean()
    assert torch.allclose(after, before - before.mean(0), atol=1e-4)
    # Cosine scores change (the shared direction is gone): the pairwise cosines of the clips drop.
    cos = lambda e: torch.nn.functional.normalize(e, dim=1) @ torch.nn.functional.normalize(e, dim=1).T  # noqa: E731
    off = ~torch.eye(len(clips), dtype=torch.bool)
    assert cos(after)[off].mean() < cos(before)[off].mean() - 0.3


def test_segment_embeddings_restore_training_mode(
    model_and_cfg: tuple[torch.nn.Module, EcapaConfig], excerpts_dir: Path
) -> None:
    model, cfg = model_and_cfg
    model.train()
    clips = _clips(excerpts_dir, 2)
    got = segment_embeddings(model, cfg, clips, torch.device("cpu"), progress=False)
    assert model.training
    model.eval()
    assert torch.allclose(got, _embed(model, cfg, clips), atol=1e-5)
    with pytest.raises(ValueError, match="no clips"):
        segment_embeddings(model, cfg, [], torch.device("cpu"), progress=False)


def test_same_length_clips_share_a_forward_with_nothing_changed(
    model_and_cfg: tuple[torch.nn.Module, EcapaConfig], excerpts_dir: Path
) -> None:
    """Clips of one length are embedded together; every row must still be its own clip's, in order."""
    model, cfg = model_and_cfg
    long = _clips(excerpts_dir, 6)
    # lengths 2.0, 1.5, 2.0, 1.5, 3.0, 2.0 s, interleaved: two same-length groups and a single
    clips = [long[1][:32000], long[0], long[3][:32000], long[2][:24000], long[4], long[5][:32000]]
    got = segment_embeddings(model, cfg, clips, torch.device("cpu"), progress=False)
    want = _embed(model, cfg, clips)
    assert torch.allclose(got, want, atol=1e-4)
    # rows are not interchangeable: a wrong order would fail the comparison above
    assert (want[0] - want[2]).abs().max() > 1e-2


def test_wccn_transform_whitens_the_within_speaker_scatter() -> None:
    gen = torch.Generator().manual_seed(0)
    d, speakers, per = 6, 40, 5
    centres = torch.randn(speakers, d, generator=gen) * 3.0
    stretch = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.3, 0.2])  # one speaker's segments wander along axis 0
    embs = (centres[:, None, :] + torch.randn(speakers, per, d, generator=gen) * stretch).reshape(-1, d)
    embs -= embs.mean(0)
    labels = torch.arange(speakers).repeat_interleave(per)

    w, dof = wccn_transform(embs, labels, alpha=0.0)
    assert dof == speakers * (per - 1)
    assert torch.allclose(w, w.T, atol=1e-5)
    unit = torch.nn.functional.normalize(embs.double(), dim=1)
    dev = unit - torch.stack([unit[labels == s].mean(0) for s in range(speakers)])[labels]
    scatter = dev.T @ dev / dof
    whitened = w.double() @ scatter @ w.double().T
    assert torch.allclose(whitened, torch.eye(d, dtype=torch.float64) * whitened.trace() / d, atol=1e-4)
    # The regulariser pulls the transform toward a multiple of the identity.
    cond = lambda m: float(torch.linalg.cond(m))  # noqa: E731
    assert cond(wccn_transform(embs, labels, alpha=10.0)[0]) < cond(w) > 2.0
    with pytest.raises(ValueError, match="two or more segments"):
        wccn_transform(embs[: speakers * per : per], labels[: speakers * per : per], alpha=1.0)


def test_wccn_is_folded_exactly_after_the_centring(
    model_and_cfg: tuple[torch.nn.Module, EcapaConfig], excerpts_dir: Path
) -> None:
    model, cfg = model_and_cfg
    clips = _clips(excerpts_dir)
    groups = [clips[:3], clips[3:]]
    before = _embed(model, cfg, clips)
    centred = before - before.mean(0)
    w, dof = wccn_transform(centred, torch.tensor([0, 0, 0, 1, 1, 1]), alpha=1.0)
    stats = centre_embeddings(model, cfg, groups, torch.device("cpu"), wccn=1.0, progress=False)
    assert stats is not None and stats["wccn"] == 1.0 and stats["wccn_dof"] == dof == 4
    assert torch.allclose(_embed(model, cfg, clips), centred @ w.T, atol=1e-4)


def test_transform_output_rejects_a_matrix_of_the_wrong_size(
    model_and_cfg: tuple[torch.nn.Module, EcapaConfig],
) -> None:
    with pytest.raises(ValueError, match="cannot transform"):
        transform_output(model_and_cfg[0], torch.eye(7))


def test_centre_output_rejects_a_mean_of_the_wrong_size(model_and_cfg: tuple[torch.nn.Module, EcapaConfig]) -> None:
    model, _ = model_and_cfg
    with pytest.raises(ValueError, match="cannot centre"):
        centre_output(model, torch.zeros(7))


def test_a_mixture_of_experts_is_left_as_trained(excerpts_dir: Path) -> None:
    cfg = MoeConfig.from_params(2, 16, 8, lin_neurons=24, n_mels=80)
    model = cfg.build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert centre_embeddings(model, cfg, [_clips(excerpts_dir, 2)], torch.device("cpu"), progress=False) is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_wccn_param_needs_centring() -> None:
    assert ModelParams().wccn is None  # off by default
    assert ModelParams(wccn=1.0).wccn == 1.0
    with pytest.raises(ValueError, match="needs model.centre_embeddings"):
        ModelParams(wccn=1.0, centre_embeddings=False)
    with pytest.raises(ValueError):
        ModelParams(wccn=-1.0)
