"""Acceptance test: the pipeline served as a Prefect deployment and triggered the way the UI does.

A real ``prefect server`` (SQLite in ``tmp_path``, UI off) and a real ``python -m flows.serve``
run as subprocesses; the run is created with ``POST /api/deployments/{id}/create_flow_run`` (the
request the UI's "Run" button sends) and polled until it reaches a terminal state. Afterwards DVC
must agree that everything is up to date: ``dvc status`` is clean and ``dvc repro`` runs nothing.

Two projects go through the same path:

* a stand-in project whose six stages (same names as ``dvc.yaml``) are tiny scripts, which checks
  the Prefect/DVC mechanics in seconds and independently of the stage code;
* the real ``dvc.yaml`` on a small subset of the shared LibriSpeech excerpts.

Both write their own ``params.yaml`` (schema defaults plus the test's overrides): the checkout's
params.yaml is the user's and must not change what these tests see.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "segment", "model", "embed", "index", "evaluate")
#: The encoder-comparison subflow runs one DVC stage per encoder in params.yaml, then the table.
ENCODERS = ("ecapa", "campplus", "ge2e")
COMPARE_TASKS = {f"dvc repro compare-encoder@{e}" for e in ENCODERS} | {"dvc repro compare", "apply-params"}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SERVER_START_TIMEOUT_S = 180.0


# ---------------------------------------------------------------- subprocess plumbing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group so that it can be stopped with everything it spawned."""
    with log.open("wb") as fh:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers that outlived the group leader


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "VOICEPRINT_PROJECT_DIR"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _RetryBusyTransport(httpx.HTTPTransport):
    """Retry 503/429 the way Prefect's own client does.

    With SQLite the server answers 503 ("retryable") when the database is briefly busy, e.g. while
    a second ``flows.serve`` re-registers the deployments; the UI and ``prefect`` CLI retry these.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(8):
            response = super().handle_request(request)
            if response.status_code not in (429, 503):
                return response
            response.close()
            time.sleep(min(0.25 * 2**attempt, 4.0))
        return super().handle_request(request)


@dataclass
class PrefectServer:
    api_url: str
    client: httpx.Client
    log: Path
    startup_s: float


def copy_project_code(project: Path, code_deps: list[str]) -> None:
    """``project`` (created) with the repo's dvc.yaml and the top-level files and folders its stages' code deps name."""
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    for top in sorted({Path(d).parts[0] for d in code_deps}):
        if (REPO / top).is_dir():
            shutil.copytree(REPO / top, project / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(REPO / top, project / top)


@contextlib.contextmanager
def running_prefect_server(home: Path, settings: dict[str, str]) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free 127.0.0.1 port with its own home and SQLite database, until
    ``/health`` answers; ``settings`` adds environment variables (``{port}`` in a value: the port)."""
    port = _free_port()
    env = _base_env() | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "true",  # SQLite busy -> 503: worth seeing in the log
        **{key: value.format(port=port) for key, value in settings.items()},
    }
    log = home / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    started = time.monotonic()
    proc = _start(cmd, env=env, cwd=home, log=log)
    api_url = f"http://127.0.0.1:{port}/api"
    client = httpx.Client(base_url=api_url, timeout=30.0, transport=_RetryBusyTransport())
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/health").json() is True:
                    break
            if time.monotonic() - started > SERVER_START_TIMEOUT_S:
                pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT_S:.0f} s:\n{_tail(log)}")
            time.sleep(0.25)
        yield PrefectServer(api_url=api_url, client=client, log=log, startup_s=time.monotonic() - started)
    finally:
        client.close()
        _kill_group(proc)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """The API alone: ``PREFECT_SERVER_UI_ENABLED=false`` skips preparing the UI bundle."""
    with running_prefect_server(
        tmp_path_factory.mktemp("prefect-server"), {"PREFECT_SERVER_UI_ENABLED": "false"}
    ) as server:
        print(f"\nprefect server healthy after {server.startup_s:.1f} s at {server.api_url}")
        yield server


@contextlib.contextmanager
def served(project: Path, server: PrefectServer, workdir: Path) -> Iterator[dict[str, Any]]:
    """Run ``python -m flows.serve`` for ``project``; yield the pipeline deployment once registered.

    The serve process deliberately runs from ``workdir``, not from the project, to check that the
    deployments find their project through the ``project_dir`` parameter.
    """
    env = _base_env() | {
        "PREFECT_API_URL": server.api_url,
        "PREFECT_HOME": str(workdir / "prefect-client"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # pick up the triggered run quickly (default 10 s)
    }
    log = workdir / "serve.log"
    proc = _start([sys.executable, "-m", "flows.serve", "--project-dir", str(project)], env=env, cwd=workdir, log=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flows.serve exited with {proc.returncode}:\n{_tail(log)}")
            response = server.client.get("/deployments/name/voiceprint-pipeline/default")
            if response.status_code == 200 and response.json()["parameters"].get("project_dir") == str(project):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"deployment voiceprint-pipeline/default not registered:\n{_tail(log)}")
            time.sleep(0.5)
        deployment = response.json()
        deployment["_serve_log"] = log
        yield deployment
    finally:
        _kill_group(proc)


def trigger_like_the_ui(server: PrefectServer, deployment: dict[str, Any], parameters: dict[str, Any]) -> str:
    """The request the UI's "Run" form sends (custom parameters, schema enforced)."""
    response = server.client.post(
        f"/deployments/{deployment['id']}/create_flow_run",
        json={
            "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
            "parameters": parameters,
            "enforce_parameter_schema": True,
        },
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _subflow_runs(server: PrefectServer, flow_run_id: str) -> list[dict[str, Any]]:
    response = server.client.post(
        "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}}
    )
    response.raise_for_status()
    return list(response.json())


def _run_logs(server: PrefectServer, flow_run_ids: list[str]) -> str:
    response = server.client.post(
        "/logs/filter",
        json={"logs": {"flow_run_id": {"any_": flow_run_ids}}, "sort": "TIMESTAMP_ASC", "limit": 200},
    )
    if response.status_code != 200:
        return f"(logs unavailable: {response.status_code})"
    return "\n".join(f"{entry['timestamp'][11:19]} {entry['message']}" for entry in response.json()[-120:])


def _stop_flow_run_process(server: PrefectServer, flow_run_id: str) -> None:
    """Kill a still-running flow run: the runner starts it in its own session, outside serve's group."""
    with contextlib.suppress(Exception):
        run = server.client.get(f"/flow_runs/{flow_run_id}").json()
        pid = int(str(run.get("infrastructure_pid") or "").rsplit(":", 1)[-1])
        for sig in (signal.SIGTERM, signal.SIGKILL):
            os.killpg(pid, sig)
            for _ in range(30):
                time.sleep(0.5)
                os.killpg(pid, 0)  # raises ProcessLookupError once the group is gone


def wait_for_terminal_state(
    server: PrefectServer, flow_run_id: str, deployment: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    run: dict[str, Any] = {}
    try:
        while time.monotonic() < deadline:
            run = server.client.get(f"/flow_runs/{flow_run_id}").json()
            if run.get("state_type") in TERMINAL:
                break
            time.sleep(2)
    finally:
        if run.get("state_type") not in TERMINAL:
            _stop_flow_run_process(server, flow_run_id)
    if run.get("state_type") != "COMPLETED":
        ids = [flow_run_id, *(r["id"] for r in _subflow_runs(server, flow_run_id))]
        state = run.get("state") or {}
        pytest.fail(
            f"flow run ended as {run.get('state_type')} ({state.get('message')!r}) "
            f"after {timeout_s - max(0.0, deadline - time.monotonic()):.0f} s\n"
            f"--- flow run logs ---\n{_run_logs(server, ids)}\n"
            f"--- flows.serve ---\n{_tail(deployment['_serve_log'])}"
        )
    return run


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, check=True, env=_base_env()
    )


def assert_dvc_up_to_date(project: Path) -> None:
    """What "DVC is the single source of truth" means after a Prefect run.

    A stage marked ``always_changed`` (the real ``prepare``: it notices a changed corpus itself) is
    reported and rerun by design; its rerun must leave ``dvc.lock`` as it was, so nothing downstream runs.
    """
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    always = sorted(name for name, stage in stages.items() if stage.get("always_changed"))
    status = _dvc(project, "status", "--json")
    assert json.loads(status.stdout or "{}") == {name: ["always changed"] for name in always}, status.stdout
    lock = (project / "dvc.lock").read_text()
    repro = _dvc(project, "repro")
    ran = sorted(line.split("'")[1] for line in (repro.stdout + repro.stderr).splitlines() if "Running stage '" in line)
    assert ran == always, repro.stdout + repro.stderr
    assert (project / "dvc.lock").read_text() == lock


def assert_run_structure(server: PrefectServer, flow_run_id: str) -> None:
    """One subflow per stage, in dvc.yaml order, each with a `dvc repro STAGE` task run."""
    subflows = sorted(_subflow_runs(server, flow_run_id), key=lambda r: r["start_time"] or "")
    flows = {f["id"]: f["name"] for f in server.client.post("/flows/filter", json={}).json()}
    assert [flows[r["flow_id"]] for r in subflows] == [f"voiceprint-{stage}" for stage in (*STAGES, "compare")]
    assert all(r["state_type"] == "COMPLETED" for r in subflows)
    # task runs reach the API through the event pipeline, a moment after the flow run finishes
    deadline = time.monotonic() + 60
    names: set[str] = set()
    while time.monotonic() < deadline:
        task_runs = server.client.post(
            "/task_runs/filter", json={"flow_runs": {"id": {"any_": [r["id"] for r in subflows]}}}
        ).json()
        # Prefect suffixes task-run names unless the task sets task_run_name (apply-params-0db).
        names = {"apply-params" if t["name"].startswith("apply-params") else t["name"] for t in task_runs}
        if len(names) >= len(STAGES) + len(COMPARE_TASKS):
            break
        time.sleep(1)
    assert names == {f"dvc repro {stage}" for stage in STAGES} | COMPARE_TASKS


def assert_metrics_artifact(server: PrefectServer, expected_key: str) -> None:
    artifacts = server.client.post(
        "/artifacts/filter", json={"artifacts": {"key": {"any_": ["voiceprint-metrics"]}}, "sort": "CREATED_DESC"}
    ).json()
    assert artifacts, "no voiceprint-metrics artifact"
    assert artifacts[0]["type"] == "markdown"
    assert expected_key in artifacts[0]["data"]


def _init_repo(project: Path) -> None:
    """``git init`` + ``dvc init``: DVC wants an SCM (or --no-scm); git also mirrors the real repo."""
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    _dvc(project, "init", "-q")
    _dvc(project, "config", "core.analytics", "false")


# ---------------------------------------------------------------- mechanics: stand-in stages

FAKE_STAGE = '''\
"""Stand-in for `python -m tasks.run STAGE`: reads its params section, writes its output."""
import json
import os
import pathlib
import sys
import time

import yaml

stage, section = sys.argv[1], sys.argv[2]
params = yaml.safe_load(pathlib.Path("params.yaml").read_text())
for i in range(1, 4):
    sys.stderr.write(f"\\r{stage} {i}/3")
    time.sleep(0.05)
sys.stderr.write("\\n")
out = pathlib.Path("fake")
out.mkdir(exist_ok=True)
record = {"params": params[section], "python": sys.prefix, "flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID")}
(out / f"{stage}.json").write_text(json.dumps(record))
if stage == "evaluate":
    metrics = {
        "eer": 0.125,
        "min_dcf_p0.01": 0.5,
        "top1": 0.8,
        "top5": 0.95,
        "index_type": params["index"]["type"],
    }
    pathlib.Path("metrics.json").write_text(json.dumps(metrics))
print(f"{stage}: done")
'''

#: The params section each stand-in stage depends on, as in the real dvc.yaml.
SECTIONS = {
    "prepare": "data",
    "segment": "vad",
    "model": "model",
    "embed": "embed",
    "index": "index",
    "evaluate": "evaluate",
}


INDEX_TYPE_LINE = "\n  type: flat\n"


@pytest.fixture
def standin_project(tmp_path: Path, params_writer) -> Path:
    project = tmp_path / "standin"
    project.mkdir()
    # A hand-edited file, as users keep it: the run's overrides must leave its comments in place.
    params = params_writer(project, {"compare.encoders": {e: e for e in ENCODERS}})
    text = params.read_text()
    assert text.count(INDEX_TYPE_LINE) == 1, text
    params.write_text(
        "# voiceprint parameters (stand-in project)\n"
        + text.replace(INDEX_TYPE_LINE, "\n  type: flat  # flat (exact cosine) | ivf | hnsw\n")
    )
    (project / "fake_stage.py").write_text(FAKE_STAGE)
    stages: dict[str, Any] = {}
    previous: str | None = None
    for stage in STAGES:
        stages[stage] = {
            "cmd": f"python fake_stage.py {stage} {SECTIONS[stage]}",
            "deps": ["fake_stage.py", *([previous] if previous else [])],
            "params": [SECTIONS[stage]],
            "outs": [f"fake/{stage}.json"],
        }
        previous = f"fake/{stage}.json"
    stages["evaluate"]["metrics"] = [{"metrics.json": {"cache": False}}]
    stages["compare-encoder"] = {
        "foreach": "${compare.encoders}",
        "do": {
            "cmd": "python fake_stage.py compare-${key} compare",
            "deps": ["fake_stage.py", "fake/embed.json"],
            "params": ["compare"],
            "outs": ["fake/compare-${key}.json"],
        },
    }
    stages["compare"] = {
        "cmd": "python fake_stage.py compare compare",
        "deps": [f"fake/compare-{e}.json" for e in ENCODERS],
        "params": ["compare"],
        "outs": ["fake/compare.json"],
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    _init_repo(project)
    return project


@pytest.mark.timeout(600)
def test_served_deployment_runs_standin_pipeline_via_dvc(
    prefect_server: PrefectServer, standin_project: Path, tmp_path: Path
) -> None:
    with served(standin_project, prefect_server, tmp_path) as deployment:
        assert deployment["entrypoint"] == "flows.pipeline.voiceprint_pipeline"
        schema = deployment["parameter_openapi_schema"]["properties"]
        # typed, starting from params.yaml (no "None" toggle): flows.serve.typed_schema
        assert schema["index_type"]["enum"] == ["flat", "ivf", "hnsw"] and schema["index_type"]["default"] == "flat"

        run_id = trigger_like_the_ui(prefect_server, deployment, {"index_type": "hnsw", "max_speakers": 3})
        run = wait_for_terminal_state(prefect_server, run_id, deployment, timeout_s=420)

    assert run["state_type"] == "COMPLETED"
    params = yaml.safe_load((standin_project / "params.yaml").read_text())
    assert params["index"]["type"] == "hnsw" and params["data"]["max_speakers"] == 3
    assert "# flat (exact cosine) | ivf | hnsw" in (standin_project / "params.yaml").read_text()
    assert json.loads((standin_project / "metrics.json").read_text())["index_type"] == "hnsw"
    # the stage commands ran in this virtualenv although serve was started without activating it
    record = json.loads((standin_project / "fake/prepare.json").read_text())
    assert record["python"] == sys.prefix
    # ... and know which Prefect run they belong to (voiceprint.tracking.runs tags MLflow runs with it)
    assert record["flow_run_id"] == run_id
    assert_dvc_up_to_date(standin_project)
    assert_run_structure(prefect_server, run_id)
    assert_metrics_artifact(prefect_server, "| EER | `eer` | 0.1250 (12.50 %) |")


# ---------------------------------------------------------------- acceptance: the real pipeline

SMALL_SUBSET = {
    "data.max_speakers": 3,
    "data.max_utterances_per_speaker": 4,
    "model.steps": 3,
    "model.channels": 16,
    "model.batch_size": 4,
}


def _source_deps(stages: dict[str, Any]) -> list[str]:
    """The ``deps`` of ``dvc.yaml`` that no stage writes: the code the stages run (``tasks/run.py``,
    ``voiceprint/...``), as opposed to outputs of earlier stages (``data/...``, ``models/...``)."""
    bodies = [s.get("do", s) for s in stages.values()]
    outs = {
        (o if isinstance(o, str) else next(iter(o))).split("${", 1)[0].rstrip("/")
        for body in bodies
        for o in body.get("outs", [])
    }

    def produced(dep: str) -> bool:
        return any(dep == o or dep.startswith(o + "/") or o.startswith(dep + "/") for o in outs)

    return sorted({d for body in bodies for d in body.get("deps", []) if not produced(d)})


@pytest.fixture
def real_project(tmp_path: Path, excerpts_dir: Path, params_writer) -> Path:
    """The repo's dvc.yaml and the code its stages depend on, on a small subset.

    DVC hashes the ``deps`` paths relative to the project, so the packages they are in
    (``voiceprint/``, ``tasks/``) are copied whole: ``python -m tasks.run`` then imports the copies,
    the same code as the checkout's. ``params.yaml`` is the schema's defaults with the small subset,
    not the checkout's (the user's) file; no data or model of the checkout is copied.
    """
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    code_deps = _source_deps(stages)
    missing = [d for d in code_deps if not (REPO / d).exists()]
    if missing:
        pytest.fail(f"stage code not in the repo yet, dvc.yaml deps missing: {', '.join(missing)}")
    project = tmp_path / "project"
    copy_project_code(project, code_deps)
    params_writer(project, {**SMALL_SUBSET, "data.mirror": str(excerpts_dir.parent)})
    _init_repo(project)
    return project


@pytest.mark.timeout(1200)
def test_served_deployment_runs_real_pipeline(
    prefect_server: PrefectServer, real_project: Path, tmp_path: Path
) -> None:
    with served(real_project, prefect_server, tmp_path) as deployment:
        run_id = trigger_like_the_ui(
            prefect_server, deployment, {"index_type": "hnsw", "max_speakers": 3, "model_steps": 3}
        )
        run = wait_for_terminal_state(prefect_server, run_id, deployment, timeout_s=1080)

    assert run["state_type"] == "COMPLETED"
    assert yaml.safe_load((real_project / "params.yaml").read_text())["index"]["type"] == "hnsw"
    assert (real_project / "metrics.json").is_file()
    assert_dvc_up_to_date(real_project)
    assert_run_structure(prefect_server, run_id)
    assert_metrics_artifact(prefect_server, "| EER | `librispeech.eer` |")  # the one eval set's block
