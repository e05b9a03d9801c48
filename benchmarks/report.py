"""Turn the JSON lines of a ``make bench`` run into ``benchmarks/RESULTS.md``.

The JSON lines are the measurement; this file only lays them out (peer, ours, ratio, target) so a
reader sees at a glance which targets a run met and on what hardware. Records measured on a GPU
(``hardware.gpu`` set, or a ``gpu`` section) get their own rows with the device named.

    python benchmarks/report.py results.jsonl benchmarks/RESULTS.md
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voiceprint.common import atomic  # noqa: E402

_ABLATIONS = {
    "ours_fp32": "`embed.amp: false`: float32, one segment per call",
    "ours_fp32_batched": "`amp: false, cpu_batching: true`: float32 length-bucketed padded batches",
    "ours_decode_worker": "defaults plus a decode worker process",
}


def _ok(flag: Any) -> str:
    return "yes" if flag is True else ("**no**" if flag is False else "n/a")


def _embed(rec: dict) -> list[str]:
    lines = [
        "## Embedding extraction (`bench_embed.py`)",
        "",
        f"{rec['model']}; {rec['audio']}; median of {rec['rounds']} interleaved rounds; torch threads {rec['torch_threads']}.",
        "",
        "| method | audio s / s (x real time) | ours vs it | min cosine to SpeechBrain fp32 |",
        "|---|---|---|---|",
        f"| SpeechBrain `encode_batch`, one file at a time (peer) | {rec['peer_realtime_factor']} | "
        f"**{rec['ratio_vs_sb_loop']}x** (target 2x) | 1 (reference) |",
    ]
    if "peer_padded16_realtime_factor" in rec:
        lines.append(
            f"| SpeechBrain `encode_batch`, padded batches of 16 (peer) | {rec['peer_padded16_realtime_factor']} | "
            f"**{rec['ratio_vs_sb_padded16']}x** (target 8x) | {rec['min_cosine_sb_padded16_vs_sb_loop']} |"
        )
    lines += [
        f"| ours: {rec['ours']} | {rec['ours_realtime_factor']} | | {rec['min_cosine_vs_sb_fp32']} |",
        *[
            f"| ablation `{name}` ({_ABLATIONS.get(name, name)}) | {a['realtime_factor']} | {a['ratio_vs_sb_loop']}x the loop | "
            f"{a['min_cosine_vs_sb_fp32']} |"
            for name, a in rec.get("ablations", {}).items()
        ],
        "",
        f"Targets met: {_ok(rec.get('meets_targets'))}.",
    ]
    gpu = rec.get("gpu")
    if gpu:
        lines += [
            "",
            f"GPU ({gpu['device']}, {gpu['precision']}): **{gpu['realtime_factor']}x real time**, "
            f"{gpu['roofline_fraction']} of the bf16 roofline, min cosine {gpu['min_cosine_vs_sb_fp32']} "
            f"(target {gpu['target_realtime_factor']}x).",
        ]
    return lines + [""]


def _index(recs: list[dict]) -> list[str]:
    lines = [
        "## FAISS index (`bench_index.py`)",
        "",
        "| n | index | params | build s | size MB | p50 / p99 ms (batch 1) | p50 ms (batch 1024) | recall@1 | speed-up vs Flat (b1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if r.get("summary") or str(r.get("index", "")).startswith("centroids"):
            continue
        if r.get("skipped"):
            lines.append(f"| {r.get('n'):,} | {r.get('index', '')} | | skipped: {r['skipped']} | | | | | |")
            continue
        params = ", ".join(f"{k}={v}" for k, v in (r.get("effective") or {}).items())
        lines.append(
            f"| {r['n']:,} | {r['index']} | {params} | {r.get('build_s')} | {round(r.get('index_bytes', 0) / 2**20, 1)} | "
            f"{r.get('p50_ms_b1')} / {r.get('p99_ms_b1')} | {r.get('p50_ms_b1024')} | {r.get('recall_at_1')} | "
            f"{r.get('speedup_vs_flat_b1', '')} |"
        )
    centroids = [r for r in recs if str(r.get("index", "")).startswith("centroids") and not r.get("skipped")]
    if centroids:
        lines += [
            "",
            "Speaker-centroid path (the gallery `identify` searches):",
            "",
            "| n utterances | speakers | p50 ms (batch 1) | speaker-ID accuracy |",
            "|---|---|---|---|",
        ]
        for r in centroids:
            lines.append(f"| {r.get('n'):,} | {r.get('speakers')} | {r.get('p50_ms_b1')} | {r.get('speaker_acc')} |")
    summary = next((r for r in recs if r.get("summary")), None)
    if summary:
        lines += [
            "",
            "Summary: `" + json.dumps({k: v for k, v in summary.items() if k not in ("hardware", "table")}) + "`",
        ]
    return lines + [""]


def _verify(rec: dict) -> list[str]:
    return [
        "## Verification latency (`bench_verify.py`)",
        "",
        f"{rec['files']}; model {rec['model']} ({rec['model_source']}).",
        "",
        "| method | latency |",
        "|---|---|",
        f"| peer: {rec['peer']} | {rec['peer_ms']} ms |",
        f"| ours: {rec['ours']} | p50 **{rec['ours_p50_ms']} ms**, p99 {rec['ours_p99_ms']} ms ({rec['repeats']} pairs) |",
        "",
        f"Target p50 < {rec['target_p50_ms']} ms: {_ok(rec.get('meets_target'))}.",
        "",
    ]


def _pipeline(recs: list[dict]) -> list[str]:
    lines = [
        "## `embed` at growing data size (`bench_pipeline.py`)",
        "",
        "| scale | segments | audio s | stage s | audio s / s | peak RSS MB (main) | peak RSS MB (child processes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if r.get("summary"):
            continue
        lines.append(
            f"| {r['scale']}x | {r['segments']:,} | {r['audio_s']:,} | {r['stage_s']} | {r['audio_s_per_s']} | "
            f"{r['peak_rss_mb']} | {r['children_peak_rss_mb']} |"
        )
    summary = next((r for r in recs if r.get("summary")), None)
    if summary:
        lines += [
            "",
            f"Time ratio {summary['time_ratio']} for {summary['ideal_time_ratio']}x the data "
            f"(linearity {summary['linearity']}); peak RSS ratio {summary['peak_rss_ratio']} "
            f"(target <= {summary['rss_target']}): {_ok(summary.get('meets_target'))}.",
        ]
    return lines + [""]


def render(records: list[dict]) -> str:
    by = {name: [r for r in records if r.get("bench") == name] for name in ("embed", "index", "verify", "pipeline")}
    hw: dict = {}
    for r in records:  # each script reports the libraries it imported; merge them
        hw = {**r.get("hardware", {}), **{k: v for k, v in hw.items() if v is not None}}
    out = [
        "# Benchmark results",
        "",
        f"Rendered on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from the records of the last `make bench`. "
        f"Hardware: {hw.get('cpu')} ({hw.get('cpus_usable')} usable CPUs, {hw.get('mem_total_gb')} GiB), "
        f"GPU: {hw.get('gpu') or 'none'}; torch {hw.get('torch', '?')}, faiss {hw.get('faiss', '?')}. "
        "Raw JSON lines: `benchmarks/results.jsonl`.",
        "",
    ]
    if by["embed"]:
        out += _embed(by["embed"][-1])
    if by["verify"]:
        out += _verify(by["verify"][-1])
    if by["pipeline"]:
        out += _pipeline(by["pipeline"])
    if by["index"]:
        out += _index(by["index"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python benchmarks/report.py RESULTS.jsonl RESULTS.md", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    atomic.write_text(argv[1], render(records) + "\n")
    print(f"wrote {argv[1]} from {len(records)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
