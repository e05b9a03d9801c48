"""``voiceprint`` command line: run stages, query embeddings, verify/identify/enroll speakers.

Heavy imports (torch, faiss, duckdb, mlflow) happen inside the subcommands so ``voiceprint
--help`` is instant and a missing optional dependency only affects the command that needs it.
Serving the Prefect deployments is the orchestration layer's command, ``voiceprint-serve``
(``flows.serve``): this package never imports ``flows`` or ``tasks`` (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from voiceprint.common.layout import Layout
from voiceprint.config import ConfigError, load_params


class CliError(RuntimeError):
    """An error the user can fix; printed without a traceback."""


def _layout(args: argparse.Namespace) -> Layout:
    return Layout.at(args.project)


def _verifier(layout: Layout, threshold: float | None = None):
    from voiceprint.verify import Verifier, VerifyError

    try:
        return Verifier(layout, threshold=threshold)
    except VerifyError as err:
        raise CliError(str(err)) from None


def _embed_files(layout: Layout, files: list[str]):
    import numpy as np

    from voiceprint.verify import VerifyError

    verifier = _verifier(layout)
    try:
        return np.stack([verifier.embed(f) for f in files]), verifier.encoder
    except VerifyError as err:
        raise CliError(str(err)) from None


def cmd_stage(args: argparse.Namespace) -> int:
    from voiceprint.stages import run_stage

    summary = run_stage(args.name, args.project)
    print(json.dumps({"stage": args.name, **summary}, default=str))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from voiceprint.verify import VerifyError

    verifier = _verifier(_layout(args), args.threshold)
    try:
        verdict = verifier.verify(args.a, args.b)
    except VerifyError as err:
        raise CliError(str(err)) from None
    print(json.dumps(verdict.as_dict()))
    return 0 if verdict.same_speaker else 1


def cmd_identify(args: argparse.Namespace) -> int:
    from voiceprint.index.gallery import SpeakerGallery

    layout = _layout(args)
    vectors, _ = _embed_files(layout, [args.file])
    gallery = SpeakerGallery.load(layout)
    for rank, (speaker, score) in enumerate(gallery.search(vectors, k=args.k)[0], start=1):
        print(f"{rank}\t{speaker}\t{score:.4f}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from voiceprint.index.enrollment import enroll

    layout = _layout(args)
    vectors, encoder = _embed_files(layout, args.files)
    enroll(layout, args.name, vectors, encoder.model_id)
    print(f"enrolled {args.name!r} from {len(args.files)} file(s)")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from voiceprint.query import format_table, run_query

    try:
        table = run_query(_layout(args), args.sql)
    except duckdb.Error as err:
        raise CliError(f"query failed: {err}") from None
    if args.format == "json":
        for row in table.to_pylist():
            print(json.dumps(row, default=str))
    elif args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    else:
        print(format_table(table, max_rows=args.max_rows))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """segment -> embed -> evaluate on any folder with the current model, outside the DVC outputs."""
    from voiceprint.embed.stage import embed_segments
    from voiceprint.evaluate.stage import evaluate
    from voiceprint.prepare.stage import prepare
    from voiceprint.segment.stage import segment_manifest

    project = _layout(args)
    kind, _, path = args.dataset.partition(":")
    if kind != "folder" or not path:
        raise CliError(f"--dataset must look like folder:PATH, got {args.dataset!r}")
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise CliError(f"{folder}: not a directory")
    encoder = _verifier(project).encoder
    # The folder alone: none of the project's other sources, and its one eval set.
    overrides: dict[str, Any] = {
        "data.dataset": "folder",
        "data.path": str(folder),
        "data.train_subset": None,
        "data.name": None,
        "data.sources": {},
        "data.train": None,
        "evaluate.sets": None,
    }
    params = load_params(project.params, overrides)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="voiceprint-eval-"))
    scratch = Layout.at(workdir)
    prepared = prepare(params.data, scratch)
    segmented = segment_manifest(scratch, params.vad)
    embedded = embed_segments(scratch, params.embed, encoder=encoder)
    metrics = evaluate(scratch, params, trials_root=project.root)  # a relative trial file: the project's
    if args.log_mlflow:
        from voiceprint.tracking.runs import log_evaluation

        metrics["mlflow_run_id"] = log_evaluation(
            project,
            params,
            metrics,
            scratch.plots,
            run_name=f"evaluate:{folder.name}",
            extra_tags={"dataset_path": str(folder)},
        )
    print(json.dumps({"prepare": prepared.__dict__, "segment": segmented, "embed": embedded}, default=str))
    print(f"outputs in {workdir}")
    top1 = metrics.get("top1")
    top1_text = f"{100 * top1:.2f}%" if top1 is not None else "n/a"
    print(
        f"EER={100 * metrics['eer']:.2f}% minDCF(0.01)={metrics.get('min_dcf_p0.01', float('nan')):.4f} "
        f"minDCF(0.05)={metrics.get('min_dcf_p0.05', float('nan')):.4f} top1={top1_text}"
    )
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from voiceprint.evaluate.summary import summary_table

    path = _layout(args).metrics
    if not path.is_file():
        raise CliError(f"{path} does not exist: run the evaluate stage first (dvc repro evaluate)")
    try:
        print(summary_table(json.loads(path.read_text())))
    except ValueError as err:
        raise CliError(f"{path}: {err}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voiceprint", description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".", help="project root holding params.yaml and data/ (default: .)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    p.add_argument("name", choices=["prepare", "segment", "model", "embed", "index", "evaluate"])
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("verify", help="same speaker? score two files against the last EER threshold")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--threshold", type=float, default=None, help="override the threshold from metrics.json")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("identify", help="top-k speakers for a file from the speaker index")
    p.add_argument("file")
    p.add_argument("-k", type=int, default=5)
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("enroll", help="add a speaker to the index without rebuilding it")
    p.add_argument("name")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser(
        "query", help="run DuckDB SQL over the embeddings (views: embeddings, utterances, segments, manifest, rejects)"
    )
    p.add_argument("sql")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--max-rows", type=int, default=50)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("results", help="one line per eval set from metrics.json (EER, AS-norm, minDCF, top-1)")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("evaluate", help="segment -> embed -> evaluate a folder of speakers with the current model")
    p.add_argument(
        "--dataset", required=True, help="folder:PATH (a <speaker>/<utterance>.{wav,flac,m4a,mp3,ogg,opus} tree)"
    )
    p.add_argument("--workdir", default=None, help="where to keep the scratch outputs (default: a temp dir)")
    p.add_argument("--no-mlflow", dest="log_mlflow", action="store_false", help="do not log the run to MLflow")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from voiceprint.common.audio import AudioError
    from voiceprint.stages import ProjectBusyError

    try:
        return args.func(args)
    except (CliError, ConfigError, AudioError, ProjectBusyError) as err:
        print(f"voiceprint: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
