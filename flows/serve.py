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
from typing import TYPE_CHECKING, Any

from prefect import serve
from prefect.settings import get_current_settings
from prefect.types.entrypoint import EntrypointType

from flows.pipeline import PIPELINE_PARAMETERS, PROJECT_DIR_ENV, STAGE_FLOWS, compare_flow, voiceprint_pipeline
from voiceprint.config import Params, flatten_dotted, load_params

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

DEPLOYMENT_NAME = "default"
TAGS = ["voiceprint"]

SERVER_HINT = """\
PREFECT_API_URL is not set: Prefect would start a temporary in-process API that the UI cannot see,
and the deployments would vanish when this process exits. Start a server and point at it:

    make prefect-server PORT=4200                     # in another terminal; UI on http://127.0.0.1:4200
    make serve PORT=4200
or by hand (the UI reads the API port from PREFECT_SERVER_API_PORT, not from --port):
    PREFECT_SERVER_API_PORT=4200 prefect server start --host 127.0.0.1 --port 4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve --project-dir {project_dir}
"""


def _summary(fl: Flow[..., object]) -> str:
    """The docstring without its ``Args:`` section: the UI shows the parameters on their own."""
    doc = inspect.getdoc(fl.fn) or ""
    return doc.split("\nArgs:", 1)[0].strip()


def current_settings(project_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Each flow's run-form defaults: the values its parameters stand for in ``params.yaml`` now.

    ``{"voiceprint-pipeline": {"index_type": "flat", "max_speakers": None, ...}, "voiceprint-compare":
    {"encoders": ["ecapa", ...]}}``; the schema's defaults where the project has no ``params.yaml``.
    """
    path = Path(project_dir) / "params.yaml"
    params = load_params(path) if path.is_file() else Params()
    flat = flatten_dotted(params.model_dump(mode="json"))
    encoders = [name if name == spec else f"{name}={spec}" for name, spec in params.compare.encoders.items()]
    return {
        voiceprint_pipeline.name: {name: flat[key] for name, key in PIPELINE_PARAMETERS.items()},
        compare_flow.name: {"encoders": encoders},
    }


def typed_schema(properties: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Give each parameter in ``properties`` (of a flow's OpenAPI parameter schema) its current value.

    The flows declare ``X | None = None`` (None: keep the file's value when called directly), which
    Prefect renders as a "None" default with an ``X | None`` toggle. Here a parameter whose current
    value is not None loses the ``null`` branch and gets the value as its default, so the run form
    and the Parameters tab show a plain typed field holding what ``params.yaml`` says; a setting
    that is null in the file (``data.max_speakers``) keeps the toggle, defaulting to None.
    """
    for name, value in defaults.items():
        prop = properties.get(name)
        if prop is None:
            continue
        branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
        if value is not None and len(branches) == 1:
            del prop["anyOf"]
            prop.update(branches[0])
        prop["default"] = value


def deployments(project_dir: str | Path) -> list[RunnerDeployment]:
    """One deployment for the whole pipeline plus one per stage, all bound to ``project_dir``.

    Each deployment's parameters (the UI run form's starting values) are ``project_dir`` and the
    current value of every setting the flow exposes (:func:`current_settings`), typed
    (:func:`typed_schema`): a user changes only what they mean to. The values are read when this
    runs; restart ``flows.serve`` to refresh them. The entrypoints are module paths
    (``flows.pipeline.voiceprint_pipeline``) because the package is installed: a flow run then
    imports the same code whatever directory the runner was started from.
    """
    root = str(Path(project_dir).expanduser().resolve())
    settings = current_settings(root)
    entries: list[tuple[Flow[..., object], list[str]]] = [(voiceprint_pipeline, TAGS)]
    entries += [(stage_flow, [*TAGS, "stage"]) for stage_flow in STAGE_FLOWS]
    out = []
    for fl, tags in entries:
        defaults = {**settings.get(fl.name, {}), "project_dir": root}
        deployment = fl.to_deployment(
            name=DEPLOYMENT_NAME,
            parameters=defaults,
            description=_summary(fl),
            tags=tags,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        # Prefect keeps the schema it derived from the signature on a private attribute, and sends
        # it with the deployment; it is the only place the UI takes types and defaults from.
        typed_schema(deployment._parameter_openapi_schema.properties, defaults)
        out.append(deployment)
    return out


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
