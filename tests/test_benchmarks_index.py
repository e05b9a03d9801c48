"""Smoke test of ``benchmarks/bench_index.py`` (tiny sizes) and the shared benchmark helpers.

Keeps the benchmark from rotting: it must run as a script, print parseable JSON lines with the
documented fields, and Flat must be its own ground truth. Timings are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import emit, percentiles

REPO = Path(__file__).resolve().parents[1]

INDEX_FIELDS = {
    "bench",
    "n",
    "index",
    "params",
    "effective",
    "build_s",
    "index_bytes",
    "rss_delta_mb",
    "p50_ms_b1",
    "p99_ms_b1",
    "p50_ms_b64",
    "p99_ms_b64",
    "recall_at_1",
    "speaker_acc",
    "speedup_vs_flat_b1",
    "hardware",
    "data",
}


def test_bench_index_script_runs_and_prints_json_lines(tmp_path: Path) -> None:
    out = tmp_path / "results" / "bench.jsonl"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_index.py"),
        "--sizes",
        "1000,2000",
        "--queries",
        "50",
        "--b1-queries",
        "20",
        "--batch",
        "64",
        "--batch-reps",
        "2",
        "--time-cap",
        "0.5",
        "--hnsw-max-n",
        "1000",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines  # --out appends the same

    assert all(r["bench"] == "index" for r in lines)
    by = {(r.get("n"), r.get("index")): r for r in lines if not r.get("summary")}
    for n in (1000, 2000):
        for kind in ("flat", "ivf"):
            rec = by[(n, kind)]
            assert rec.keys() >= INDEX_FIELDS, INDEX_FIELDS - rec.keys()
            assert rec["params"]["type"] == kind
            assert 0.0 <= rec["recall_at_1"] <= 1.0
            assert rec["index_bytes"] > n * 192 * 4  # at least the raw float32 vectors
        assert by[(n, "flat")]["recall_at_1"] == 1.0  # the exact index is the ground truth
        assert by[(n, "flat")]["speaker_acc"] == 1.0  # well-separated synthetic speakers
        cen = by[(n, "centroids-flat")]
        assert cen["speakers"] == n // 100 and 0.0 <= cen["speaker_acc"] <= 1.0
        assert set(cen["speaker_acc_utterance_top1"]) >= {"flat", "ivf"}
        assert 0.6 < by[(n, "flat")]["data"]["within_cos_mean"] < 0.8

    assert by[(1000, "hnsw")]["effective"]["hnsw_m"] == 32  # measured below --hnsw-max-n
    assert "skipped" in by[(2000, "hnsw")] and by[(2000, "hnsw")]["est_build_s"] >= 0

    summary = lines[-1]
    assert summary["summary"] is True and summary["peer"] == "flat"
    assert summary["ours"] in ("ivf", "hnsw") and summary["n"] == 2000
    assert summary["target_met"] is False  # 2000 vectors are not the 1M target
    hw = summary["hardware"]
    assert {"cpu", "cpu_count", "threads", "faiss", "gpu"} <= hw.keys()


def test_percentiles_and_emit(tmp_path: Path, capsys) -> None:
    assert percentiles([0.001] * 99 + [0.101]) == {"p50_ms": 1.0, "p99_ms": 2.0}
    assert percentiles([0.002, 0.004]) == {"p50_ms": 3.0, "p99_ms": 3.98}
    assert percentiles([])["p50_ms"] != percentiles([])["p50_ms"]  # NaN when nothing was measured

    out = tmp_path / "r.jsonl"
    emit({"a": 1, "b": float("nan")}, out)
    emit({"a": 2}, out)
    printed = capsys.readouterr().out.splitlines()
    assert printed == out.read_text().splitlines() == ['{"a":1,"b":null}', '{"a":2}']
