"""``embed`` at 1x, 4x and 16x the excerpts: wall time should grow linearly, peak memory not at all.

The 1x dataset is the VAD segments of the ``test-other`` excerpts (prepared and segmented once in
a scratch project); the larger ones repeat those segments under new utterance ids, so the model
sees k times the audio and the tables have k times the rows. Each size runs the real stage
function (:func:`voiceprint.embed.stage.embed_segments`) in a fresh process, which reports its own
peak RSS and that of its decode worker.

    python benchmarks/bench_pipeline.py [--scales 1,4,16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import REPO, emit, hardware  # noqa: E402
from voiceprint.common.layout import Layout  # noqa: E402

EXCERPTS = REPO.parent / "shared" / "datasets"
RSS_TARGET = 1.2

DRIVER = """
import json, resource, sys, time
from voiceprint.config import load_params
import torch
from voiceprint.embed.engine import load_pipeline_encoder, pick_device
from voiceprint.embed.stage import embed_segments
from voiceprint.common.layout import Layout
layout = Layout.at(sys.argv[1])
params = load_params(layout.params)
encoder = load_pipeline_encoder(layout, pick_device(params.embed.device))
started = time.perf_counter()
summary = embed_segments(layout, params.embed, encoder=encoder, progress=False)
summary["stage_s"] = time.perf_counter() - started
# VmHWM, not ru_maxrss: Linux carries this benchmark's own (larger) peak over into the child's
# ru_maxrss through fork + exec, which would hide the embed stage's growth.
summary["peak_rss_mb"] = next(
    (int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")),
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
)
summary["children_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
summary["torch_threads"] = torch.get_num_threads()
print(json.dumps(summary))
"""


def base_project(root: Path, model_project: Path) -> Layout:
    """Prepare + segment the test-other excerpts; link the project's model (or a random one)."""
    from voiceprint.config import set_dotted
    from voiceprint.stages import run_stage

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {"data.mirror": str(EXCERPTS), "data.train_subset": None}.items():
        set_dotted(raw, key, value)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    layout = Layout.at(root)
    run_stage("prepare", root)
    run_stage("segment", root)
    model = Layout.at(model_project).model_dir
    if (model / "embedding_model.ckpt").exists():
        layout.model_dir.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(model, layout.model_dir)
    else:
        import torch

        from voiceprint.encoders.ecapa import EcapaConfig, save_speechbrain_checkpoint

        torch.manual_seed(0)
        cfg = EcapaConfig.from_channels(int(raw["model"]["channels"]))
        save_speechbrain_checkpoint(layout.model_dir, cfg.build().eval(), cfg)
    return layout


def scaled_project(base: Layout, root: Path, scale: int) -> Layout:
    """``scale`` copies of the base segments (absolute paths, distinct utterance ids)."""
    layout = Layout.at(root)
    layout.data.mkdir(parents=True)
    (root / "params.yaml").write_text(base.params.read_text())
    layout.model_dir.parent.mkdir(parents=True)
    os.symlink(base.model_dir.resolve(), layout.model_dir)
    segs = pq.read_table(base.segments)
    paths = pa.array([str(base.resolve(p)) for p in segs.column("path").to_pylist()])
    copies = []
    for k in range(scale):
        suffix = pa.scalar(f"~{k:02d}")
        copy = segs.set_column(segs.schema.get_field_index("path"), "path", paths)
        for col in ("segment_id", "utterance_id"):
            copy = copy.set_column(
                copy.schema.get_field_index(col), col, pc.binary_join_element_wise(copy.column(col), suffix, "")
            )
        copies.append(copy)
    pq.write_table(pa.concat_tables(copies), layout.segments)
    return layout


def run_scale(layout: Layout) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(layout.root)], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"embed failed at {layout.root}: {proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["wall_s"] = wall
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--project", type=Path, default=REPO, help="whose models/ecapa to use")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    scales = [int(s) for s in args.scales.split(",")]

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        base = base_project(Path(tmp) / "base", args.project)
        for scale in scales:
            layout = scaled_project(base, Path(tmp) / f"x{scale}", scale)
            r = run_scale(layout)
            results[scale] = r
            emit(
                {
                    "bench": "pipeline",
                    "stage": "embed",
                    "scale": scale,
                    "segments": r["segments"],
                    "audio_s": r["audio_s"],
                    "stage_s": round(r["stage_s"], 2),
                    "wall_s": round(r["wall_s"], 2),
                    "audio_s_per_s": round(r["audio_s"] / r["stage_s"], 1),
                    "peak_rss_mb": round(r["peak_rss_mb"], 1),
                    "children_peak_rss_mb": round(r["children_peak_rss_mb"], 1),
                    "model": r["model_id"],
                    "torch_threads": r["torch_threads"],
                    "hardware": hardware(),
                },
                args.out,
            )

    lo, hi = min(scales), max(scales)
    time_ratio = results[hi]["stage_s"] / results[lo]["stage_s"]
    rss_ratio = results[hi]["peak_rss_mb"] / results[lo]["peak_rss_mb"]
    emit(
        {
            "bench": "pipeline",
            "summary": True,
            "scales": scales,
            "time_ratio": round(time_ratio, 2),
            "ideal_time_ratio": hi / lo,
            "linearity": round(time_ratio / (hi / lo), 2),
            "peak_rss_ratio": round(rss_ratio, 3),
            "rss_target": RSS_TARGET,
            "meets_target": rss_ratio <= RSS_TARGET,
            "hardware": hardware(),
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
