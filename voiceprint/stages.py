"""Run one pipeline stage: validate ``params.yaml``, take the project lock, call the stage's entry point.

Every stage package exposes ``run(params, layout) -> summary`` in its ``stage`` module. This is what
``dvc.yaml`` runs (through ``python -m tasks.run STAGE``), what the Prefect flows execute (through
``dvc repro``) and what ``voiceprint stage`` calls, so the same code produces the same outputs
whichever way a stage is started.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from voiceprint.common.layout import Layout
from voiceprint.config import load_params

log = logging.getLogger("voiceprint.stages")


#: Stage name -> the module whose ``run(params, layout)`` it calls (imported when the stage runs, so
#: that ``index`` does not pay for torch). ``compare-encoder`` calls ``run_encoder(params, layout, name)``.
STAGES: dict[str, str] = {
    "prepare": "voiceprint.prepare.stage",
    "segment": "voiceprint.segment.stage",
    "model": "voiceprint.training.stage",
    "embed": "voiceprint.embed.stage",
    "index": "voiceprint.index.stage",
    "evaluate": "voiceprint.evaluate.stage",
    "compare-encoder": "voiceprint.compare.stage",  # takes the encoder name (DVC foreach item)
    "compare": "voiceprint.compare.stage",
}
ITEM_STAGES = {"compare-encoder"}


#: Project-wide stage lock, under ``data/`` (git-ignored, and no DVC output contains it).
STAGE_LOCK = Path("data") / ".stage.lock"


class ProjectBusyError(RuntimeError):
    """Another process is running a stage on the same project; the message names its PID and command.

    Entry points (``python -m tasks.run``, ``voiceprint stage``) print it as one line, no traceback:
    it is a state of the project the user resolves, not a bug.
    """


def stage_entry(name: str) -> Callable[..., dict[str, Any]]:
    """The entry point of stage ``name``: ``run(params, layout)`` of its module (``run_encoder`` for
    the ``compare-encoder`` item stage)."""
    module = importlib.import_module(STAGES[name])
    return module.run_encoder if name in ITEM_STAGES else module.run


def run_stage(
    name: str, root: str | Path = ".", overrides: dict[str, Any] | None = None, item: str | None = None
) -> dict[str, Any]:
    """Validate the parameters, take the project lock, run the stage and return its summary.

    Parameters are validated before the lock is taken so that a typo is reported without creating
    anything under ``data/``; the lock is held for the whole stage (see :func:`project_lock`).
    """
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    if (name in ITEM_STAGES) != (item is not None):
        raise ValueError(f"stage {name!r} {'needs' if name in ITEM_STAGES else 'takes no'} item argument")
    layout = Layout.at(root)
    params = load_params(layout.params, overrides)
    with project_lock(layout, name if item is None else f"{name}@{item}"):
        started = time.perf_counter()
        summary = stage_entry(name)(params, layout, *([item] if item is not None else []))
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    log.info("stage %s done in %.1f s", name, summary["wall_s"])
    return summary


@contextlib.contextmanager
def project_lock(layout: Layout, stage: str) -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on ``data/.stage.lock`` for one stage.

    Two stages writing the same project at once (``dvc repro`` in one terminal, ``voiceprint stage``
    in another, a Prefect run) would interleave writes to shared outputs; DVC's own lock only
    covers processes that go through DVC. Non-blocking because the second process should say who
    is in the way and stop, not queue silently behind an hour of training. The kernel drops a flock
    when its holder dies, so a killed stage never leaves the project locked; the file itself
    stays and only ever describes its latest holder.
    """
    path = layout.root / STAGE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ProjectBusyError(_busy_message(path, layout.root, stage, _read_holder(path))) from None
        try:
            _write_holder(fh, stage)
            yield path
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_holder(fh: IO[str], stage: str) -> None:
    """Record who holds the lock, for the error message of whoever is refused next."""
    holder = {
        "pid": os.getpid(),
        "stage": stage,
        # One line, bounded: a `python -c` holder's command is a whole script.
        "command": " ".join(shlex.join(getattr(sys, "orig_argv", sys.argv)).split())[:300],
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(holder) + "\n")
    fh.flush()


def _read_holder(path: Path) -> dict[str, Any]:
    """The holder's record; empty when it cannot be read (the holder may be between truncate and write)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _busy_message(path: Path, root: Path, stage: str, holder: dict[str, Any]) -> str:
    who = (
        f"PID {holder.get('pid', '?')} is running stage {holder.get('stage', '?')!r} "
        f"(command: {holder.get('command', '?')}; since {holder.get('since', '?')})"
        if holder
        else "another process holds it"
    )
    return (
        f"{path}: project {root} is busy, not starting stage {stage!r}: {who}. "
        "Wait for it to finish (or stop it) and run again."
    )
