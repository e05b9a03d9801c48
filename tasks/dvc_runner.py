"""Run ``dvc repro --single-item STAGE`` as a subprocess and turn its terminal output into log lines.

Plain subprocess handling with no Prefect in it: :func:`run_dvc_repro` starts DVC in this
interpreter's environment, streams its output as it arrives, collapses progress-bar redraws into
the lines a terminal would leave on screen, hands each line to a caller-supplied ``emit``, and
reports the outcome (ran / skipped by DVC) or raises :class:`StageFailed` /
:class:`DvcRepoLocked`. The Prefect tasks in ``tasks.prefect_tasks`` wrap it with the run logger.
"""

from __future__ import annotations

import codecs
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

#: How many trailing output lines a failure message carries (the traceback of the stage, usually).
TAIL_LINES = 30
#: A progress bar that never prints a newline (a long training loop) still shows up in the run log
#: at most this often, instead of only once at the end or on every redraw.
PROGRESS_LOG_INTERVAL_S = 30.0
#: After ``dvc`` exits, how long to keep draining its output pipe. A detached grandchild that
#: inherited the pipe (DVC's analytics daemon, a stray server a stage started) would otherwise keep
#: the read loop waiting for an EOF that never comes.
DRAIN_GRACE_S = 2.0

#: DVC's line for a stage whose deps, params and outs are unchanged.
SKIPPED_RE = re.compile(r"Stage '(?P<stage>[^']+)' didn't change, skipping")
#: DVC's repository lock ("Unable to acquire lock"), its per-output lock taken while another repro
#: runs a stage ("is busy, it is being blocked by"), and the project stage lock of voiceprint/stages.py.
LOCK_MARKERS = ("Unable to acquire lock", "is busy, it is being blocked by", "is busy, not starting stage")
#: Terminal escape sequences (colours, cursor movement) that mean nothing in a log.
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class StageFailed(RuntimeError):
    """``dvc repro`` exited non-zero; the message carries the stage, exit code and output tail."""

    def __init__(self, stage: str, returncode: int, tail: list[str], reason: str | None = None) -> None:
        self.stage = stage
        self.returncode = returncode
        self.tail = tail
        head = reason or (f"stage {stage!r} failed: `dvc repro --single-item {stage}` exited with code {returncode}")
        body = "\n".join(f"    {line}" for line in tail) or "    (no output)"
        super().__init__(f"{head}\n  last {len(tail)} lines of output:\n{body}")


class DvcRepoLocked(StageFailed):
    """Another DVC process (or a stage run outside DVC) holds the project, so the stage was not started."""


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
        line = ANSI_RE.sub("", line).rstrip()
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


def read_output(proc: subprocess.Popen[bytes], stream: IO[bytes]) -> Iterator[str]:
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


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
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


def run_dvc_repro(
    stage: str,
    project_dir: str | Path,
    emit: Callable[[str], None],
    *,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``dvc repro --single-item STAGE`` in ``project_dir``, passing each output line to ``emit``.

    Output (stdout and stderr as one stream, so tracebacks stay in order with the progress output)
    is read as it arrives and collapsed by :class:`OutputLines`. ``env`` defaults to
    :func:`stage_environment` of this process's environment.

    Returns:
        ``{"stage", "wall_s", "skipped"}``; ``skipped`` is True when DVC reported that the stage
        did not change and ran nothing.

    Raises:
        DvcRepoLocked: another DVC process or stage holds the project; nothing was started.
        StageFailed: any other non-zero exit (a ``RuntimeError``, with the output tail).
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    seen = {"skipped": False, "locked": False}

    def collect(line: str) -> None:
        tail.append(line)
        match = SKIPPED_RE.search(line)
        if match and match["stage"] == stage:
            seen["skipped"] = True
        if any(marker in line for marker in LOCK_MARKERS):
            seen["locked"] = True
        emit(line)

    started = time.perf_counter()
    lines = OutputLines(collect)
    proc = subprocess.Popen(
        dvc_repro_command(stage),
        cwd=project_dir,
        env=dict(env) if env is not None else stage_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream keeps tracebacks in order with the progress output
        start_new_session=True,  # see stop_process_group: dvc is terminated together with its stage
    )
    try:
        assert proc.stdout is not None
        for text in read_output(proc, proc.stdout):
            lines.feed(text)
        lines.close()
        returncode = proc.wait()
    finally:
        stop_process_group(proc)
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
    return {"stage": stage, "wall_s": wall_s, "skipped": seen["skipped"]}
