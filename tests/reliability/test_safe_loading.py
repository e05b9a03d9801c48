"""Loading untrusted files and running user SQL cannot run code or change the project.

* Checkpoints (ECAPA and CAM++) load with ``torch.load(weights_only=True)``: a pickle that would call
  ``os.system`` is refused with an error naming the file, and its marker file never appears (the
  same file *does* create it under an unsafe load, so the check is real); a wrong architecture is a
  clear error, and ``hyperparams.yaml`` is parsed, never executed.
* ``voiceprint query`` runs DuckDB without file access: ``COPY``, ``EXPORT``, ``ATTACH``,
  ``INSTALL``/``LOAD``, persistent secrets, file readers and attempts to unlock the configuration
  fail with DuckDB's permission error, and the project tree stays byte-identical.
* The servers the project starts (Makefile ``prefect-server`` and ``mlflow-ui``, the Prefect runner
  of ``flows.serve``) bind to 127.0.0.1; the MLflow UI is started for real to check its sockets.
"""

from __future__ import annotations

import ast
import hashlib
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from voiceprint.common.layout import Layout
from voiceprint.common.schema import SEGMENTS, embedding_column, embedding_schema, l2_normalise
from voiceprint.encoders.ecapa import CheckpointError, EcapaConfig, load_ecapa, save_speechbrain_checkpoint
from voiceprint.query import connect, run_query

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# -- checkpoints -------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this runs a shell command that creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _plant(path: Path, marker: Path, *, inside: dict[str, torch.Tensor] | None) -> None:
    """Overwrite ``path`` with the exploit, inside a real state dict (torch zip) or as a bare pickle."""
    if inside is None:
        path.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))  # the protocol torch.load expects
    else:
        torch.save({**inside, "payload": _Exploit(marker)}, path)


def _assert_really_malicious(path: Path, marker: Path) -> None:
    """The control: an unsafe load of the same file does run the command."""
    if path.read_bytes()[:2] == b"PK":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists(), "the planted pickle did not execute even when loaded unsafely"
    marker.unlink()


@pytest.fixture(scope="module")
def ecapa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = EcapaConfig.from_channels(16)
    return save_speechbrain_checkpoint(tmp_path_factory.mktemp("ckpt") / "ecapa", cfg.build().eval(), cfg)


@pytest.fixture
def ecapa_copy(ecapa_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ecapa_dir, tmp_path / "tampered"))


@pytest.mark.parametrize("form", ["inside-state-dict", "bare-pickle"])
def test_ecapa_malicious_pickle_is_refused_and_not_executed(ecapa_copy: Path, tmp_path: Path, form: str) -> None:
    ckpt = ecapa_copy / "embedding_model.ckpt"
    marker = tmp_path / "pwned"
    state = torch.load(ckpt, weights_only=True) if form == "inside-state-dict" else None
    _plant(ckpt, marker, inside=state)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(ckpt))}: refused to load") as err:
        load_ecapa(ecapa_copy)
    assert "may contain code" in str(err.value)
    assert not marker.exists()
    _assert_really_malicious(ckpt, marker)


def test_ecapa_wrong_architecture_is_a_clear_error(ecapa_dir: Path, ecapa_copy: Path) -> None:
    hp = ecapa_copy / "hyperparams.yaml"
    hp.write_text(hp.read_text().replace("channels: [16, 16, 16, 16, 48]", "channels: [32, 32, 32, 32, 96]"))
    with pytest.raises(CheckpointError, match=r"embedding_model\.ckpt.*does not match.*shape mismatches") as err:
        load_ecapa(ecapa_copy)
    assert "blocks.0.conv.conv.weight" in str(err.value)

    # A state dict with a missing parameter is named as such (strict loading, no silent random init).
    state = torch.load(ecapa_dir / "embedding_model.ckpt", weights_only=True)
    del state["fc.conv.bias"]
    torch.save(state, ecapa_copy / "embedding_model.ckpt")
    hp.write_text((ecapa_dir / "hyperparams.yaml").read_text())
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): fc\.conv\.bias"):
        load_ecapa(ecapa_copy)


def test_ecapa_hyperparams_are_parsed_not_executed(ecapa_dir: Path, ecapa_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned-yaml"
    with open(ecapa_copy / "hyperparams.yaml", "a") as fh:
        fh.write(f"\nside_effect: !apply:os.mkdir [{str(marker)!r}]\nobj: !new:os.system ['touch {marker}']\n")
    encoder = load_ecapa(ecapa_copy)  # the extra entries are inert data to us
    assert encoder.model_id == load_ecapa(ecapa_dir).model_id
    assert not marker.exists()


@pytest.fixture(scope="module")
def campplus_state() -> dict[str, torch.Tensor]:
    from voiceprint.encoders.campplus import campplus_weights_path

    return torch.load(campplus_weights_path(), weights_only=True, map_location="cpu")


@pytest.mark.parametrize("form", ["inside-state-dict", "bare-pickle"])
def test_campplus_malicious_pickle_is_refused_and_not_executed(
    campplus_state: dict[str, torch.Tensor], tmp_path: Path, form: str
) -> None:
    from voiceprint.encoders.campplus import load_campplus

    ckpt = tmp_path / "campplus.pt"
    marker = tmp_path / "pwned"
    _plant(ckpt, marker, inside=campplus_state if form == "inside-state-dict" else None)
    with pytest.raises(ValueError, match=rf"{re.escape(str(ckpt))}: not a plain tensor state_dict"):
        load_campplus(ckpt)
    assert not marker.exists()
    _assert_really_malicious(ckpt, marker)


def test_campplus_wrong_architecture_is_a_clear_error(
    campplus_state: dict[str, torch.Tensor], ecapa_dir: Path, tmp_path: Path
) -> None:
    from voiceprint.encoders.campplus import load_campplus

    ckpt = tmp_path / "campplus.pt"
    state = dict(campplus_state)
    dropped = sorted(k for k in state if k.startswith("xvector.block1"))[0]
    del state[dropped]
    torch.save(state, ckpt)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(ckpt))}: not a CAM\+\+ state_dict for this architecture"
    ) as err:
        load_campplus(ckpt)
    assert dropped in str(err.value)
    # An ECAPA checkpoint handed to the CAM++ loader is named for what it is not.
    with pytest.raises(ValueError, match=r"embedding_model\.ckpt: not a CAM\+\+ state_dict"):
        load_campplus(ecapa_dir / "embedding_model.ckpt")


def _torch_load_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]


def test_every_torch_load_in_the_project_is_weights_only() -> None:
    """A guard for future code: a ``torch.load`` without ``weights_only=True`` would run pickles."""
    sources = [p for d in ("voiceprint", "flows", "tasks") for p in sorted((REPO / d).rglob("*.py"))]
    calls = {f"{p.relative_to(REPO)}:{c.lineno}": c for p in sources for c in _torch_load_calls(p)}
    assert len(calls) >= 4  # ecapa (x2), campplus, ge2e: the scan does see them
    unsafe = [
        where
        for where, call in calls.items()
        if not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )
    ]
    assert unsafe == []


# -- DuckDB queries ----------------------------------------------------------------------------------

DIM = 8


@pytest.fixture
def project(tmp_path: Path) -> Layout:
    """Segment/utterance embeddings and segments for 2 speakers x 2 utterances (one segment each)."""
    layout = Layout.at(tmp_path / "project")
    rng = np.random.default_rng(0)
    rows = [
        dict(
            segment_id=f"s{s}-{u}#000",
            utterance_id=f"s{s}-{u}",
            speaker_id=f"s{s}",
            split="eval",
            path=f"data/raw/eval/s{s}/s{s}-{u}.flac",
            start_s=0.0,
            end_s=1.0,
            num_segments=1,
            model_id="m1",
        )
        for s in range(2)
        for u in range(2)
    ]
    vectors = l2_normalise(rng.normal(size=(len(rows), DIM)))
    for path, schema, with_vectors in (
        (layout.segment_embeddings, embedding_schema(DIM), True),
        (layout.utterance_embeddings, embedding_schema(DIM, utterance_level=True), True),
        (layout.segments, SEGMENTS, False),
    ):
        cols = {f.name: [r[f.name] for r in rows] for f in schema if f.name != "embedding"}
        if with_vectors:
            cols["embedding"] = embedding_column(vectors)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols, schema=schema), path)
    (layout.root / "params.yaml").write_text("{}\n")
    return layout


def _hostile_sql(layout: Layout, outside: Path) -> dict[str, str]:
    """Statements that would write, read or escape; ``{data}``-style paths inside and outside the project."""
    data, seg = layout.data, layout.segment_embeddings
    return {
        "copy-to-data": f"COPY (SELECT 1 AS x) TO '{data / 'x.csv'}'",
        "copy-over-parquet": f"COPY embeddings TO '{seg}' (FORMAT parquet)",
        "copy-over-parquet-in-place": f"COPY embeddings TO '{seg}' (FORMAT parquet, USE_TMP_FILE false)",
        "copy-to-default-temp-dir": f"COPY embeddings TO '{layout.root / '.tmp' / 'spill.csv'}'",
        "copy-outside": f"COPY (SELECT 42 AS x) TO '{outside / 'x.json'}' (FORMAT json)",
        "copy-to-cwd": "COPY (SELECT 1 AS x) TO 'voiceprint-query-test.csv'",
        "export-database": f"EXPORT DATABASE '{data / 'export'}'",
        "attach-new-db": f"ATTACH '{data / 'new.db'}' AS other",
        "attach-then-write": f"ATTACH '{data / 'new.duckdb'}' AS other; CREATE TABLE other.t AS SELECT 1",
        "install": "INSTALL httpfs",
        "force-install": "FORCE INSTALL spatial",
        "install-community": "INSTALL h3 FROM community",
        "load": "LOAD httpfs",
        "load-file": f"LOAD '{outside / 'evil.duckdb_extension'}'",
        "read-csv": "SELECT * FROM read_csv('/etc/passwd')",
        "read-text": f"SELECT * FROM read_text('{layout.params}')",
        "read-parquet": f"SELECT * FROM read_parquet('{seg}')",
        "glob": f"SELECT * FROM glob('{layout.root}/*')",
        "enable-access": "SET enable_external_access = true",
        "reset-access": "RESET enable_external_access",
        "unlock": "SET lock_configuration = false",
        "allow-dirs": "SET allowed_directories = ['/']",
        "temp-dir": f"SET temp_directory = '{data}'",
        "profiling-output": f"PRAGMA profiling_output = '{data / 'profile.json'}'",
        "build-then-copy": f"CREATE TABLE t AS SELECT * FROM utterances; COPY t TO '{data / 't.parquet'}'",
    }


CASES = sorted(_hostile_sql(Layout.at("/p"), Path("/o")))


@pytest.mark.parametrize("case", CASES)
def test_hostile_sql_fails_clearly_and_changes_nothing(
    project: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.chdir(outside)  # relative paths (and DuckDB's default ./.tmp) would land here
    before = _tree(tmp_path)
    sql = _hostile_sql(project, outside)[case]
    with pytest.raises((duckdb.PermissionException, duckdb.InvalidInputException)) as err:
        run_query(project, sql)
    message = str(err.value)
    assert (
        "disabled by configuration" in message
        or "disabled through configuration" in message
        or ("the configuration has been locked" in message)
    ), message
    assert _tree(tmp_path) == before
    assert run_query(project, "SELECT count(*) AS n FROM embeddings").to_pylist() == [{"n": 4}]


def test_in_memory_statements_are_harmless(project: Layout, tmp_path: Path) -> None:
    """CREATE/DROP act on the throw-away in-memory database only: allowed, and files stay as they were."""
    before = _tree(tmp_path)
    result = run_query(
        project, "CREATE TABLE t AS SELECT * FROM utterances WHERE speaker_id = 's1'; SELECT count(*) AS n FROM t"
    )
    assert result.to_pylist() == [{"n": 2}]
    assert run_query(project, "DROP VIEW embeddings").num_rows <= 1
    assert _tree(tmp_path) == before
    assert run_query(project, "SELECT count(*) AS n FROM embeddings").to_pylist() == [{"n": 4}]


def test_connection_settings_are_locked_down(project: Layout) -> None:
    con = connect(project)
    settings = dict(
        con.sql(
            "SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', 'allowed_paths', "
            "'lock_configuration', 'autoinstall_known_extensions', 'autoload_known_extensions', "
            "'allow_community_extensions', 'allow_persistent_secrets')"
        ).fetchall()
    )
    assert settings == {
        "enable_external_access": "false",
        "allowed_paths": "[]",
        "lock_configuration": "true",
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "allow_community_extensions": "false",
        "allow_persistent_secrets": "false",
    }
    # DuckDB always allows its temp directory: it must be the private scratch one, outside the project.
    temp_dir = Path(con.execute("SELECT current_setting('temp_directory')").fetchone()[0])
    allowed = con.execute("SELECT current_setting('allowed_directories')").fetchone()[0]
    assert [Path(d) for d in allowed] == [temp_dir]
    assert temp_dir.name.startswith("voiceprint-duckdb-") and not temp_dir.is_relative_to(project.root)


def test_no_stray_files_in_cwd(project: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    run_query(project, "SELECT * FROM embeddings ORDER BY segment_id")
    assert _tree(tmp_path) == before


def _voiceprint() -> list[str]:
    script = Path(sys.executable).with_name("voiceprint")
    return [str(script)] if script.exists() else [sys.executable, "-m", "voiceprint.cli"]


@pytest.mark.parametrize("case", ["copy-to-data", "copy-over-parquet", "attach-new-db", "install"])
def test_voiceprint_query_cli_refuses_and_changes_nothing(project: Layout, tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    before = _tree(tmp_path)
    sql = _hostile_sql(project, outside)[case]
    proc = subprocess.run(
        [*_voiceprint(), "--project", str(project.root), "query", sql],
        cwd=outside,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("voiceprint: error: query failed: Permission Error: "), proc.stderr
    assert _tree(tmp_path) == before


# -- servers bind to 127.0.0.1 -----------------------------------------------------------------------


def _make_recipe(target: str) -> str:
    """The shell lines of a Makefile target (the lines starting with a tab after ``target:``)."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    assert recipe, f"Makefile target {target} has no recipe"
    return "\n".join(recipe)


@pytest.mark.parametrize(
    ("target", "program"), [("prefect-server", "prefect server start"), ("mlflow-ui", "mlflow ui")]
)
def test_makefile_servers_bind_to_loopback(target: str, program: str) -> None:
    recipe = _make_recipe(target)
    assert program in recipe
    hosts = re.findall(r"--host[ =](\S+)", recipe)
    assert hosts == ["127.0.0.1"], recipe


def test_no_code_binds_to_all_interfaces() -> None:
    sources = [REPO / "Makefile", *[p for d in ("voiceprint", "flows", "tasks") for p in (REPO / d).rglob("*.py")]]
    offenders = [
        str(p.relative_to(REPO)) for p in sources if re.search(r"0\.0\.0\.0|host\s*=\s*['\"]::['\"]", p.read_text())
    ]
    assert offenders == []


def test_prefect_defaults_and_flows_serve_stay_on_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``prefect server start`` without --host, and the runner ``flows.serve`` starts, stay local."""
    from prefect.settings import get_current_settings

    import flows.serve as serve_mod
    from flows.pipeline import PROJECT_DIR_ENV

    settings = get_current_settings()
    assert settings.server.api.host == "127.0.0.1"
    assert settings.runner.server.host in ("127.0.0.1", "localhost")
    assert settings.runner.server.enable is False  # no runner webserver unless asked for
    assert "--host 127.0.0.1" in serve_mod.SERVER_HINT

    captured: dict[str, object] = {}
    monkeypatch.setenv(PROJECT_DIR_ENV, str(tmp_path))  # serve_all sets it; restore it afterwards
    monkeypatch.setattr(serve_mod, "serve", lambda *deployments, **kwargs: captured.update(kwargs))
    serve_mod.serve_all(REPO)
    assert captured and not captured.get("webserver")  # the Runner is not told to open a port


def _listening(port: int) -> list[str]:
    """Local addresses in LISTEN state on ``port`` (IPv4 and IPv6), from /proc/net."""
    addresses = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            host_hex, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                assert len(host_hex) == width
                raw = bytes.fromhex(host_hex)
                # /proc/net prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.append(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, raw))
    return addresses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net")
def test_mlflow_ui_from_the_makefile_listens_on_loopback_only(tmp_path: Path) -> None:
    """Run the Makefile's ``mlflow-ui`` command (on a free port, in a scratch dir) and read its sockets."""
    recipe = _make_recipe("mlflow-ui")
    port = _free_port()
    argv = shlex.split(recipe)
    argv[argv.index("--port") + 1] = str(port)
    argv[0] = str(Path(sys.executable).with_name(argv[0]))
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "MLFLOW_HOST": "0.0.0.0"},
    )
    try:
        deadline = time.monotonic() + 150
        while not _listening(port):
            if proc.poll() is not None:
                pytest.fail(f"mlflow ui exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("mlflow ui did not start listening within 150 s")
            time.sleep(0.25)
        # The environment asked for all interfaces; the Makefile's explicit --host wins.
        assert set(_listening(port)) == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # mlflow ui runs uvicorn workers in its session
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
