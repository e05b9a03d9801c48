"""ECAPA-TDNN's network in OpenVINO on CPU (``embed.backend: openvino``), features still in torch.

:func:`export_onnx` writes SpeechBrain's ``ECAPA_TDNN`` (the network after the features) as ONNX with
dynamic batch and frame axes; :func:`compile_onnx` compiles it for OpenVINO's CPU plugin, once per
process and with OpenVINO's on-disk blob cache. :class:`OpenVinoEncoder` is an ECAPA encoder whose
network is that compiled model: decoding, Fbank and mean normalisation stay the torch float32 code
of :class:`~voiceprint.encoders.ecapa.FbankEncoder`. ``openvino`` and ``onnx`` are imported only
here, so ``embed.backend: torch`` never loads them.
Measurements: docs/experiments/2026-12-06-cpu-backends.md; switch: docs/stages.md#embed.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voiceprint.common.atomic import atomic_path
from voiceprint.encoders.base import SpeakerEncoder
from voiceprint.encoders.ecapa import EcapaEncoder, FbankEncoder

__all__ = [
    "EXPORT_VERSION",
    "OpenVinoEncoder",
    "OpenVinoNet",
    "bf16_supported",
    "check_export",
    "compile_onnx",
    "default_cache_dir",
    "export_onnx",
    "frames_of",
    "openvino_encoder",
]

#: Bump when :func:`export_onnx` changes the graph it writes: cached exports carry it in their name.
EXPORT_VERSION = 2


# --------------------------------------------------------------------------------------------------
# Export


class _Frames(threading.local):
    frames: torch.Tensor | None = None


_TRACE = _Frames()


def _mask(
    length: torch.Tensor, max_len: Any = None, dtype: torch.dtype | None = None, device: Any = None
) -> torch.Tensor:
    """SpeechBrain's ``length_to_mask`` for the export: ``arange(T) < frames`` in int64.

    SpeechBrain's own version bakes the traced batch size into the graph (``expand(len(length),
    ...)``) and compares float frame positions with ``relative length * T``, which OpenVINO's bf16
    inference precision rounds (bf16 holds integers exactly only up to 256): padded rows then
    lost or gained frames, cosine 0.966 to float32 on the small project's real segments. ECAPA_TDNN
    keeps T frames throughout, so the graph input's valid frames per row serve every mask.
    """
    frames = _TRACE.frames
    assert frames is not None, "only while exporting"
    mask = torch.arange(max_len, device=length.device).unsqueeze(0) < frames.unsqueeze(1)
    return mask.to(dtype or length.dtype)


class _FramesInput(torch.nn.Module):
    """What is exported: ``(feats (B, T, F), frames (B,) int64 valid frames)`` -> ``(B, 1, D)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        _TRACE.frames = frames
        return self.model(feats, frames.to(feats.dtype) / feats.shape[1])  # masks read frames (_mask)


@contextmanager
def _traceable_masks() -> Iterator[None]:
    import speechbrain.lobes.models.ECAPA_TDNN as sb_ecapa

    original = sb_ecapa.length_to_mask
    sb_ecapa.length_to_mask = _mask
    try:
        yield
    finally:
        sb_ecapa.length_to_mask = original
        _TRACE.frames = None


def frames_of(lengths: np.ndarray, frames: int) -> np.ndarray:
    """Valid frames per row from relative ``lengths``, exactly as SpeechBrain's float32 mask counts
    them: frame i is valid iff ``i < lengths * T``, i.e. ``i < ceil(lengths * T)``."""
    return np.ceil(np.asarray(lengths, np.float32) * np.float32(frames)).astype(np.int64)


def export_onnx(model: torch.nn.Module, path: str | Path, n_mels: int) -> Path:
    """``ECAPA_TDNN`` as ONNX: ``feats (B, frames, n_mels)``, ``frames (B,)`` int64 -> ``embedding (B, 1, D)``.

    TorchScript exporter (opset 17; needs the ``onnx`` package), batch and frame axes dynamic,
    masks in integers (:func:`_mask`). The file appears atomically, so processes exporting the
    same model at once never read half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training = model.training  # the exporter leaves the wrapper (and so ``model``) in the wrapper's mode
    wrapper = _FramesInput(model).eval()
    try:
        with atomic_path(path, suffix=".onnx") as tmp, _traceable_masks(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (torch.randn(2, 300, n_mels), torch.tensor([300, 210])),
                str(tmp),
                input_names=["feats", "frames"],
                output_names=["embedding"],
                dynamic_axes={"feats": {0: "batch", 1: "frames"}, "frames": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    finally:
        model.train(training)
    return path


def check_export(run: Callable[[np.ndarray, np.ndarray], np.ndarray], model: torch.nn.Module, n_mels: int) -> float:
    """Max abs difference of ``run(feats, lengths)`` to torch fp32 on a batch size (3) and length (411
    frames) the export's trace (2 x 300) did not see."""
    torch.manual_seed(1)
    feats, lengths = torch.randn(3, 411, n_mels), torch.tensor([1.0, 0.55, 0.8])
    with torch.inference_mode():
        want = model(feats, lengths).numpy()
    got = run(feats.numpy(), lengths.numpy())
    return float(np.abs(np.asarray(got).reshape(want.shape) - want).max())


# --------------------------------------------------------------------------------------------------
# Compile

_COMPILED: dict[tuple[str, str | None, int, str | None], tuple[Any, str]] = {}
_COMPILE_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/voiceprint/openvino`` (``~/.cache/...``): exports and compiled blobs."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "voiceprint" / "openvino"


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX512-BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_onnx(
    path: str | Path, *, threads: int, precision: str | None, cache_dir: str | Path | None = None
) -> tuple[Any, str]:
    """``(compiled model, resolved inference precision: "bf16" | "f32")`` of the ONNX file ``path``.

    CPU plugin, latency hint, one stream of ``threads`` threads; ``precision`` is OpenVINO's
    ``INFERENCE_PRECISION_HINT`` (None: the plugin's default, bf16 where native). Compiled once per
    process for each (file, precision, threads, cache), the latest only (as the Dask worker's model
    cache); with ``cache_dir`` OpenVINO keeps the compiled blob there, so a new process (a Dask
    worker) loads it instead of compiling.
    """
    key = (str(Path(path).resolve()), precision, int(threads), None if cache_dir is None else str(cache_dir))
    with _COMPILE_LOCK:
        if key not in _COMPILED:
            import openvino as ov

            _COMPILED.clear()  # a long-lived process never holds two models (callers keep theirs alive)
            config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
            if precision is not None:
                config["INFERENCE_PRECISION_HINT"] = precision
            if cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache_dir)
            compiled = ov.Core().compile_model(str(path), "CPU", config)
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            _COMPILED[key] = (compiled, hint.to_string() if hasattr(hint, "to_string") else str(hint))
        return _COMPILED[key]


class OpenVinoNet(torch.nn.Module):
    """Stands in for ``ECAPA_TDNN``: ``(feats (B, T, F), lengths (B,))`` -> ``(B, 1, D)`` float32,
    computed by a compiled OpenVINO model. One infer request per calling thread (a Dask worker may
    run several tasks at once on the same cached encoder)."""

    def __init__(self, compiled: Any):
        super().__init__()
        self.compiled = compiled
        self._local = threading.local()

    def run(self, feats: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``(B, T, F)`` features and ``(B,)`` relative lengths -> ``(B, 1, D)`` embeddings."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        feed = {"feats": np.ascontiguousarray(feats, np.float32), "frames": frames_of(lengths, feats.shape[1])}
        request.infer(feed, share_inputs=True)
        return request.get_output_tensor(0).data.copy()

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = self.run(feats.detach().float().cpu().numpy(), lengths.detach().float().cpu().numpy())
        return torch.from_numpy(out).reshape(len(feats), 1, -1)


# --------------------------------------------------------------------------------------------------
# Encoder


class OpenVinoEncoder(FbankEncoder):
    """An ECAPA-TDNN whose network runs in OpenVINO (CPU only); the front end is FbankEncoder's.

    :attr:`model_id` is the torch encoder's (same weights: enrollments and indexes stay
    compatible); :attr:`fixed_precision` (``openvino-bf16`` or ``openvino-f32``) is what the
    embed stage records and fingerprints, so vectors of the two backends never mix.
    """

    name = "ecapa"

    def __init__(self, source: EcapaEncoder, net: OpenVinoNet, precision: str):
        super().__init__(net, source.cfg, weights_sha256=source.weights_sha256, files=source.files)
        self._model_id = source.model_id
        self._num_parameters = source.num_parameters()
        self.fixed_precision = f"openvino-{precision}"

    @property
    def model_id(self) -> str:
        return self._model_id

    def num_parameters(self) -> int:
        return self._num_parameters

    def to(self, device: str | torch.device) -> OpenVinoEncoder:
        if torch.device(device).type != "cpu":
            raise ValueError(f"embed.backend openvino runs on CPU only, not on {device}")
        return self


def openvino_encoder(
    source: SpeakerEncoder,
    *,
    bf16: bool = True,
    threads: int | None = None,
    cache_dir: str | Path | None = None,
) -> OpenVinoEncoder:
    """``source``'s network exported (once per weights, kept in ``cache_dir``) and compiled for OpenVINO.

    bf16 inference precision where ``bf16`` and the CPU runs it natively, else f32; ``threads``
    defaults to torch's intra-op threads. ``cache_dir`` defaults to :func:`default_cache_dir`.
    Raises ValueError for a CUDA ``source`` or a model other than a single ECAPA-TDNN.
    """
    if not isinstance(source, EcapaEncoder):
        raise ValueError(f"embed.backend openvino runs a single ECAPA-TDNN, not {type(source).__name__}")
    if source.device.type != "cpu":
        raise ValueError(
            f"embed.backend openvino runs on CPU only, but the encoder is on {source.device}: "
            "set embed.device: cpu, or embed.backend: torch on a GPU"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    onnx_path = cache / f"ecapa-{source.weights_sha256}-export{EXPORT_VERSION}.onnx"
    if not onnx_path.is_file():
        export_onnx(source.model, onnx_path, source.cfg.n_mels)
    compiled, resolved = compile_onnx(
        onnx_path,
        threads=threads or torch.get_num_threads(),
        precision="bf16" if bf16 and bf16_supported() else "f32",
        cache_dir=cache / "blobs",
    )
    return OpenVinoEncoder(source, OpenVinoNet(compiled), resolved)
