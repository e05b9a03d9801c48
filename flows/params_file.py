"""Apply run-time parameter overrides to ``params.yaml`` in place.

:func:`apply_overrides` validates the overrides and writes them into ``params.yaml`` with a
ruamel.yaml round trip (comments, key order and flow-style lists kept), atomically, so that DVC
sees them. Design: docs/orchestration.md#prefect.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from voiceprint.common.atomic import write_text
from voiceprint.config import ConfigError, Params, load_params

PARAMS_FILE = "params.yaml"


def _round_trip_yaml() -> YAML:
    """A round-trip loader/dumper configured to reproduce ``params.yaml``'s own formatting."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    # Never re-wrap long values (URLs, paths): a rewrite should only change the lines it must.
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    # ruamel writes a mapping value of None as an empty scalar (``path:``); keep the explicit
    # ``null`` the file uses so untouched lines round-trip byte for byte.
    yaml.representer.add_representer(type(None), _represent_null)
    return yaml


def _represent_null(representer: Any, _data: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _same(current: Any, new: Any) -> bool:
    """Value equality that does not confuse ``True`` with ``1`` (Python's ``True == 1``)."""
    if isinstance(current, bool) or isinstance(new, bool):
        return isinstance(current, bool) and isinstance(new, bool) and current == new
    return bool(current == new)


def _set_in_document(doc: CommentedMap, dotted: str, value: Any) -> bool:
    """Set ``dotted`` in the ruamel document; return whether the stored value changed.

    Assigning to an existing key of a ``CommentedMap`` keeps the key's position and its end-of-line
    comment (ruamel attaches comments to the parent mapping, not to the scalar). Sections or keys
    missing from the file (they fall back to the defaults in ``voiceprint.config``) are appended.
    """
    node = doc
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = CommentedMap()
            node[part] = child
        elif not isinstance(child, Mapping):
            raise ConfigError(f"{dotted}: '{part}' is not a section in {PARAMS_FILE}")
        node = child
    if leaf in node and _same(node[leaf], value):
        return False
    node[leaf] = value
    return True


def apply_overrides(project_dir: Path, overrides: dict[str, Any], clear: Iterable[str] = ()) -> Params:
    """Validate ``overrides`` and write them into ``project_dir/params.yaml``; return the new params.

    Args:
        project_dir: DVC project root holding ``params.yaml``.
        overrides: Dotted keys (``{"index.type": "hnsw"}``). ``None`` values mean "leave the key as
            it is", which lets callers pass every optional flow parameter straight through.
        clear: Dotted keys to set to null (``data.max_speakers``: all speakers), validated too.

    Validation happens first, against the whole resulting file, so a typo or an invalid value
    raises :class:`~voiceprint.config.ConfigError` (naming the key and the allowed values) without
    the file having been touched. The value written is the *validated* one (``"3"`` for an int
    field is stored as ``3``), so the file stays well-typed for DVC's params diff. The file is only
    rewritten when a value actually changes: an unchanged file keeps its mtime and bytes, which
    keeps ``git status`` quiet.
    """
    path = Path(project_dir) / PARAMS_FILE
    wanted = {key: value for key, value in overrides.items() if value is not None} | dict.fromkeys(clear)
    params = load_params(path, wanted)  # raises ConfigError before anything is written
    if not wanted:
        return params

    validated = params.model_dump(mode="json")
    yaml = _round_trip_yaml()
    doc = yaml.load(path.read_text(encoding="utf-8"))
    if doc is None:
        doc = CommentedMap()
    changed = False
    for dotted in wanted:
        changed |= _set_in_document(doc, dotted, _lookup(validated, dotted))
    if changed:
        out = io.StringIO()
        yaml.dump(doc, out)
        write_text(path, out.getvalue())
    return params
