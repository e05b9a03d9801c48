"""``embed.backend: openvino``: the small project's trained ECAPA on its real segments, against torch.

The network after the features runs in OpenVINO (bf16 where the CPU has it natively, else f32);
every segment and utterance embedding must stay within cosine 0.999 of torch float32, with the same
rows, and shapes the ONNX trace never saw must work. ``backend: torch`` keeps today's output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from voiceprint.common import schema
from voiceprint.common.layout import Layout
from voiceprint.config import EmbedParams
from voiceprint.embed.engine import load_pipeline_encoder
from voiceprint.embed.stage import EMBED_SUMMARY, embed_segments, reuse_embeddings

TABLES = ("segments.parquet", "utterances.parquet")
ID = {"segments.parquet": "segment_id", "utterances.parquet": "utterance_id"}


@pytest.fixture(scope="module")
def project(small_project: Layout, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A copy of the small project (its own ``data/cache/openvino``, staging and outputs)."""
    root = tmp_path_factory.mktemp("openvino") / "project"
    shutil.copytree(small_project.root, root, ignore=shutil.ignore_patterns("mlflow*", "compare*", ".stage.lock"))
    return Layout.at(root)


@pytest.fixture(scope="module")
def embedded(project: Layout, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """The project's segments embedded by torch float32 and by OpenVINO: name -> (summary, directory)."""
    out = tmp_path_factory.mktemp("embedded")
    runs = {
        "torch_fp32": EmbedParams(device="cpu", amp=False),
        "openvino": EmbedParams(device="cpu", backend="openvino"),
    }
    return {
        name: (embed_segments(project, params, progress=False, out_dir=out / name), out / name)
        for name, params in runs.items()
    }


def test_openvino_embeddings_match_torch_float32_row_for_row(embedded: dict[str, tuple[dict, Path]]) -> None:
    from voiceprint.encoders.openvino_backend import bf16_supported

    (ref, ref_dir), (ov, ov_dir) = embedded["torch_fp32"], embedded["openvino"]
    assert ov["precision"] == ("openvino-bf16" if bf16_supported() else "openvino-f32")
    assert ref["precision"] == "float32"
    assert ov["model_id"] == ref["model_id"]  # same weights: enrollments and the index stay compatible
    assert ov["source"] != ref["source"]  # but never the same staged parts or reused tables
    assert json.loads((ov_dir / EMBED_SUMMARY).read_text())["precision"] == ov["precision"]
    for name in TABLES:
        a, b = pq.read_table(ref_dir / name), pq.read_table(ov_dir / name)
        assert a.num_rows > 10
        for column in (ID[name], "speaker_id", "split", "model_id"):
            assert a.column(column).to_pylist() == b.column(column).to_pylist(), (name, column)
        cos = np.sum(schema.embeddings_matrix(a) * schema.embeddings_matrix(b), axis=1)
        print(f"{name}: {len(cos)} rows, cosine openvino vs torch fp32 min {cos.min():.6f} mean {cos.mean():.6f}")
        assert cos.min() >= 0.999, (name, float(cos.min()))
    assert pq.read_table(ov_dir / "rejects.parquet").equals(pq.read_table(ref_dir / "rejects.parquet"))


def test_batch_shapes_the_trace_never_saw(project: Layout, tmp_path: Path) -> None:
    """The export traced a (2, 300) batch: a (3, 411) one with padded rows and odd waveform batches
    still match torch (f32 to float rounding, so no shape is baked in; bf16 to its rounding)."""
    from voiceprint.encoders.openvino_backend import check_export, openvino_encoder

    reference = load_pipeline_encoder(project, torch.device("cpu"))
    encoder = load_pipeline_encoder(project, torch.device("cpu"), "openvino")
    exact = openvino_encoder(reference, bf16=False, cache_dir=tmp_path)  # exports ``reference.model`` afresh
    assert exact.fixed_precision == "openvino-f32"
    assert not reference.model.training  # exporting left the caller's model as it was
    assert encoder.dim == reference.dim and encoder.num_parameters() == reference.num_parameters()
    n_mels = reference.cfg.n_mels
    with torch.inference_mode():
        scale = float(reference.model(torch.randn(3, 411, n_mels), torch.ones(3)).abs().max())
    f32_error = check_export(exact.model.run, reference.model, n_mels)
    error = check_export(encoder.model.run, reference.model, n_mels)
    print(f"max abs error on an unseen (3, 411) batch: f32 {f32_error:.1e}, {encoder.fixed_precision} {error:.1e}")
    assert f32_error <= 1e-5 * max(1.0, scale)
    assert error <= 1e-2 * max(1.0, scale)  # bf16 keeps 8 bits of mantissa
    torch.manual_seed(2)
    for batch, samples in ((1, 7_777), (5, 23_456)):
        wavs = torch.randn(batch, samples) * 0.1
        lengths = torch.linspace(1.0, 0.4, batch)
        with torch.inference_mode():
            want, got = reference.embed(wavs, lengths), encoder.embed(wavs, lengths)
        assert got.shape == (batch, encoder.dim) and got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(want, got).min() >= 0.999


def test_torch_backend_writes_what_the_embed_stage_wrote(project: Layout, tmp_path: Path) -> None:
    """``backend: torch`` (the default) is today's engine: the same tables and ``embed.json``."""
    summary = embed_segments(project, EmbedParams(backend="torch"), progress=False, out_dir=tmp_path)
    for name in (*TABLES, "rejects.parquet"):
        assert pq.read_table(tmp_path / name).equals(pq.read_table(project.embeddings / name)), name
    assert (tmp_path / EMBED_SUMMARY).read_bytes() == (project.embeddings / EMBED_SUMMARY).read_bytes()
    assert "openvino" not in summary["precision"]


def test_the_comparison_never_reuses_vectors_of_another_backend(
    project: Layout, embedded: dict[str, tuple[dict, Path]], tmp_path: Path
) -> None:
    _, ov_dir = embedded["openvino"]
    staged = project.embeddings
    torch_encoder = load_pipeline_encoder(project, torch.device("cpu"))
    params = EmbedParams(device="cpu")
    assert reuse_embeddings(project, params, torch_encoder, tmp_path / "a") is not None  # the stage's own
    shutil.copytree(staged, tmp_path / "kept")
    try:
        for name in (*TABLES, "rejects.parquet", EMBED_SUMMARY):  # as if the stage ran with backend openvino
            shutil.copyfile(ov_dir / name, staged / name)
        assert reuse_embeddings(project, params, torch_encoder, tmp_path / "b") is None
        ov_encoder = load_pipeline_encoder(project, torch.device("cpu"), "openvino")
        ov_params = EmbedParams(device="cpu", backend="openvino")
        assert reuse_embeddings(project, ov_params, ov_encoder, tmp_path / "c") is not None
    finally:
        shutil.rmtree(staged)
        shutil.copytree(tmp_path / "kept", staged)


def test_openvino_is_cpu_only_and_torch_never_loads_it(project: Layout) -> None:
    with pytest.raises(ValueError, match="runs on CPU only"):
        EmbedParams(backend="openvino", device="cuda")
    with pytest.raises(ValueError, match="embed.device: cpu"):
        load_pipeline_encoder(project, torch.device("cuda"), "openvino")
    code = (
        "import sys, torch; from voiceprint.common.layout import Layout; "
        "from voiceprint.embed.engine import load_pipeline_encoder; "
        f"load_pipeline_encoder(Layout.at({str(project.root)!r}), torch.device('cpu'), 'torch'); "
        "print(sorted(m for m in ('openvino', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_dask_workers_compile_once_and_agree_with_the_local_engine(
    project: Layout, embedded: dict[str, tuple[dict, Path]], tmp_path: Path
) -> None:
    """The embed stage on a LocalCluster with ``backend: openvino``: each worker process builds its
    OpenVINO encoder, checks its precision against the driver's, and writes the local engine's rows."""
    from voiceprint.stages import run_stage

    root = tmp_path / "project"
    shutil.copytree(project.root, root, ignore=shutil.ignore_patterns(".stage.lock", "work", "mlruns"))
    shutil.rmtree(root / "data" / "embeddings")
    overrides = {
        "embed.device": "cpu",
        "embed.backend": "openvino",
        "compute.engine": "dask",
        "compute.address": "local:2",
        "compute.shard_s": 15.0,
    }
    summary = run_stage("embed", root, overrides=overrides)
    local, local_dir = embedded["openvino"]
    assert summary["precision"] == local["precision"] and summary["source"] == local["source"]
    layout = Layout.at(root)
    for name in TABLES:
        a, b = pq.read_table(local_dir / name), pq.read_table(layout.embeddings / name)
        assert a.drop(["embedding"]).equals(b.drop(["embedding"])), name
        # Worker threads differ from the driver's (OpenVINO's reductions split by thread): rounding only.
        cos = np.sum(schema.embeddings_matrix(a) * schema.embeddings_matrix(b), axis=1)
        assert cos.min() >= 0.9999, (name, float(cos.min()))
