"""Prefect tasks that delegate every decision about *what* to run to DVC.

The flows never call the stage functions directly: they run ``dvc repro --single-item STAGE`` so
that DVC checks the stage's deps/params/outs, runs ``python -m tasks.run STAGE`` only if something
changed, and records the result in ``dvc.lock``. After a Prefect run ``dvc status`` is therefore
clean and a following ``dvc repro`` in a terminal has nothing to do: there is one source of truth
for "is this output up to date", and Prefect only adds scheduling, parameters from the UI, logs
and artifacts on top of it.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError

from voiceprint.config import flatten_dotted

#: How many trailing output lines a failure message carries (the traceback of the stage, usually).
TAIL_LINES = 30
#: A progress bar that never prints a newline (a long training loop) still shows up in the run log
#: at most this often, instead of only once at the end or on every redraw.
PROGRESS_LOG_INTERVAL_S = 30.0
#: After ``dvc`` exits, how long to keep draining its output pipe. A detached grandchild that
#: inherited the pipe (DVC's analytics daemon, a stray server a stage started) would otherwise keep
#: the read loop waiting for an EOF that never comes.
DRAIN_GRACE_S = 2.0
METRICS_ARTIFACT_KEY = "voiceprint-metrics"

_SKIPPED_RE = re.compile(r"Stage '(?P<stage>[^']+)' didn't change, skipping")
# DVC's repository lock ("Unable to acquire lock"), its per-output lock taken while another repro
# runs a stage ("is busy, it is being blocked by"), and the project stage lock of tasks/stages.py.
_LOCK_MARKERS = ("Unable to acquire lock", "is busy, it is being blocked by", "is busy, not starting stage")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

_fallback_log = logging.getLogger("voiceprint.prefect")


class StageFailed(RuntimeError):
    """``dvc repro`` exited non-zero; the message carries the stage, exit code and output tail."""

    def __init__(self, stage: str, returncode: int, tail: list[str], reason: str | None = None) -> None:
        self.stage = stage
        self.returncode = returncode
        self.tail = tail
        head = reason or (
            f"stage {stage!r} failed: `dvc repro --single-item {stage}` exited with code {returncode}"
        )
        body = "\n".join(f"    {line}" for line in tail) or "    (no output)"
        super().__init__(f"{head}\n  last {len(tail)} lines of output:\n{body}")


class DvcRepoLocked(StageFailed):
    """Another DVC process (or a stage run outside DVC) holds the project, so the stage was not started."""


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a flow/task run; a plain logger when called via ``.fn``.

    The fallback keeps :func:`run_stage` usable from scripts and unit tests without a Prefect API.
    """
    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback_log


class OutputLines:
    """Turn a terminal-oriented output stream into a reasonable number of log lines.

    Progress bars (tqdm, DVC's own) redraw themselves with ``\\r`` many times a second; logging each
    redraw would flood the Prefect UI and its database. A terminal only ever *shows* the last
    redraw before a newline, so this logs what a terminal would leave on screen: each
    ``\\n``-terminated line, taking its last non-blank ``\\r`` segment (the final state of a bar
    that ends with a newline, or the text that overwrote a bar that cleared itself). A bar that
    keeps redrawing without a newline is additionally logged every ``progress_interval_s``.
    """

    def __init__(
        self,
        emit: Callable[[str], None],
        *,
        progress_interval_s: float = PROGRESS_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._interval = progress_interval_s
        self._clock = clock
        self._current = ""  # text after the last \r or \n
        self._redraw: str | None = None  # last non-blank segment ended by \r on this line
        self._redraw_logged = False
        # The first periodic log comes one interval after the output starts: a short bar is only
        # logged in its final state.
        self._last_progress_log = clock()

    def feed(self, text: str) -> None:
        for piece in re.split(r"(\r|\n)", text):
            if piece == "\n":
                self._end_line()
            elif piece == "\r":
                self._carriage_return()
            elif piece:
                self._current += piece

    def close(self) -> None:
        """Flush a final line that was not newline-terminated."""
        self._end_line()

    def _carriage_return(self) -> None:
        if self._current.strip():
            self._redraw, self._redraw_logged = self._current, False
            now = self._clock()
            if now - self._last_progress_log >= self._interval:
                self._last_progress_log = now
                self._redraw_logged = True
                self._log(self._redraw)
        self._current = ""

    def _end_line(self) -> None:
        if self._current.strip():
            self._log(self._current)
        elif self._redraw is not None and not self._redraw_logged:
            self._log(self._redraw)  # "...100%|####| 9/9\r\n" or "\r\n" line endings
        self._current, self._redraw, self._redraw_logged = "", None, False

    def _log(self, line: str) -> None:
        line = _ANSI_RE.sub("", line).rstrip()
        if line.strip():
            self._emit(line)


def dvc_repro_command(stage: str) -> list[str]:
    """The exact command a flow runs; ``python -m dvc`` so the venv's DVC is used, not one on PATH."""
    return [sys.executable, "-m", "dvc", "repro", "--single-item", stage]


def stage_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for ``dvc repro``: the stage commands must run in *this* interpreter's venv.

    ``dvc.yaml`` says ``python -m tasks.run STAGE`` and DVC runs it through the shell, which
    resolves ``python`` on ``PATH``. A served deployment is often started from a shell that has no
    venv activated, where ``python`` would be the system interpreter without torch or this
    package. Prefixing the directory of ``sys.executable`` (not resolved: a venv's ``bin/python``
    is a symlink to the base interpreter) makes the stages run with the same environment as the
    flow. ``PYTHONUNBUFFERED`` makes their output arrive line by line instead of in 8 KiB blocks,
    so the Prefect log follows the stage live.
    """
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _with_flow_run_id(env: dict[str, str]) -> dict[str, str]:
    """Pass the Prefect flow run id down to the stage process for lineage.

    The stage runs in a plain subprocess of ``dvc`` with no Prefect context; ``voiceprint.tracking``
    reads ``PREFECT__FLOW_RUN_ID`` from the environment to tag the MLflow run. A served deployment's
    runner already sets it to the triggered (top-level) run; a flow called directly gets the id of
    the enclosing flow run.
    """
    if not env.get("PREFECT__FLOW_RUN_ID"):
        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            env["PREFECT__FLOW_RUN_ID"] = str(ctx.flow_run.id)
    return env


def _read_output(proc: subprocess.Popen[bytes], stream: IO[bytes]) -> Iterator[str]:
    """Yield decoded chunks of ``stream`` as they arrive until EOF or shortly after ``proc`` exits."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = stream.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        exited_at: float | None = None
        while True:
            if selector.select(timeout=0.5):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                yield decoder.decode(chunk)
            if proc.poll() is not None:
                exited_at = exited_at if exited_at is not None else time.monotonic()
                if time.monotonic() - exited_at > DRAIN_GRACE_S:
                    break
    yield decoder.decode(b"", final=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``dvc`` *and the stage it runs* if we leave early (cancelled run, interrupted process).

    DVC does not forward signals to the stage command, so terminating only the ``dvc`` process
    would leave the stage running, writing outputs behind the user's back. ``dvc`` is therefore
    started in its own process group and the whole group is signalled, gently first: on SIGINT the
    stage gets a KeyboardInterrupt while DVC (which ignores SIGINT while a stage runs) sees the
    stage fail and releases its locks cleanly; SIGTERM and SIGKILL follow if that does not work.
    """
    for sig, wait_s in ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


@task(name="dvc-repro", task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, project_dir: str) -> dict[str, Any]:
    """Reproduce one DVC stage with ``dvc repro --single-item STAGE``, streaming its output.

    ``--single-item`` keeps the decision per stage (the flow runs the stages in order, each as its
    own subflow), while DVC still skips the stage when its deps, params and outs are unchanged.

    Returns:
        ``{"stage", "wall_s", "skipped"}``; ``skipped`` is True when DVC reported that the stage
        did not change and ran nothing.

    Raises:
        DvcRepoLocked: another DVC process holds the repository lock.
        StageFailed: any other non-zero exit (a ``RuntimeError``, with the output tail).
    """
    log = _run_logger()
    cmd = dvc_repro_command(stage)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    seen = {"skipped": False, "locked": False}

    def emit(line: str) -> None:
        tail.append(line)
        match = _SKIPPED_RE.search(line)
        if match and match["stage"] == stage:
            seen["skipped"] = True
        if any(marker in line for marker in _LOCK_MARKERS):
            seen["locked"] = True
        log.info("%s", line)

    log.info("$ %s  (in %s)", shlex.join(cmd), project_dir)
    started = time.perf_counter()
    lines = OutputLines(emit)
    proc = subprocess.Popen(
        cmd,
        cwd=project_dir,
        env=_with_flow_run_id(stage_environment()),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream keeps tracebacks in order with the progress output
        start_new_session=True,  # see _stop: lets us terminate dvc together with its stage command
    )
    try:
        assert proc.stdout is not None
        for text in _read_output(proc, proc.stdout):
            lines.feed(text)
        lines.close()
        returncode = proc.wait()
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    wall_s = round(time.perf_counter() - started, 2)

    if returncode != 0:
        if seen["locked"]:
            raise DvcRepoLocked(
                stage,
                returncode,
                list(tail),
                reason=(
                    f"stage {stage!r} not started: the project at {project_dir} is locked by "
                    "another process (a `dvc repro`/`dvc status`/`dvc exp` or `voiceprint stage` "
                    "running in a terminal, or another flow run on the same project). Wait for it "
                    "to finish, then run this again"
                ),
            )
        raise StageFailed(stage, returncode, list(tail))

    skipped = seen["skipped"]
    log.info("stage %s %s in %.1f s", stage, "unchanged, skipped" if skipped else "reproduced", wall_s)
    return {"stage": stage, "wall_s": wall_s, "skipped": skipped}


# --------------------------------------------------------------------------------------------
# Metrics artifact

#: Headline metrics, matched at the start of a flattened metrics.json key or of one of its
#: segments, so the table survives nested keys (``verification.eer``) and per-operating-point
#: suffixes (``min_dcf_p0.01``); the ``*_threshold`` companions are not headlines.
_HEADLINES: tuple[tuple[str, re.Pattern[str], bool], ...] = (
    # (label, pattern, is a rate worth showing as a percentage)
    ("EER", re.compile(r"(?:^|\.)eer(?:_pct|_percent)?$"), True),
    ("minDCF", re.compile(r"(?:^|\.)min[_\-]?dcf(?!.*threshold)"), False),
    ("top-1", re.compile(r"(?:^|\.)top[_\-]?1(?!\d)(?!.*threshold)"), True),
    ("top-5", re.compile(r"(?:^|\.)top[_\-]?5(?!\d)(?!.*threshold)"), True),
)


def _fmt(value: Any, *, rate: bool = False) -> str:
    if value is None:
        return "n/a"  # the evaluate stage writes null for metrics a tiny subset cannot support
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
        return f"{text} ({100 * value:.2f} %)" if rate and 0.0 <= value <= 1.0 else text
    return str(value).replace("|", "\\|")


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """A headline table (EER, minDCF, top-1/5) followed by every scalar in ``metrics.json``."""
    flat = flatten_dotted(metrics)
    scalars = {k: v for k, v in flat.items() if v is None or isinstance(v, (int, float, str, bool))}
    lines = ["# voiceprint evaluation", "", "| Metric | Key | Value |", "|---|---|---:|"]
    found = 0
    for label, pattern, rate in _HEADLINES:
        for key, value in scalars.items():
            numeric = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if numeric and pattern.search(key.lower()):
                lines.append(f"| {label} | `{key}` | {_fmt(value, rate=rate)} |")
                found += 1
    if not found:
        lines.append("| _none found_ | | |")
    lines += ["", "<details><summary>All metrics</summary>", "", "| Key | Value |", "|---|---:|"]
    lines += [f"| `{key}` | {_fmt(value)} |" for key, value in sorted(scalars.items())]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish_metrics(project_dir: str) -> dict[str, Any]:
    """Show ``metrics.json`` (written by the ``evaluate`` stage) as a keyed markdown artifact.

    The fixed key makes the Artifacts page keep one history of the metrics across runs, so a
    parameter change (``index_type=hnsw``) can be compared with the previous run at a glance.
    """
    import json

    path = Path(project_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the evaluate stage should have written it")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    create_markdown_artifact(
        markdown=metrics_markdown(metrics),
        key=METRICS_ARTIFACT_KEY,
        description=f"metrics.json of {project_dir}",
    )
    _run_logger().info("published %s (%d values)", METRICS_ARTIFACT_KEY, len(flatten_dotted(metrics)))
    return metrics
