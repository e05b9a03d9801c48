"""The trained ECAPA-TDNN as an MLflow pyfunc: 16 kHz waveforms in, L2-normalised embeddings out.

:func:`log_pyfunc` logs an MLflow model (*model from code*, never a cloudpickle) whose artifact is
the model directory, with a signature (``waveform``: array of double in; ``(-1, dim)`` float32 out)
and an input example; :func:`save_pyfunc` writes the same model to a directory. Through MLflow,
``predict`` takes a DataFrame with a ``waveform`` column (one mono 16 kHz waveform in [-1, 1] per
row) or ``{"waveform": [...]}`` for one. Design: docs/orchestration.md#the-registered-model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

ARTIFACT = "speechbrain_model"
"""Key of the checkpoint directory in the pyfunc's artifacts."""
REGISTERED_MODEL = "voiceprint-ecapa"
SAMPLE_RATE = 16_000
# 0.1 s: below ~640 samples (5 frames) the TDNN's dilated convolutions cannot pad their input.
MIN_SAMPLES = SAMPLE_RATE // 10
# Waveform samples per forward pass (batch x length): bounds memory for long or many inputs.
MAX_BATCH_SAMPLES = 64 * SAMPLE_RATE * 10

_MODEL_SCRIPT = """\
# MLflow "model from code": the pyfunc is built here at load time; nothing is unpickled.
import mlflow

from voiceprint.tracking.pyfunc_model import EcapaEmbeddingModel

mlflow.models.set_model(EcapaEmbeddingModel())
"""


class EcapaEmbeddingModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of the model stage's encoder (ECAPA-TDNN or mixture of ECAPA experts, CPU)."""

    def load_context(self, context) -> None:  # noqa: ANN001 (mlflow's PythonModelContext)
        from voiceprint.encoders.loader import load_model_dir

        self.encoder = load_model_dir(context.artifacts[ARTIFACT], device="cpu")

    # MLflow validates the input against the logged signature first and hands over a DataFrame;
    # called directly, arrays, lists and dicts are accepted as well (waveforms_from_input).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:  # noqa: ANN001
        return embed_waveforms(self.encoder, waveforms_from_input(model_input))


def waveforms_from_input(model_input: Any) -> list[np.ndarray]:
    """One float32 1-D array per waveform from any of the accepted input shapes (module docstring)."""
    if isinstance(model_input, pd.DataFrame):
        if "waveform" in model_input.columns:
            cells = model_input["waveform"].tolist()
        elif model_input.shape[1] == 1:
            cells = model_input.iloc[:, 0].tolist()
        else:
            raise ValueError(
                f"expected a 'waveform' column (one waveform per row), got columns {list(model_input.columns)}"
            )
    elif isinstance(model_input, Mapping):
        if "waveform" not in model_input:
            raise ValueError(f"expected a 'waveform' key, got {sorted(model_input)}")
        cells = list(model_input["waveform"])
    elif isinstance(model_input, np.ndarray):
        # (T,) is one waveform; (B, T), or (B,) of objects, is one per row.
        cells = [model_input] if model_input.ndim == 1 and model_input.dtype != object else list(model_input)
    elif isinstance(model_input, Sequence) and not isinstance(model_input, (str, bytes)):
        cells = list(model_input)
    else:
        raise ValueError(f"unsupported input type {type(model_input).__name__}")
    wavs = []
    for i, cell in enumerate(cells):
        wav = np.asarray(cell, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"waveform {i}: expected a 1-D sequence of samples, got shape {wav.shape}")
        if len(wav) < MIN_SAMPLES:
            raise ValueError(f"waveform {i}: {len(wav)} samples; at least {MIN_SAMPLES} (0.1 s at 16 kHz) needed")
        if not np.isfinite(wav).all():
            raise ValueError(f"waveform {i}: contains NaN or infinite samples")
        wavs.append(wav)
    if not wavs:
        raise ValueError("no waveforms given")
    return wavs


def embed_waveforms(encoder: Any, wavs: list[np.ndarray]) -> np.ndarray:
    """``(len(wavs), dim)`` float32 unit-length embeddings; equal lengths share an unpadded batch."""
    import torch
    import torch.nn.functional as F

    out = np.zeros((len(wavs), encoder.dim), dtype=np.float32)
    by_length: dict[int, list[int]] = {}
    for i, wav in enumerate(wavs):
        by_length.setdefault(len(wav), []).append(i)
    for length, rows in by_length.items():
        per_batch = max(1, MAX_BATCH_SAMPLES // length)
        for k in range(0, len(rows), per_batch):
            chunk = rows[k : k + per_batch]
            batch = torch.from_numpy(np.stack([wavs[i] for i in chunk]))
            emb = F.normalize(encoder.embed(batch, torch.ones(len(chunk))), dim=1)
            out[chunk] = emb.cpu().numpy()
    return out


def pip_requirements() -> list[str]:
    """What the pyfunc imports (through this package's ``ecapa`` loader), pinned to this environment."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "torchaudio", "speechbrain", "numpy", "pandas", "pyarrow", "pyyaml"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def signature(dim: int) -> Any:
    """``waveform`` (a variable-length array of samples per row, double: JSON numbers) in, ``(rows, dim)`` float32 out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.double), "waveform")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(dim)), "embedding")]),
    )


def input_example() -> pd.DataFrame:
    """Two short waveforms (0.1 s and 0.15 s of a quiet tone), as the model's logged input example."""
    t = np.arange(MIN_SAMPLES * 3 // 2, dtype=np.float32) / SAMPLE_RATE
    tone = (0.1 * np.sin(2 * np.pi * 220.0 * t)).round(4).astype(np.float32)
    return pd.DataFrame({"waveform": [tone[:MIN_SAMPLES].tolist(), tone.tolist()]})


def _model_kwargs(model_dir: str | Path, script: Path, model_id: str, dim: int) -> dict[str, Any]:
    """What :func:`save_pyfunc` and :func:`log_pyfunc` pass to MLflow, beside the destination."""
    package = Path(__file__).resolve().parents[1]  # the whole voiceprint package: the pyfunc loads encoders/
    script.write_text(_MODEL_SCRIPT)
    return dict(
        python_model=str(script),
        artifacts={ARTIFACT: str(Path(model_dir).resolve())},
        code_paths=[str(package)],
        pip_requirements=pip_requirements(),
        signature=signature(dim),
        input_example=input_example(),
        metadata={"model_id": model_id, "sample_rate": SAMPLE_RATE, "output": "l2-normalised embeddings"},
    )


def embedding_dim(model_dir: str | Path) -> int:
    """The embedding size of the model in ``model_dir`` (loads it on the CPU)."""
    from voiceprint.encoders.loader import load_model_dir

    return int(load_model_dir(model_dir, device="cpu").dim)


def save_pyfunc(model_dir: str | Path, path: str | Path, *, model_id: str) -> Path:
    """Write the pyfunc for the SpeechBrain-layout ``model_dir`` to the new directory ``path``."""
    with tempfile.TemporaryDirectory(prefix="voiceprint-pyfunc-") as tmp:
        kwargs = _model_kwargs(model_dir, Path(tmp) / "ecapa_pyfunc.py", model_id, embedding_dim(model_dir))
        mlflow.pyfunc.save_model(path=str(path), **kwargs)
    return Path(path)


def log_pyfunc(model_dir: str | Path, *, model_id: str, registered_model_name: str | None = None) -> Any:
    """Log the pyfunc as ``model`` of the active MLflow run (a logged model: the experiment's Models
    page); register it as a new version of ``registered_model_name`` when given. Returns the ModelInfo."""
    with tempfile.TemporaryDirectory(prefix="voiceprint-pyfunc-") as tmp:
        kwargs = _model_kwargs(model_dir, Path(tmp) / "ecapa_pyfunc.py", model_id, embedding_dim(model_dir))
        return mlflow.pyfunc.log_model(
            name="model",
            registered_model_name=registered_model_name,
            tags={"model_id": model_id},
            **kwargs,
        )
