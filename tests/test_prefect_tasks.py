"""Fast tests of the Prefect layer's mechanics, without a Prefect server or the real stages.

``run_stage`` is exercised through ``.fn`` against a throw-away DVC project whose stages are tiny
``python -c`` commands, which is enough to check what matters: the command DVC runs resolves to
this venv, output is streamed line by line with progress bars collapsed, DVC's "didn't change"
is reported as ``skipped``, and failures and a held repository lock become readable errors.
The end-to-end path through a real Prefect server is in ``test_prefect_deployment.py``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.params_file import apply_overrides
from tasks.dvc_runner import (
    DvcRepoLocked,
    OutputLines,
    StageFailed,
    dvc_repro_command,
    read_output,
    stage_environment,
)
from tasks.prefect_tasks import metrics_markdown, run_stage
from voiceprint.config import ConfigError, load_params

LOGGER = "voiceprint.prefect"

# Stage commands: each prints what a real stage prints (plain lines, a \r-redrawn progress bar on
# stderr) and records which interpreter DVC's shell resolved `python` to.
_FIRST = (
    "import sys, pathlib, yaml; "
    "p = yaml.safe_load(open('params.yaml')); "
    "print('first: hello', p['greeting']['name']); "
    "[sys.stderr.write(f'\\rprogress {i}/5') for i in range(1, 6)]; sys.stderr.write('\\n'); "
    "pathlib.Path('out').mkdir(exist_ok=True); "
    "pathlib.Path('out/first.txt').write_text(p['greeting']['name'] + '\\n'); "
    "pathlib.Path('out/prefix.txt').write_text(sys.prefix)"
)
_SECOND = (
    "import pathlib; "
    "pathlib.Path('out/second.txt').write_text(pathlib.Path('out/first.txt').read_text().upper()); "
    "print('second: done')"
)
_BROKEN = "import sys; print('about to fail'); print('Traceback: boom', file=sys.stderr); sys.exit(3)"


def _dvc_yaml() -> str:
    return yaml.safe_dump(
        {
            "stages": {
                "first": {
                    "cmd": f'python -c "{_FIRST}"',
                    "params": ["greeting"],
                    "outs": ["out/first.txt", {"out/prefix.txt": {"cache": False}}],
                },
                "second": {"cmd": f'python -c "{_SECOND}"', "deps": ["out/first.txt"], "outs": ["out/second.txt"]},
                "broken": {"cmd": f'python -c "{_BROKEN}"', "outs": ["out/never.txt"]},
            }
        },
        sort_keys=False,
        width=10_000,
    )


@pytest.fixture
def fake_project(tmp_path: Path) -> Path:
    """A DVC project (no git: ``--no-scm`` keeps it fast) with three trivial stages."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text("greeting:\n  name: world  # who to greet\n")
    (project / "dvc.yaml").write_text(_dvc_yaml())
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    subprocess.run([*dvc, "config", "core.analytics", "false"], cwd=project, check=True)
    return project


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _dvc_status(project: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "first", "second"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


# ------------------------------------------------------------------ run_stage against real DVC


def test_run_stage_streams_output_and_detects_skipping(fake_project: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    first = run_stage.fn("first", str(fake_project))
    assert first["stage"] == "first" and first["skipped"] is False and first["wall_s"] > 0
    logged = _messages(caplog)
    assert "first: hello world" in logged
    # the bar is collapsed to the state a terminal leaves on screen
    assert "progress 5/5" in logged
    assert not any(line.startswith("progress 1/5") for line in logged)
    assert (fake_project / "out/first.txt").read_text() == "world\n"
    # `python` in the stage command is this venv's interpreter, via the PATH prefix
    assert (fake_project / "out/prefix.txt").read_text() == sys.prefix

    second = run_stage.fn("second", str(fake_project))
    assert second["skipped"] is False
    assert (fake_project / "out/second.txt").read_text() == "WORLD\n"
    assert _dvc_status(fake_project) == "{}"

    caplog.clear()
    again = run_stage.fn("first", str(fake_project))
    assert again["skipped"] is True
    assert any("didn't change, skipping" in line for line in _messages(caplog))

    # a params change is DVC's business: the stage runs again
    (fake_project / "params.yaml").write_text("greeting:\n  name: prefect\n")
    assert run_stage.fn("first", str(fake_project))["skipped"] is False
    assert run_stage.fn("second", str(fake_project))["skipped"] is False
    assert (fake_project / "out/second.txt").read_text() == "PREFECT\n"
    assert _dvc_status(fake_project) == "{}"


def test_run_stage_failure_names_stage_exit_code_and_output(fake_project: Path) -> None:
    with pytest.raises(StageFailed) as excinfo:
        run_stage.fn("broken", str(fake_project))
    err = excinfo.value
    assert isinstance(err, RuntimeError)
    assert err.stage == "broken" and err.returncode != 0
    message = str(err)
    assert "stage 'broken' failed" in message
    assert f"exited with code {err.returncode}" in message
    assert "about to fail" in message and "Traceback: boom" in message


def test_run_stage_reports_a_held_dvc_lock(fake_project: Path) -> None:
    import zc.lockfile  # DVC's own lock backend: holding it is exactly what a running `dvc` does

    lock = zc.lockfile.LockFile(str(fake_project / ".dvc" / "tmp" / "lock"))
    try:
        with pytest.raises(DvcRepoLocked) as excinfo:
            run_stage.fn("first", str(fake_project))
    finally:
        lock.close()
    message = str(excinfo.value)
    assert "is locked by another process" in message
    assert "Unable to acquire lock" in message  # DVC's own words are kept in the tail
    assert not (fake_project / "out/first.txt").exists()


def test_stage_environment_puts_this_interpreter_first() -> None:
    env = stage_environment({"PATH": "/usr/bin:/bin"})
    assert env["PATH"] == f"{Path(sys.executable).parent}:/usr/bin:/bin"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert dvc_repro_command("index") == [sys.executable, "-m", "dvc", "repro", "--single-item", "index"]


def test_output_is_read_as_it_arrives() -> None:
    """The first line must reach the log while the stage is still running (no buffering to EOF)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; print('early', flush=True); time.sleep(3); print('late')"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    started = time.monotonic()
    chunks = read_output(proc, proc.stdout)
    first = next(chunks)
    assert "early" in first and time.monotonic() - started < 2.5 and proc.poll() is None
    assert "late" in "".join(chunks)
    proc.stdout.close()
    assert proc.wait() == 0


# ------------------------------------------------------------------ output collapsing


def _collect(chunks: list[str], **kwargs: object) -> list[str]:
    out: list[str] = []
    lines = OutputLines(out.append, **kwargs)  # type: ignore[arg-type]
    for chunk in chunks:
        lines.feed(chunk)
    lines.close()
    return out


def test_output_lines_keep_newline_lines_and_final_bar_state() -> None:
    stream = [
        "Running stage 'x':\n> python -m tasks.run x\n",
        "\r 10%|#",  # chunks end mid-redraw
        "   | 1/10\r 50%|#####",
        "| 5/10\r100%|##########| 10/10\n",
        "done",  # no trailing newline
    ]
    assert _collect(stream) == ["Running stage 'x':", "> python -m tasks.run x", "100%|##########| 10/10", "done"]


def test_output_lines_drop_a_bar_that_cleared_itself() -> None:
    # tqdm(leave=False) erases its line with spaces and \r; the text written next is what remains
    assert _collect(["\rbar 1/3\rbar 2/3\r        \rresult: ok\n", "\r\n", "windows line\r\n"]) == [
        "result: ok",
        "windows line",
    ]


def test_output_lines_throttle_long_running_bars() -> None:
    now = [0.0]
    out: list[str] = []
    lines = OutputLines(out.append, progress_interval_s=30.0, clock=lambda: now[0])
    for step in range(1, 101):  # one redraw per second for 100 s, no newline
        now[0] = float(step)
        lines.feed(f"\rstep {step}/100 loss=0.{step:02d}")
    lines.feed("\n")
    # a redraw counts once the next \r completes it (a chunk may end mid-bar): one step behind
    assert out == [
        "step 29/100 loss=0.29",
        "step 59/100 loss=0.59",
        "step 89/100 loss=0.89",
        "step 100/100 loss=0.100",
    ]


def test_output_lines_strip_ansi_and_blank_lines() -> None:
    assert _collect(["\x1b[31mERROR\x1b[0m: failed\n", "\n", "   \n", "ok  \n"]) == ["ERROR: failed", "ok"]


# ------------------------------------------------------------------ params.yaml overrides

#: A hand-edited ``params.yaml`` in the style of the shipped one (comments, aligned end-of-line
#: comments, flow-style lists, explicit nulls). The tests write it themselves: the checkout's own
#: params.yaml holds the user's choices, which these tests must not depend on.
PARAMS_TEXT = """\
# voiceprint pipeline parameters (a test's copy)
data:
  dataset: librispeech-excerpts   # librispeech-excerpts | librispeech | folder
  path: null                      # folder datasets: <speaker>/<utterance>.{wav,flac} tree
  max_speakers: null              # per split; small values make quick runs
vad:
  threshold: 0.5
  max_segment_s: 10.0
embed:
  utterance: file                 # file | segments
index:
  type: flat                      # flat (exact cosine) | ivf | hnsw
  nlist: 64
evaluate:
  p_targets: [0.01, 0.05]
"""


@pytest.fixture
def params_project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text(PARAMS_TEXT)
    return tmp_path


def test_apply_overrides_preserves_comments_and_order(params_project: Path) -> None:
    before = (params_project / "params.yaml").read_text().splitlines()
    params = apply_overrides(
        params_project,
        {"index.type": "hnsw", "data.max_speakers": 3, "index.nlist": "3", "model.init": None},
    )
    assert params.index.type == "hnsw" and params.data.max_speakers == 3 and params.index.nlist == 3
    after = (params_project / "params.yaml").read_text().splitlines()
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert changed == [
        (
            "  max_speakers: null              # per split; small values make quick runs",
            "  max_speakers: 3                 # per split; small values make quick runs",
        ),
        (
            "  type: flat                      # flat (exact cosine) | ivf | hnsw",
            "  type: hnsw                      # flat (exact cosine) | ivf | hnsw",
        ),
        ("  nlist: 64", "  nlist: 3"),  # validated value: the int 3, not the string "3"
    ]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"index.typ": "hnsw"}, "index.typ"),
        ({"index.type": "annoy"}, "index.type"),
        ({"data.dataset": "folder"}, "data.path"),  # folder needs a path
        ({"index.nlist": 5, "indx.nlist": 5}, "indx"),
    ],
)
def test_apply_overrides_rejects_bad_values_before_writing(
    params_project: Path, overrides: dict[str, object], named: str
) -> None:
    path = params_project / "params.yaml"
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        apply_overrides(params_project, overrides)
    assert path.read_bytes() == before


def test_apply_overrides_leaves_an_unchanged_file_alone(params_project: Path) -> None:
    path = params_project / "params.yaml"
    stamp = 1_000_000_000
    os.utime(path, ns=(stamp, stamp))
    nlist = load_params(path).index.nlist
    same_values = {"index.type": "flat", "index.nlist": nlist, "data.path": None, "vad.max_segment_s": 10}
    apply_overrides(params_project, same_values)
    assert path.stat().st_mtime_ns == stamp
    apply_overrides(params_project, {})
    assert path.stat().st_mtime_ns == stamp


def test_apply_overrides_adds_keys_missing_from_the_file(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("# minimal\ndata:\n  dataset: librispeech-excerpts  # kind\n")
    apply_overrides(tmp_path, {"index.type": "ivf", "data.max_speakers": 2})
    assert (tmp_path / "params.yaml").read_text() == (
        "# minimal\ndata:\n  dataset: librispeech-excerpts  # kind\n  max_speakers: 2\nindex:\n  type: ivf\n"
    )


# ------------------------------------------------------------------ metrics artifact and flows


def test_metrics_markdown_finds_headline_metrics() -> None:
    # the evaluate stage's flat layout, with a metric the subset could not support (null)
    md = metrics_markdown(
        {
            "n_trials": 1200,
            "eer": 0.0523,
            "eer_threshold": 0.61,
            "min_dcf_p0.01": 0.41,
            "min_dcf_p0.01_threshold": 0.7,
            "min_dcf_p0.05": None,
            "eer_ci_low": 0.04,
            "eer_ci_high": 0.061,
            "eer_snorm": 0.05,
            "top1": 0.9,
            "index_top1": 0.85,
            "index_recall1": 0.9,
            "index_settings": "ivf nlist=7 nprobe=1",
            "top5": 0.975,
            "top10": 1.0,
            "model_id": "ecapa|x",
        }
    )
    headline = md.split("<details>")[0]
    assert "| EER | `eer` | 0.0523 (5.23 %) |" in headline
    assert "| minDCF | `min_dcf_p0.01` | 0.4100 |" in headline
    assert "| minDCF | `min_dcf_p0.05` | n/a |" in headline
    assert "| top-1 | `top1` | 0.9000 (90.00 %) |" in headline
    assert "| top-5 | `top5` | 0.9750 (97.50 %) |" in headline
    assert "| EER | `eer_ci_low` | 0.0400 (4.00 %) |" in headline and "`eer_ci_high`" in headline
    assert "| EER s-norm | `eer_snorm` | 0.0500 (5.00 %) |" in headline
    assert "| top-1 via index | `index_top1` | 0.8500 (85.00 %) |" in headline
    assert "| index recall | `index_recall1` | 0.9000 (90.00 %) |" in headline
    assert "| index | `index_settings` | ivf nlist=7 nprobe=1 |" in headline
    assert "threshold" not in headline and "top10" not in headline
    assert "| `model_id` | ecapa\\|x |" in md  # pipes escaped in the full table


def test_metrics_markdown_handles_nested_keys() -> None:
    md = metrics_markdown({"verification": {"eer": 0.1}, "identification": {"top_1": 0.5}})
    assert "| EER | `verification.eer` |" in md and "| top-1 | `identification.top_1` |" in md


def test_pipeline_parameters_render_as_enums_with_descriptions() -> None:
    from flows.pipeline import voiceprint_pipeline

    props = voiceprint_pipeline.parameters.properties
    assert props["index_type"]["anyOf"][0]["enum"] == ["flat", "ivf", "hnsw"]
    assert props["dataset"]["anyOf"][0]["enum"] == [
        "librispeech-excerpts",
        "librispeech",
        "folder",
        "voxceleb",
        "speech-commands",
    ]
    assert props["model_init"]["anyOf"][0]["enum"] == ["scratch", "pretrained", "distill"]
    assert props["model_arch"]["anyOf"][0]["enum"] == ["ecapa", "moe"]
    assert all(p.get("description") for p in props.values())
    assert list(props) == [
        "dataset", "dataset_path", "max_speakers", "model_init", "model_arch", "model_source", "model_steps",
        "index_type", "index_nlist", "index_nprobe", "project_dir",
    ]  # fmt: skip


def test_deployments_cover_pipeline_and_each_stage(tmp_path: Path) -> None:
    from flows.serve import deployments

    deps = deployments(tmp_path)
    assert [(d.flow_name, d.name) for d in deps] == [
        ("voiceprint-pipeline", "default"),
        *(
            (f"voiceprint-{s}", "default")
            for s in ("prepare", "segment", "model", "embed", "index", "evaluate", "compare")
        ),
    ]
    assert deps[0].entrypoint == "flows.pipeline.voiceprint_pipeline"
    assert all(d.parameters["project_dir"] == str(tmp_path.resolve()) for d in deps)
    assert [d.parameters for d in deps[1:-1]] == [{"project_dir": str(tmp_path.resolve())}] * 6
    assert "Args:" not in (deps[0].description or "")


def test_run_form_starts_from_params_yaml_typed(tmp_path: Path, params_writer) -> None:
    """The run form's defaults are the project's current settings, typed, with no None toggle
    except for settings that are null in the file; the Parameters tab gets types and defaults."""
    from flows.serve import deployments

    params_writer(tmp_path, {"index.type": "hnsw", "index.nprobe": 3, "model.steps": 7, "data.max_speakers": None})
    pipeline, *_, compare = deployments(tmp_path)
    assert pipeline.parameters == {
        "dataset": "librispeech-excerpts", "dataset_path": None, "max_speakers": None, "model_init": "scratch",
        "model_arch": "ecapa", "model_source": "speechbrain/spkrec-ecapa-voxceleb", "model_steps": 7,
        "index_type": "hnsw", "index_nlist": 64, "index_nprobe": 3, "project_dir": str(tmp_path.resolve()),
    }  # fmt: skip
    props = pipeline._parameter_openapi_schema.model_dump_for_openapi()["properties"]
    assert props["index_type"]["type"] == "string" and props["index_type"]["default"] == "hnsw"
    assert props["index_type"]["enum"] == ["flat", "ivf", "hnsw"] and "anyOf" not in props["index_type"]
    assert (props["index_nprobe"]["type"], props["index_nprobe"]["default"]) == ("integer", 3)
    assert (props["project_dir"]["type"], props["project_dir"]["default"]) == ("string", str(tmp_path.resolve()))
    assert {b["type"] for b in props["max_speakers"]["anyOf"]} == {"integer", "null"}  # null in the file
    assert compare.parameters["encoders"] == ["ecapa", "campplus", "ge2e"]
    assert compare._parameter_openapi_schema.properties["encoders"]["type"] == "array"


def test_run_writes_only_what_the_form_changed() -> None:
    from flows.pipeline import changed_settings

    defaults = {"index_type": "flat", "index_nprobe": 8, "max_speakers": 4, "dataset_path": None}
    given = {"index_type": "ivf", "index_nprobe": 8, "max_speakers": None, "dataset_path": None}
    assert changed_settings(given, defaults) == ({"index.type": "ivf"}, ("data.max_speakers",))
    # called directly (no deployment): None keeps the file, values are written
    assert changed_settings({"index_type": "hnsw", "max_speakers": None}, {}) == ({"index.type": "hnsw"}, ())


def test_apply_overrides_clears_nullable_keys(tmp_path: Path, params_writer) -> None:
    params_writer(tmp_path, {"data.max_speakers": 4})
    params = apply_overrides(tmp_path, {"index.nprobe": 2}, clear=["data.max_speakers"])
    assert params.data.max_speakers is None and params.index.nprobe == 2
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert raw["data"]["max_speakers"] is None and raw["index"]["nprobe"] == 2


def test_serve_main_refuses_a_directory_without_dvc_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.serve import main

    assert main(["--project-dir", str(tmp_path)]) == 2
    assert "not a voiceprint project" in capsys.readouterr().err
