"""Serve the voiceprint flows as Prefect deployments: ``python -m flows.serve [--project-dir D]``.

``prefect.serve`` registers the deployments with the Prefect API and then runs, in this process,
every flow run that is triggered for them (from the UI's "Run" button, ``prefect deployment run``
or the REST API). No work pool or worker is involved, which suits one machine with one DVC
project: flow runs execute here, next to the project directory and its virtualenv.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import serve
from prefect.settings import get_current_settings
from prefect.types.entrypoint import EntrypointType

from flows.pipeline import PROJECT_DIR_ENV, STAGE_FLOWS, voiceprint_pipeline

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

DEPLOYMENT_NAME = "default"
TAGS = ["voiceprint"]

SERVER_HINT = """\
PREFECT_API_URL is not set: Prefect would start a temporary in-process API that the UI cannot see,
and the deployments would vanish when this process exits. Start a server and point at it:

    prefect server start --host 127.0.0.1            # in another terminal; UI on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve --project-dir {project_dir}
"""


def _summary(fl: Flow[..., object]) -> str:
    """The docstring without its ``Args:`` section: the UI shows the parameters on their own."""
    doc = inspect.getdoc(fl.fn) or ""
    return doc.split("\nArgs:", 1)[0].strip()


def deployments(project_dir: str | Path) -> list[RunnerDeployment]:
    """One deployment for the whole pipeline plus one per stage, all bound to ``project_dir``.

    ``project_dir`` is stored as the deployments' default parameter, so it is visible (and can be
    changed per run) in the UI's run form. The entrypoints are module paths
    (``flows.pipeline.voiceprint_pipeline``) because the package is installed: a flow run then
    imports the same code whatever directory the runner was started from.
    """
    root = str(Path(project_dir).expanduser().resolve())
    entries: list[tuple[Flow[..., object], list[str]]] = [(voiceprint_pipeline, TAGS)]
    entries += [(stage_flow, [*TAGS, "stage"]) for stage_flow in STAGE_FLOWS]
    return [
        fl.to_deployment(
            name=DEPLOYMENT_NAME,
            parameters={"project_dir": root},
            description=_summary(fl),
            tags=tags,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for fl, tags in entries
    ]


def serve_all(project_dir: str | Path, limit: int | None = 1) -> None:
    """Register the deployments and execute their runs until interrupted (Ctrl-C / SIGTERM).

    ``limit=1`` runs one flow run at a time: every run of every deployment here works on the same
    DVC project, and two concurrent runs would race on ``params.yaml`` and DVC's lock. Further
    runs wait in the Scheduled state until the current one finishes.
    """
    # Flow runs are subprocesses of this one; the variable is the fallback for runs whose
    # project_dir parameter is cleared in the UI.
    os.environ[PROJECT_DIR_ENV] = str(Path(project_dir).expanduser().resolve())
    serve(*deployments(project_dir), limit=limit)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--project-dir",
        default=os.environ.get(PROJECT_DIR_ENV) or os.getcwd(),
        help=f"DVC project the flow runs work on (default: ${PROJECT_DIR_ENV}, else the current directory)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=1,
        help="flow runs executed at the same time (default 1: runs share one DVC project)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    root = Path(args.project_dir).expanduser().resolve()
    missing = [name for name in ("dvc.yaml", "params.yaml") if not (root / name).is_file()]
    if missing:
        print(f"error: {root} is not a voiceprint project (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    if not get_current_settings().api.url:
        print(SERVER_HINT.format(project_dir=root), file=sys.stderr)
    serve_all(root, limit=args.limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
