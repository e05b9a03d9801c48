"""Two checkouts, one result: ``dvc repro`` in two directories gives the same ``dvc.lock``.

The project's files (git's tracked and not-ignored files, without ``dvc.lock`` and any output) are
copied into two temporary directories whose paths differ in length, each gets the same tiny
``params.yaml`` (built from the current schema, :mod:`voiceprint.config`), and the whole pipeline
runs through ``dvc repro`` in each. Every stage's deps, params and outs must then be recorded
identically: an output that embeds the checkout's absolute path, a host name, a timestamp or a
wall-clock timing hashes differently in the two runs and fails the test, which names the stage, the
output and, for a directory output, the files inside it that differ.

Timings go to files DVC does not track (``data/embed_stats.json``, ``data/compare_stats/NAME.json``)
and to MLflow, so the whole ``dvc.lock`` is compared, metrics files included. The fast tests below check the writers one by one (model directories, prepare's rejects)
so that a regression names its writer without a pipeline run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from voiceprint.config import Params, set_dotted

REPO = Path(__file__).resolve().parents[1]
#: The shared datasets beside the checkout (``../shared/datasets``, as params.yaml's data.mirror); a
#: copy of the repository elsewhere (tests/test_hermetic.py) names the excerpts by VOICEPRINT_EXCERPTS.
DATASETS = (
    Path(os.environ["VOICEPRINT_EXCERPTS"]).resolve().parent
    if os.environ.get("VOICEPRINT_EXCERPTS")
    else REPO.parent / "shared" / "datasets"
)

#: Paths never copied: what the pipeline writes (and the lock that records it), tool state.
NOT_COPIED = (
    "dvc.lock",
    "data/",
    "models/",
    "plots/",
    "metrics.json",
    "compare.json",
    "compare.md",
    "mlflow.db",
    "mlartifacts/",
    "mlruns/",
    ".prefect/",
    "enrollments/",
    ".dvc/cache/",
    ".dvc/tmp/",
)

#: Logical parameter -> where it may live in the schema, newest layout first (model keys are being
#: nested into model.aam.* / model.distill.* / model.moe.* / model.augment.*).
TINY: dict[tuple[str, ...], Any] = {
    ("data.max_speakers",): 3,
    ("data.max_utterances_per_speaker",): 4,
    ("model.steps",): 4,
    ("model.channels",): 16,
    ("model.batch_size",): 6,
    ("model.crop_s",): 1.0,
    ("model.device",): "cpu",
    ("model.aam.centres", "model.aam_centres"): "learned",
    ("model.register_model", "model.tracking.register_model", "model.mlflow.register_model"): False,
    ("model.log_every", "model.tracking.log_every", "model.mlflow.log_every"): 0,
    ("model.checkpoint_every", "model.checkpoint.every"): 0,
    ("embed.device",): "cpu",
    ("evaluate.enroll_per_speaker",): 2,
    ("evaluate.bootstrap",): 20,
    ("evaluate.snorm_top_k",): 2,
}


def default_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The schema's defaults as a ``params.yaml`` mapping, with dotted ``overrides`` (as tests/conftest.py)."""
    raw = Params().model_dump(mode="json")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return raw


def _has_key(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def tiny_params() -> dict[str, Any]:
    """The schema's defaults with the tiny run's values, each set where the current schema keeps it."""
    defaults = default_params()
    overrides: dict[str, Any] = {"data.mirror": str(DATASETS.resolve()), "compare.encoders": {"ecapa": "ecapa"}}
    for candidates, value in TINY.items():
        found = [key for key in candidates if _has_key(defaults, key)]
        if not found:
            pytest.fail(f"none of {candidates} is a parameter of voiceprint.config.Params: update TINY")
        overrides[found[0]] = value
    params = default_params(overrides)
    params["compare"]["encoders"] = {"ecapa": "ecapa"}  # replace the mapping, not merge into it
    return params


def project_files() -> list[str]:
    """The checkout's source files as git lists them (tracked, and new files that are not ignored:
    tests/test_hermetic.py's :func:`repository_files`), without outputs and the lock."""
    from test_hermetic import repository_files

    return [rel for rel in repository_files(REPO) if not rel.startswith(NOT_COPIED)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "VOICEPRINT_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python -m tasks.run`
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    # As a user runs it: Python writes __pycache__/ into the code folders the stages depend on, whose
    # .pyc files name the checkout's path (.dvcignore keeps them out of the deps' hashes).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPATH", None)
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} failed in {cwd} (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def make_project(root: Path, files: list[str], params: dict[str, Any]) -> Path:
    root.mkdir(parents=True)
    for rel in files:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    if not (root / ".dvc" / "config").exists():
        _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    _run([sys.executable, "-m", "dvc", "config", "core.autostage", "false"], root)
    return root


def _dir_listing(project: Path, path: str, md5: str) -> dict[str, str]:
    """relpath -> md5 of the files of a directory dep/out: DVC's ``.dir`` cache entry (outs), else
    the files on disk (deps are not cached)."""
    digest = md5.removesuffix(".dir")
    entry = project / ".dvc" / "cache" / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir"
    try:
        return {e["relpath"]: e["md5"] for e in json.loads(entry.read_text())}
    except (OSError, ValueError):
        root = project / path
        return {
            f.relative_to(root).as_posix(): hashlib.md5(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*"))
            if f.is_file()
        }


def _entries(lock: dict[str, Any], stage: str, kind: str) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for e in lock["stages"][stage].get(kind, [])}


def lock_differences(a: Path, b: Path, skip: set[str] = frozenset()) -> list[str]:
    """Every stage/dep/param/out recorded differently in ``a/dvc.lock`` and ``b/dvc.lock`` (paths in
    ``skip`` aside)."""
    lock_a = yaml.safe_load((a / "dvc.lock").read_text())
    lock_b = yaml.safe_load((b / "dvc.lock").read_text())
    problems: list[str] = []
    if set(lock_a["stages"]) != set(lock_b["stages"]):
        problems.append(f"stages differ: {sorted(lock_a['stages'])} vs {sorted(lock_b['stages'])}")
    for stage in sorted(set(lock_a["stages"]) & set(lock_b["stages"])):
        sa, sb = lock_a["stages"][stage], lock_b["stages"][stage]
        if sa.get("cmd") != sb.get("cmd"):
            problems.append(f"{stage}: cmd {sa.get('cmd')!r} vs {sb.get('cmd')!r}")
        if sa.get("params") != sb.get("params"):
            problems.append(f"{stage}: params differ")
        for kind in ("deps", "outs"):
            ea, eb = _entries(lock_a, stage, kind), _entries(lock_b, stage, kind)
            for path in sorted((set(ea) | set(eb)) - skip):
                x, y = ea.get(path), eb.get(path)
                if x is None or y is None:
                    problems.append(f"{stage}: {kind[:-1]} {path} recorded in one run only")
                    continue
                if x.get("md5") == y.get("md5") and x.get("size") == y.get("size"):
                    continue
                detail = ""
                if str(x.get("md5", "")).endswith(".dir"):
                    fa, fb = _dir_listing(a, path, x["md5"]), _dir_listing(b, path, y["md5"])
                    changed = sorted(p for p in set(fa) | set(fb) if fa.get(p) != fb.get(p))
                    detail = f" (files: {', '.join(changed[:10])}{' ...' if len(changed) > 10 else ''})"
                problems.append(f"{stage}: {kind[:-1]} {path} md5 {x.get('md5')} vs {y.get('md5')}{detail}")
    return problems


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dvc_repro_in_two_directories_records_identical_outputs(tmp_path: Path) -> None:
    if not (DATASETS / "librispeech-excerpts" / "MANIFEST.sha256").exists():
        pytest.skip(f"shared datasets not found at {DATASETS} (expected REPO.parent / 'shared' / 'datasets')")
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    files = project_files()
    assert "dvc.yaml" in files and "tasks/run.py" in files, "not a checkout of the voiceprint project"
    params = tiny_params()
    short = make_project(tmp_path / "a", files, params)
    long = make_project(tmp_path / "a-much-longer-directory-name" / "nested" / "checkout", files, params)

    timings = {}
    for project in (short, long):
        started = time.monotonic()
        _run([sys.executable, "-m", "dvc", "repro", "--quiet"], project)
        timings[project.name] = round(time.monotonic() - started, 1)
    print(f"dvc repro wall time per checkout (s): {timings}")

    skip: set[str] = set()
    problems = [f"dvc.lock: {p}" for p in lock_differences(short, long, skip)]
    always = {
        name
        for name, stage in yaml.safe_load((short / "dvc.yaml").read_text())["stages"].items()
        if stage.get("always_changed")
    }  # prepare: it always runs, to notice a changed corpus
    for project in (short, long):
        # A rerun would change nothing: no dep changed under DVC's feet (e.g. __pycache__ in a code dep).
        status = json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], project).stdout.strip() or "{}")
        problems += [
            f"dvc status in {project.name}: {stage} {change}"
            for stage, change in status.items()
            if not (stage in always and change == ["always changed"])
        ]
        # Beyond the hashes: no output names its checkout or this host (the same host ran both runs).
        problems += [f"output names its checkout or the host: {leak}" for leak in output_leaks(project, skip)]
    assert not problems, "the two checkouts disagree:\n  " + "\n  ".join(problems)
    # The whole lock is the same text (deps, params, outs and metrics, in one order).
    assert (short / "dvc.lock").read_text() == (long / "dvc.lock").read_text()


TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".csv", ".txt", ".ckpt"}


def output_leaks(project: Path, skip: set[str]) -> list[str]:
    """Text outputs containing the project's absolute path or the host name (checked as bytes)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    needles = sorted({str(project).encode(), str(project.resolve()).encode()})
    host = socket.gethostname()
    if len(host) >= 6:
        needles.append(host.encode())
    found = []
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in skip:
                continue
            root = project / out["path"]
            for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
                if f.suffix in TEXT_SUFFIXES or f.suffix == ".parquet":
                    data = f.read_bytes()
                    found += [f"{f.relative_to(project)}: {n.decode()}" for n in needles if n in data]
    return found


# ----------------------------------------------------------------------------------------- writers


def test_moe_directory_is_the_same_bytes_in_any_checkout(tmp_path: Path) -> None:
    """The mixture's writer (models/ecapa with model.arch: moe) names no path, host or time."""
    import torch

    from voiceprint.encoders.ecapa import EcapaConfig
    from voiceprint.encoders.moe import MoeConfig, load_moe, save_moe_checkpoint

    torch.manual_seed(3)
    cfg = MoeConfig(experts=2, expert=EcapaConfig.from_channels(8, lin_neurons=16), gate_channels=4)
    model = cfg.build().eval()
    classifier = torch.nn.Linear(16, 3, bias=False)
    digests = []
    for target in (tmp_path / "a" / "ecapa", tmp_path / "a-much-longer-checkout" / "nested" / "ecapa"):
        written = save_moe_checkpoint(
            target, model, cfg, classifier=classifier, labels=["x", "y", "z"], extra_card={"training": {"steps": 1}}
        )
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(written.iterdir())})
        assert str(tmp_path).encode() not in b"".join(p.read_bytes() for p in written.iterdir())
    assert digests[0] == digests[1]
    assert load_moe(tmp_path / "a" / "ecapa").model_id == load_moe(written).model_id


def test_prepare_rejects_name_sources_as_params_yaml_does(tmp_path: Path) -> None:
    """data/rejects/prepare.parquet names files of the mirror (outside the project) by the mirror
    path as configured (``../mirror/...``), so two checkouts with the same params.yaml agree."""
    import pyarrow.parquet as pq

    from voiceprint.common.layout import Layout
    from voiceprint.config import DataParams
    from voiceprint.prepare.stage import prepare

    excerpts = DATASETS / "librispeech-excerpts"
    if not (excerpts / "MANIFEST.sha256").exists():
        pytest.skip(f"shared datasets not found at {DATASETS}")
    speaker = sorted(p for p in (excerpts / "test-other").iterdir() if p.is_dir())[0]
    files = sorted(speaker.glob("*.flac"))[:3]
    listed = [
        line
        for line in (excerpts / "MANIFEST.sha256").read_text().splitlines()
        if any(line.endswith(f"test-other/{speaker.name}/{f.name}") for f in files)
    ]
    tables = []
    for base in (tmp_path / "a", tmp_path / "a-much-longer-directory" / "nested"):
        mirror = base / "mirror" / "librispeech-excerpts"
        (mirror / "test-other" / speaker.name).mkdir(parents=True)
        (mirror / "MANIFEST.sha256").write_text("\n".join(listed) + "\n")
        shutil.copy2(files[0], mirror / "test-other" / speaker.name / files[0].name)
        corrupt = bytearray(files[1].read_bytes())
        corrupt[len(corrupt) // 2] ^= 0xFF
        (mirror / "test-other" / speaker.name / files[1].name).write_bytes(bytes(corrupt))
        # files[2] is listed but missing: its reason names the folder it is missing from
        layout = Layout.at(base / "project")
        prepare(DataParams(mirror="../mirror", train_subset=None), layout, progress=False)
        tables.append((layout.rejects("prepare").read_bytes(), pq.read_table(layout.rejects("prepare")).to_pylist()))
    rows = tables[0][1]
    assert len(rows) == 2 and all(r["path"].startswith("../mirror/librispeech-excerpts/") for r in rows), rows
    assert not any(str(tmp_path) in r["path"] + r["reason"] for r in rows), rows
    assert tables[0][0] == tables[1][0]
