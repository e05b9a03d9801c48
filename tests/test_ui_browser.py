"""The Prefect and MLflow UIs as a new user meets them, driven in headless Chromium (Playwright).

A Prefect server (UI on, temporary PREFECT_HOME, a free port given as both ``--port`` and
``PREFECT_SERVER_API_PORT``) and ``python -m flows.serve`` run for a tiny scratch project; the test
opens the pipeline deployment's Custom run form, checks it starts from params.yaml, changes the
index to IVF with ``nprobe`` 1, submits, opens the new run from the confirmation toast and waits.
The run page must show it completed with one subflow per stage; params.yaml, ``dvc status`` and
metrics.json must show the change. Then ``mlflow server`` over the project's store must open the
experiment on a runs table that lists exactly the store's runs (nested ones once expanded).
Needs Debian's ``chromium``; skipped, with the reason, where it cannot start. On failure the page's
URL, text and console errors and the servers' log tails are printed, and the page is saved as
``failure.png`` in the test's tmp dir. With ``VOICEPRINT_SCREENSHOTS=DIR`` the pages are saved as
PNGs there (docs/images).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_prefect_deployment import (
    SMALL_SUBSET,
    PrefectServer,
    _base_env,
    _dvc,
    _free_port,
    _init_repo,
    _kill_group,
    _source_deps,
    _start,
    _tail,
    copy_project_code,
    running_prefect_server,
    served,
    wait_for_terminal_state,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("VOICEPRINT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 800}
STAGE_NAMES = ("prepare", "segment", "model", "embed", "index", "evaluate", "compare")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _screenshot(page: Any, name: str, *, full_page: bool = False) -> None:
    """Save ``page`` as ``$VOICEPRINT_SCREENSHOTS/name.png`` when that variable is set."""
    target = os.environ.get("VOICEPRINT_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=full_page)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian chromium through Playwright; a skip (with the reason) where it cannot start."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        pytest.skip(f"playwright is not installed ({err}); pip install -e '.[test]'")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium (or set VOICEPRINT_CHROMIUM)")
    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        except Exception as err:
            pytest.skip(f"chromium at {CHROMIUM} does not start: {str(err).splitlines()[0]}")
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def prefect_ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """``prefect server start`` with its UI, on a free port given as --port and PREFECT_SERVER_API_PORT."""
    settings = {
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": "{port}",  # the address the UI calls; --port alone leaves it at 4200
    }
    with running_prefect_server(tmp_path_factory.mktemp("prefect-ui"), settings) as server:
        ui_settings = httpx.get(server.api_url.removesuffix("/api") + "/ui-settings", timeout=30).json()
        assert ui_settings["api_url"] == server.api_url  # the UI talks to this server, not to :4200
        yield server


@pytest.fixture
def tiny_project(tmp_path: Path, excerpts_dir: Path, params_writer) -> Path:
    """The repo's dvc.yaml and stage code on the smallest subset, comparing only the pipeline's encoder."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    code_deps = _source_deps(stages)
    project = tmp_path / "project"
    copy_project_code(project, code_deps)
    params_writer(
        project,
        {
            **SMALL_SUBSET,
            "data.mirror": str(excerpts_dir.parent),
            "compare.encoders": {"ecapa": "ecapa"},
            "evaluate.bootstrap": 0,
            "evaluate.enroll_per_speaker": 2,
        },
    )
    _init_repo(project)
    return project


def _property(page: Any, name: str) -> Any:
    """The run form's field block for flow parameter ``name``."""
    label = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{name}\b"))
    return page.locator(".schema-form-property").filter(has=label).first


def _custom_run_from_the_ui(page: Any, server: PrefectServer, deployment: dict[str, Any]) -> str:
    """Open the deployment, Run -> Custom run, switch to IVF with nprobe 1, submit; return the run id."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    # flows.serve has polled once (its registration writes are over): the UI shows the deployment Ready
    _wait_until(
        lambda: server.client.get(f"/deployments/{deployment['id']}").json()["status"] == "READY",
        "the deployment to be ready",
        lambda: server.client.get(f"/deployments/{deployment['id']}").json()["status"],
    )
    page.goto(f"{server.api_url.removesuffix('/api')}/deployments/deployment/{deployment['id']}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url(re.compile(r"/run\b"))
    index_type = _property(page, "index_type")
    index_type.locator("button.p-select-button__control").wait_for()
    # the form starts from params.yaml, typed: no "None" toggle on settings that have a value
    assert index_type.locator(".p-select-button__value").inner_text().strip() == "flat"
    nprobe = _property(page, "index_nprobe").locator("input")
    assert nprobe.input_value() == "8"
    assert _property(page, "model_steps").locator("input").input_value() == str(SMALL_SUBSET["model.steps"])
    assert "Property is type" not in _property(page, "index_type").inner_text()

    control = index_type.locator("button.p-select-button__control")
    control.focus()
    control.press("ArrowDown")  # opens the select's options (a click alone does not, headless)
    page.get_by_role("option", name="ivf", exact=True).click()
    expect(index_type.locator(".p-select-button__value")).to_have_text("ivf")  # retries: the value updates async
    nprobe.fill("1")
    expect(nprobe).to_have_value("1")
    index_type.scroll_into_view_if_needed()  # the changed fields, not the top of a long form
    _screenshot(page, "prefect-custom-run")
    # With SQLite, the server answers 503 when a write meets a concurrent one (flows.serve polls
    # every 2 s); Prefect's Python client retries those, the UI does not: it stays on the form with
    # "Something went wrong trying to create a flow run". A user submits again, and so does this.
    deployment_page = re.compile(rf"/deployments/deployment/{deployment['id']}(?:[?#].*)?$")
    failed = page.get_by_text("Something went wrong trying to create a flow run")
    for attempt in range(1, 4):
        page.get_by_role("button", name="Submit", exact=True).click()
        deadline = time.monotonic() + 120
        while not deployment_page.search(page.url) and not failed.count():
            if time.monotonic() > deadline:
                pytest.fail("Submit neither left the form nor reported an error within 120 s")
            page.wait_for_timeout(250)
        if deployment_page.search(page.url):
            break
        print(f"submit {attempt}: the UI reported that creating the flow run failed; submitting again")
        expect(failed).to_have_count(0, timeout=30_000)  # the error toast lasts 5 s
    else:
        pytest.fail("three submits failed to create the flow run")
    run_page = re.compile(rf"/runs/flow-run/{UUID}")
    toast_text = ""
    try:
        toast = page.locator(".toast-flow-run-create").last
        toast_text = toast.inner_text(timeout=4_000)
        toast.get_by_role("button", name="View run").click(force=True, timeout=4_000)
        page.wait_for_url(run_page, timeout=10_000)
        print("opened the run from the toast's View run")
    except PlaywrightTimeoutError as err:
        print(f"toast {'gone before its click' if toast_text else 'missed'} ({str(err).splitlines()[0]})")
    if not run_page.search(page.url):
        print("opening the run from the deployment page")
        page.locator("a[href*='/runs/flow-run/']").first.click(timeout=120_000)
    page.wait_for_url(run_page, timeout=120_000)
    run_id = re.search(rf"/runs/flow-run/({UUID})", page.url).group(1)  # type: ignore[union-attr]
    runs = server.client.post(
        "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}
    ).json()
    assert [r["id"] for r in runs] == [run_id], runs  # the form created this run, and only this one
    if toast_text:
        assert f"{runs[0]['name']} scheduled to start now" in " ".join(toast_text.split()), toast_text
    return run_id


@contextlib.contextmanager
def diagnostics(page: Any, workdir: Path, logs: dict[str, Path]) -> Iterator[None]:
    """On any failure (timeouts included), print the page's URL, text and console errors and the
    servers' log tails, and save a full-page screenshot to ``workdir/failure.png``."""
    console: list[str] = []
    page.on(
        "console", lambda msg: console.append(f"{msg.type}: {msg.text}") if msg.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
    try:
        yield
    except BaseException:
        shot = workdir / "failure.png"
        report = [f"--- page {page.url} (screenshot: {shot})"]
        try:
            page.screenshot(path=str(shot), full_page=True, timeout=30_000)
            report.append(page.locator("body").inner_text(timeout=10_000)[-3000:])
        except Exception as err:
            report.append(f"(page unavailable: {err})")
        report.append("--- browser console ---\n" + "\n".join(console[-30:]))
        report += [f"--- {name} ({path}) ---\n{_tail(path)}" for name, path in logs.items()]
        print("\n".join(report))
        raise


@contextlib.contextmanager
def mlflow_server(project: Path, workdir: Path) -> Iterator[str]:
    """``mlflow server`` over the project's tracking store on a free port; yields its base URL."""
    port = _free_port()
    log = workdir / "mlflow.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
        "--default-artifact-root", str(project / "mlartifacts"),
    ]  # fmt: skip
    proc = _start(cmd, env=_base_env(), cwd=project, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up after 180 s:\n{_tail(log)}")
            time.sleep(0.5)
        yield base
    finally:
        _kill_group(proc)


@pytest.mark.timeout(1500)
def test_custom_run_from_the_prefect_ui_and_its_mlflow_runs(
    browser: Any, prefect_ui_server: PrefectServer, tiny_project: Path, tmp_path: Path
) -> None:
    base = prefect_ui_server.api_url.removesuffix("/api")
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(60_000)
    logs = {
        "prefect server": prefect_ui_server.log,
        "flows.serve": tmp_path / "serve.log",
        "mlflow server": tmp_path / "mlflow.log",
    }
    with diagnostics(page, tmp_path, logs):
        _drive_both_uis(page, base, prefect_ui_server, tiny_project, tmp_path)
    page.close()


def _drive_both_uis(page: Any, base: str, server: PrefectServer, project: Path, tmp_path: Path) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    with served(project, server, tmp_path) as deployment:
        assert deployment["parameters"]["index_type"] == "flat" and deployment["parameters"]["index_nprobe"] == 8
        run_id = _custom_run_from_the_ui(page, server, deployment)
        run = wait_for_terminal_state(server, run_id, deployment, timeout_s=1200)
        assert run["parameters"]["index_type"] == "ivf" and run["parameters"]["index_nprobe"] == 1
        page.goto(f"{base}/runs/flow-run/{run_id}")
        # the page shows what the API says: the run, completed (the UI polls; allow it a while)
        expect(page.get_by_text(run["name"], exact=True).first).to_be_visible()
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible(timeout=90_000)
        # ... and its subflows, one per stage, named after it
        page.get_by_text("Subflow Runs", exact=True).click()
        for stage in STAGE_NAMES:
            expect(page.get_by_role("link", name=stage, exact=True).first).to_be_attached(timeout=90_000)
        _screenshot(page, "prefect-flow-run")

    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["index"]["type"] == "ivf" and params["index"]["nprobe"] == 1
    assert params["model"]["steps"] == SMALL_SUBSET["model.steps"]  # untouched settings stay
    status = json.loads(_dvc(project, "status", "--json").stdout or "{}")
    assert status == {"prepare": ["always changed"]}, status
    (metrics,) = json.loads((project / "metrics.json").read_text()).values()  # one eval set per source
    assert metrics["index_type"] == "ivf" and metrics["index_settings"].startswith("ivf nlist=")
    assert metrics["index_settings"].endswith("nprobe=1")
    assert 0.0 <= metrics["index_recall1"] <= 1.0 and metrics["index_top1"] is not None

    # Subflow runs are named after their stage; the parent's log has one line per stage.
    subflows = server.client.post(
        "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}
    ).json()
    names = {r["name"] for r in subflows}
    assert set(STAGE_NAMES) <= names

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("voiceprint")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    expected = {r.info.run_id: r.info.run_name for r in runs}
    assert {"model", "evaluate", "compare"} <= set(expected.values()), expected
    nested = {r.info.run_id: r.data.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.data.tags}
    top_level = {run_id: name for run_id, name in expected.items() if run_id not in nested}
    parents = set(nested.values())
    with mlflow_server(project, tmp_path) as mlflow_base:
        # MLflow 3.17's UI picks GenAI or model-training views from a browser preference that
        # defaults to GenAI; the documented link selects model training, which lists the runs.
        page.goto(f"{mlflow_base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
        expect(page.get_by_text(re.compile(rf"^{len(expected)} matching runs?$"))).to_be_visible(timeout=120_000)
        # the table lists the top-level runs, each linked to its own run page; nested runs
        # (compare:ENCODER under compare) appear once their parent is expanded
        _wait_until(
            lambda: _runs_shown(page) == top_level, "the top-level runs in the table", lambda: _runs_shown(page)
        )
        for parent in sorted(parents):
            cell = page.locator("[role=gridcell]").filter(has=page.locator(f"a[href$='/runs/{parent}']"))
            cell.locator("button").first.click()
        _wait_until(
            lambda: _runs_shown(page) == expected, f"all {len(expected)} runs in the table", lambda: _runs_shown(page)
        )
        assert "traces" not in page.url
        with contextlib.suppress(PlaywrightTimeoutError):  # the assistant panel crowds the screenshot
            page.locator("button[aria-label='Close']").last.click(timeout=5_000)
        _screenshot(page, "mlflow-runs")


def _runs_shown(page: Any) -> dict[str, str]:
    """The MLflow runs table's run links, as {run id: run name}."""
    shown = {}
    for link in page.locator("[role=gridcell] a[href*='/runs/']").all():
        match = re.search(r"/runs/([0-9a-f]{32})$", link.get_attribute("href") or "")
        if match:
            shown[match.group(1)] = link.inner_text().strip()
    return shown


def _wait_until(check: Any, what: str, actual: Any, timeout_s: float = 120.0) -> None:
    """Poll ``check()`` (the page updates asynchronously); fail naming ``what`` and showing ``actual()``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; the page shows {actual()}")
        time.sleep(1)
