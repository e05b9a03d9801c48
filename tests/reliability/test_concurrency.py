"""Two writers on one project, as real separate processes.

* ``voiceprint enroll`` x 2 at once: the enrollment ``flock`` serialises them and no enrollment is
  lost (checked with the lock observed in ``/proc/locks``, and with a many-iteration race).
* ``dvc repro`` while another ``dvc repro`` runs: DVC refuses with its lock error and the first run's
  outputs come out whole.
* two stage processes (``python -m tasks.run``, ``voiceprint stage``) on one project: the second is
  refused by the project lock with a one-line error naming the holder's PID and command, and
  touches nothing; a killed holder does not leave the project locked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from voiceprint.common.layout import Layout
from voiceprint.index.enrollment import LOCK_NAME, load_enrollments
from voiceprint.index.faiss_index import INDEX_INFO
from voiceprint.stages import STAGE_LOCK, ProjectBusyError, project_lock

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
BIN = Path(sys.executable).parent


def _wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = 60.0, procs: tuple[subprocess.Popen, ...] = ()
) -> None:
    """Poll ``condition``; fail early (with its stderr) if one of ``procs`` dies meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for p in procs:
            if p.poll() is not None:
                _, err = p.communicate()
                pytest.fail(f"process {p.args!r} exited with {p.returncode} while waiting for {what}:\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _voiceprint() -> list[str]:
    script = BIN / "voiceprint"
    return [str(script)] if script.exists() else [sys.executable, "-m", "voiceprint.cli"]


# -- enrollments -------------------------------------------------------------------------------------


def _write_index_info(layout: Layout, model_id: str, dim: int) -> None:
    """The part of the index stage's output that enroll() checks (model and dimension)."""
    layout.index_dir.mkdir(parents=True, exist_ok=True)
    (layout.index_dir / INDEX_INFO).write_text(json.dumps({"model_id": model_id, "dim": dim}))


_ENROLL_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from voiceprint.index.enrollment import enroll
    from voiceprint.common.layout import Layout

    root, seed, model, dim = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    go = Path(root) / "go"
    while not go.exists():  # start both writers at the same moment
        time.sleep(0.005)
    rng = np.random.default_rng(seed)
    for i in range(8):
        enroll(Layout.at(root), "shared", rng.normal(size=(1, dim)), model)
        enroll(Layout.at(root), f"solo-{seed}", rng.normal(size=(2, dim)), model)
    """
)


def test_racing_enrollments_lose_nothing(tmp_path: Path) -> None:
    """Two processes read-modify-write the same speaker 8 times each, released at the same moment."""
    layout = Layout.at(tmp_path)
    model, dim = "ecapa-test@abc123", 32
    _write_index_info(layout, model, dim)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ENROLL_WORKER, str(layout.root), str(seed), model, str(dim)],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    time.sleep(0.2)
    (layout.root / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    counts = {e.name: e.count for e in load_enrollments(layout)}
    assert counts == {"shared": 16, "solo-1": 16, "solo-2": 16}
    assert not [p for p in layout.enrollments.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def enroll_project(tmp_path_factory: pytest.TempPathFactory, params_writer) -> Layout:
    """A project with a (random, small) ECAPA model and an index built with it: enough for the CLI.

    Its params.yaml holds the defaults, not the checkout's (the user's) settings.
    """
    import torch

    from voiceprint.encoders.ecapa import EcapaConfig, load_ecapa, save_speechbrain_checkpoint

    layout = Layout.at(tmp_path_factory.mktemp("enroll-project"))
    params_writer(layout.root)
    torch.manual_seed(0)
    cfg = EcapaConfig.from_channels(16)
    save_speechbrain_checkpoint(layout.model_dir, cfg.build().eval(), cfg)
    _write_index_info(layout, load_ecapa(layout.model_dir).model_id, cfg.lin_neurons)
    return layout


def _blocked_on(lock: Path) -> set[int]:
    """PIDs waiting (``->`` lines of /proc/locks) for a lock on ``lock``'s inode."""
    inode = os.stat(lock).st_ino
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and fields[-3].rsplit(":", 1)[-1] == str(inode):
            waiting.add(int(fields[fields.index("->") + 4]))
    return waiting


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_two_voiceprint_enroll_processes_wait_for_each_other(
    enroll_project: Layout, test_other_files: list[Path]
) -> None:
    """Both CLI processes are held at the enrollment lock at the same time, then both land."""
    layout = enroll_project
    clips = test_other_files[:3]
    layout.enrollments.mkdir(parents=True, exist_ok=True)
    lock = layout.enrollments / LOCK_NAME
    commands = [
        [*_voiceprint(), "--project", str(layout.root), "enroll", "shared", str(clips[0])],
        [*_voiceprint(), "--project", str(layout.root), "enroll", "shared", str(clips[1]), str(clips[2])],
    ]
    with open(lock, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # what a third, slow enroll would hold
        procs = [
            subprocess.Popen(c, cwd=layout.root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c in commands
        ]
        try:
            pids = {p.pid for p in procs}
            _wait_for(
                lambda: pids <= _blocked_on(lock),
                "both enroll processes to block on the lock",
                timeout_s=120,
                procs=tuple(procs),
            )
            assert not list(layout.enrollments.glob("*.parquet"))  # neither wrote past the lock
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    assert outs == ["enrolled 'shared' from 1 file(s)", "enrolled 'shared' from 2 file(s)"]
    assert {e.name: e.count for e in load_enrollments(layout)} == {"shared": 3}


# -- DVC's repository lock ---------------------------------------------------------------------------

SLOW_STAGE = """\
stages:
  slow:
    cmd: touch started && while [ ! -f release ]; do sleep 0.05; done && echo done > out.txt
    outs:
      - out.txt
"""


def _dvc(root: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=root, env=_dvc_env(root), capture_output=True, text=True, timeout=timeout
    )


def _dvc_env(root: Path) -> dict[str, str]:
    return {**ENV, "DVC_SITE_CACHE_DIR": str(root.parent / "dvc-site-cache")}


@pytest.mark.skipif(not (BIN / "dvc").exists(), reason="dvc not installed in this environment")
def test_second_dvc_repro_is_refused_while_one_runs(tmp_path: Path) -> None:
    root = tmp_path / "dvcproj"
    root.mkdir()
    assert _dvc(root, "init", "--no-scm", "-q").returncode == 0
    (root / "dvc.yaml").write_text(SLOW_STAGE)
    first = subprocess.Popen(
        [str(BIN / "dvc"), "repro"],
        cwd=root,
        env=_dvc_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: (root / "started").exists(), "the first dvc repro to start its stage", procs=(first,))
        second = _dvc(root, "repro")
        text = second.stderr + second.stdout
        assert second.returncode != 0, text
        # DVC releases its repository lock while a stage command runs and guards the stage's outputs
        # with its read/write lock instead; either refusal names what holds it.
        repo_locked = "Unable to acquire lock" in text
        outs_locked = "is busy, it is being blocked by" in text and f"(PID {first.pid}): " in text
        assert repo_locked or outs_locked, text
        assert first.poll() is None and not (root / "out.txt").exists()  # the second ran nothing
    finally:
        (root / "release").touch()
        out, _ = first.communicate(timeout=90)
    assert first.returncode == 0, out
    assert (root / "out.txt").read_text() == "done\n"
    status = _dvc(root, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    again = _dvc(root, "repro")  # the lock was released; nothing left to do
    assert again.returncode == 0 and "didn't change" in again.stdout + again.stderr


# -- the project's stage lock ------------------------------------------------------------------------

# A stage process that holds the project lock through the real run_stage, with the stage's work
# replaced by "signal, then wait for the test" so the test decides how long it runs.
_SLOW_STAGE_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from voiceprint import stages

    root = Path(sys.argv[1])

    def slow(params, layout):
        (root / "started").touch()
        while not (root / "release").exists():
            time.sleep(0.05)
        (layout.data / "slow-output.txt").write_text("done")
        return {"ok": True}

    stages.stage_entry = lambda name: slow
    print(json.dumps(stages.run_stage("embed", root)))
    """
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Layout, subprocess.Popen]]:
    """A running ``embed`` stage on a fresh project, holding the project lock until released."""
    layout = Layout.at(tmp_path / "project")
    layout.root.mkdir()
    layout.params.write_text("{}\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_STAGE_DRIVER, str(layout.root)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (layout.root / "started").exists(), "the holder to start its stage", procs=(proc,))
        yield layout, proc
    finally:
        (layout.root / "release").touch()
        if proc.poll() is None:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


SECOND_STAGE = {
    "tasks.run": (lambda root: [sys.executable, "-m", "tasks.run", "embed"], "error: "),
    "voiceprint-stage": (
        lambda root: [*_voiceprint(), "--project", str(root), "stage", "embed"],
        "voiceprint: error: ",
    ),
}


@pytest.mark.parametrize("entry", sorted(SECOND_STAGE))
def test_second_stage_process_is_refused_naming_the_holder(holder: tuple[Layout, subprocess.Popen], entry: str) -> None:
    layout, proc = holder
    command, prefix = SECOND_STAGE[entry]
    before = _tree(layout.root)
    second = subprocess.run(command(layout.root), cwd=layout.root, env=ENV, capture_output=True, text=True, timeout=90)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    message = lines[0]
    assert message.startswith(prefix + str(layout.root / STAGE_LOCK))
    assert f"PID {proc.pid} is running stage 'embed'" in message
    assert " -c " in message and "import json, sys, time" in message  # the holder's command line
    assert "not starting stage 'embed'" in message
    assert second.stdout == ""
    assert _tree(layout.root) == before  # nothing touched, not even the lock file's record
    assert proc.poll() is None  # and the holder was not disturbed


def test_holder_finishes_and_releases_the_lock(holder: tuple[Layout, subprocess.Popen]) -> None:
    layout, proc = holder
    with pytest.raises(ProjectBusyError, match=f"PID {proc.pid}"), project_lock(layout, "index"):
        pytest.fail("the lock was granted while another process holds it")
    (layout.root / "release").touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["ok"] is True
    assert (layout.data / "slow-output.txt").read_text() == "done"
    with project_lock(layout, "index"):  # free again, and now it names us
        holder_record = json.loads((layout.root / STAGE_LOCK).read_text())
    assert holder_record["pid"] == os.getpid() and holder_record["stage"] == "index"


def test_killed_holder_does_not_leave_the_project_locked(holder: tuple[Layout, subprocess.Popen]) -> None:
    layout, proc = holder
    os.kill(proc.pid, signal.SIGKILL)  # no finally block runs: only the kernel can release the lock
    proc.communicate(timeout=30)
    assert (layout.root / STAGE_LOCK).exists()  # the stale file is still there ...
    with project_lock(layout, "embed"):  # ... and does not matter
        pass
    assert not (layout.data / "slow-output.txt").exists()
