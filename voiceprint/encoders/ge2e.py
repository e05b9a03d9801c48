"""GE2E d-vector encoder: Resemblyzer's ``VoiceEncoder`` (3-layer LSTM, 256-d, weights in the wheel).

:func:`load_ge2e` gives a :class:`GE2EEncoder` that keeps Resemblyzer's front end per utterance but
runs the LSTM once per batch of partial windows. A baseline next to ECAPA-TDNN and CAM++;
install with ``pip install -e '.[baselines]'``. Design: docs/design/encoders.md#ge2e.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from voiceprint.encoders.base import SpeakerEncoder
from voiceprint.encoders.bundled import package_file
from voiceprint.encoders.campplus import absolute_lengths, sha256_file

__all__ = ["GE2EEncoder", "ge2e_weights_path", "load_ge2e"]

GE2E_DIM = 256
_VAD_WINDOW = 480  # resemblyzer's 30 ms WebRTC VAD window: shorter input is trimmed to nothing
# embed_utterance's defaults: partial windows per second, and the share of its 1.6 s the last
# partial must cover to be kept.
_PARTIAL_RATE = 1.3
_MIN_COVERAGE = 0.75
# Partials per LSTM call: bounds the input and state memory of a long file (a 60-min file has
# ~4,700 partials) without giving up the batching.
_MAX_PARTIALS_PER_CALL = 512


def ge2e_weights_path() -> Path:
    """``pretrained.pt`` inside the installed resemblyzer package."""
    return package_file("resemblyzer", "pretrained.pt", "GE2E encoder")


class GE2EEncoder(SpeakerEncoder):
    """Resemblyzer's GE2E LSTM behind the :class:`SpeakerEncoder` interface (one item at a time)."""

    name = "ge2e"
    dim = GE2E_DIM

    def __init__(self, voice_encoder: Any, *, weights_sha256: str):
        from resemblyzer import preprocess_wav
        from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram
        from resemblyzer.hparams import audio_norm_target_dBFS

        self.model = voice_encoder.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights_sha256 = weights_sha256
        self._preprocess_wav = preprocess_wav
        self._normalize_volume = normalize_volume
        self._wav_to_mel = wav_to_mel_spectrogram
        self._target_dbfs = audio_norm_target_dBFS

    @property
    def model_id(self) -> str:
        return f"ge2e-{self.weights_sha256[:12]}"

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def to(self, device: str | torch.device) -> GE2EEncoder:
        # VoiceEncoder.embed_utterance sends its mel partials to ``self.device``.
        self.model.device = torch.device(device)
        self.model.to(self.model.device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def preprocess(self, wav: np.ndarray) -> np.ndarray:
        """Resemblyzer's ``preprocess_wav`` (16 kHz already, so no resampling), made total.

        Digital silence is passed through (volume normalisation would divide by zero and give NaN),
        and when the VAD trims everything (a clip under 30 ms, or no voiced window at all) the
        volume-normalised clip is used untrimmed rather than embedding an empty signal.
        """
        if not np.any(wav):
            return wav
        trimmed = self._preprocess_wav(wav)
        if len(trimmed) >= _VAD_WINDOW:
            return trimmed
        return self._normalize_volume(wav, self._target_dbfs, increase_only=True).astype(np.float32)

    def partial_mels(self, wav: np.ndarray) -> np.ndarray:
        """``(n_partials, 160, 40)`` mel windows of one waveform, as ``embed_utterance`` cuts them."""
        wav = self.preprocess(np.asarray(wav, dtype=np.float32))
        wav_slices, mel_slices = self.model.compute_partial_slices(len(wav), _PARTIAL_RATE, _MIN_COVERAGE)
        needed = wav_slices[-1].stop
        if needed >= len(wav):
            wav = np.pad(wav, (0, needed - len(wav)), "constant")
        mel = self._wav_to_mel(wav)
        return np.stack([mel[s] for s in mel_slices]).astype(np.float32)

    def embed_waveforms(self, wavs: list[np.ndarray]) -> np.ndarray:
        """16 kHz float waveforms -> ``(N, 256)`` L2-normalised embeddings, the LSTM batched."""
        stacks = [self.partial_mels(wav) for wav in wavs]
        partials = np.concatenate(stacks)
        with torch.inference_mode():
            embedded = np.concatenate(
                [
                    self.model(torch.from_numpy(partials[i : i + _MAX_PARTIALS_PER_CALL]).to(self.device)).cpu().numpy()
                    for i in range(0, len(partials), _MAX_PARTIALS_PER_CALL)
                ]
            )
        bounds = np.cumsum([0] + [len(s) for s in stacks])
        means = np.stack([embedded[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
        return means / np.linalg.norm(means, axis=1, keepdims=True)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` waveforms + relative lengths -> ``(B, 256)`` float32 on :attr:`device`."""
        if wavs.dim() == 1:
            wavs = wavs.unsqueeze(0)
        counts = absolute_lengths(lengths, wavs.shape[-1])
        host = wavs.detach().float().cpu().numpy()
        vectors = self.embed_waveforms([host[row, :n] for row, n in enumerate(counts)])
        return torch.from_numpy(vectors.astype(np.float32)).to(self.device)


def load_ge2e(*, device: str | torch.device = "cpu") -> GE2EEncoder:
    """Resemblyzer's pretrained GE2E encoder, its weights checked and fingerprinted first."""
    path = ge2e_weights_path()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything that is more than tensors
        raise ValueError(f"{path}: not a plain tensor checkpoint ({type(err).__name__}: {err})") from None
    state = checkpoint.get("model_state") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no 'model_state' in the GE2E checkpoint")

    from resemblyzer import VoiceEncoder

    # VoiceEncoder loads the same file itself (torch.load's default is weights_only=True since 2.6);
    # strict-load the verified state on top so a missing weight fails here instead of silently.
    encoder = VoiceEncoder(device="cpu", verbose=False, weights_fpath=path)
    own = encoder.state_dict()
    missing = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    if missing:
        raise ValueError(f"{path}: GE2E weights missing or mis-shaped: {missing[:5]}")
    encoder.load_state_dict({k: state[k] for k in own}, strict=True)
    return GE2EEncoder(encoder, weights_sha256=sha256_file(path)).to(device)
