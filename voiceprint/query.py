"""Ad-hoc SQL over the pipeline's tables with DuckDB, read-only.

:func:`connect` opens an in-memory DuckDB whose views (``embeddings``, ``utterances``, ``segments``,
``manifest``, ``rejects``) scan Arrow tables opened by pyarrow, with file access, extensions and
settings locked; :func:`run_query` runs user SQL on one (``voiceprint query``).
Views and example queries: docs/design/query.md; the lockdown: docs/reliability.md#hostile-sql.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from voiceprint.common.layout import Layout

__all__ = ["VIEWS", "connect", "format_table", "run_query", "view_paths"]

#: view name -> (Layout attribute, required?, the stage that creates the file)
VIEWS: dict[str, tuple[str, bool, str]] = {
    "embeddings": ("segment_embeddings", True, "embed"),
    "utterances": ("utterance_embeddings", True, "embed"),
    "segments": ("segments", True, "vad"),
    "manifest": ("manifest", False, "acquire"),
}


#: Set when the connection is created (before any SQL runs); docs/reliability.md#hostile-sql says why.
_LOCKED_DOWN: dict[str, Any] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    # Defence in depth behind enable_external_access=false (which already blocks INSTALL/LOAD and
    # the secrets directory): no third-party extensions, no secrets written to ~/.duckdb.
    "allow_community_extensions": False,
    "allow_persistent_secrets": False,
}


def view_paths(layout: Layout) -> dict[str, Path]:
    return {name: getattr(layout, attr) for name, (attr, _, _) in VIEWS.items()}


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(layout: Layout) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with read-only views over the pipeline's Parquet files (docs/design/query.md).

    A required table whose file does not exist yet becomes a view that fails with a message naming
    the missing file and the stage that writes it; ``manifest`` is simply absent then.
    """
    con = duckdb.connect(":memory:", config=_LOCKED_DOWN)
    scratch = tempfile.mkdtemp(prefix="voiceprint-duckdb-")
    weakref.finalize(con, shutil.rmtree, scratch, True)
    con.execute(f"SET temp_directory = {_sql_string(scratch)}")

    for name, path in view_paths(layout).items():
        _, required, stage = VIEWS[name]
        if path.exists():
            con.register(name, ds.dataset(str(path), format="parquet"))
        elif required:
            message = f"{name}: {path} does not exist yet; run the {stage} stage first"
            # The WHERE clause makes even count(*) fail (a bare error() column would be pruned).
            con.execute(f"CREATE VIEW {name} AS SELECT NULL AS missing WHERE error({_sql_string(message)}) IS NULL")

    rejects = _reject_tables(layout)
    if rejects:
        con.register("rejects", pa.concat_tables(rejects))

    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _reject_tables(layout: Layout) -> list[pa.Table]:
    """Every stage writes its own rejects table (DVC outputs cannot overlap); one view shows them all."""
    return [ds.dataset(str(f), format="parquet").to_table() for f in layout.reject_tables()]


def run_query(layout: Layout, sql: str) -> pa.Table:
    """Run ``sql`` on a fresh locked-down connection; the last statement's result as Arrow.

    Several ``;``-separated statements run in order (so a query can build a temporary table
    first); a last statement without rows (``CREATE``, ``SET``) gives DuckDB's status row or an
    empty table.
    """
    con = connect(layout)
    try:
        statements = con.extract_statements(sql)
        if not statements:
            return pa.table({})
        for statement in statements[:-1]:
            con.execute(statement)
        rel = con.sql(statements[-1].query)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    finally:
        con.close()


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        head = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value[:3])
        text = f"[{head}{', …' if len(value) > 3 else ''}] ({len(value)})" if len(value) > 3 else f"[{head}]"
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def format_table(table: pa.Table, max_rows: int = 40, max_width: int = 40) -> str:
    """Fixed-width text rendering for the terminal; embeddings shown as ``[a, b, c, …] (D)``.

    Numbers are right-aligned, everything else left-aligned; at most ``max_rows`` rows (a footer
    says how many were left out) and ``max_width`` characters per cell.
    """
    names = table.column_names
    if not names:
        return "(no result)"
    shown = table.slice(0, max_rows).to_pylist()
    columns: list[list[str]] = [[_cell(row[n], max_width) for row in shown] for n in names]
    numeric = [
        pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type) for f in table.schema
    ]
    widths = [max([len(n), *map(len, col)]) for n, col in zip(names, columns, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line([col[i] for col in columns]) for i in range(len(shown))]
    total = table.num_rows
    footer = f"({total} row{'s' if total != 1 else ''})"
    if total > len(shown):
        footer = f"({len(shown)} of {total} rows shown)"
    out.append(footer)
    return "\n".join(out)
