"""File digests and ``sha256sum``-style checksum lists.

Datasets are verified byte for byte before anything downstream trusts them: an archive against
its publisher's MD5, every excerpt FLAC against ``MANIFEST.sha256``. Digests are computed by
streaming in fixed-size chunks so multi-gigabyte archives never need to fit in memory, and several
algorithms can share one read of the file (a 6 GB archive is read once, not once per algorithm).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough to amortise syscalls, small enough to stay cache friendly

# Hex lengths of the digests sha*sum/md5sum print, so a truncated line is caught as malformed.
_DIGEST_HEX_LENGTHS = {32, 40, 56, 64, 96, 128}
_LINE = re.compile(r"^(?P<digest>[0-9a-fA-F]+) (?P<mode>[ *])(?P<path>.+)$")


class ChecksumFormatError(ValueError):
    """A checksum list that cannot be parsed; the message names the file and the line."""


def _new_hash(algorithm: str) -> hashlib._Hash:
    # usedforsecurity=False keeps MD5 available on FIPS-enabled systems: it only detects corruption.
    return hashlib.new(algorithm, usedforsecurity=False)


def file_digests(path: str | Path, algorithms: Iterable[str], *, chunk_size: int = CHUNK_SIZE) -> dict[str, str]:
    """Hex digests of ``path`` for every algorithm in ``algorithms``, from a single read."""
    hashes = {name: _new_hash(name) for name in dict.fromkeys(algorithms)}
    if not hashes:
        raise ValueError("at least one hash algorithm is required")
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            chunk = view[:n]
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def file_digest(path: str | Path, algorithm: str = "sha256", *, chunk_size: int = CHUNK_SIZE) -> str:
    """Hex digest of ``path`` with ``algorithm`` (any name :func:`hashlib.new` accepts)."""
    return file_digests(path, [algorithm], chunk_size=chunk_size)[algorithm]


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def md5_file(path: str | Path) -> str:
    return file_digest(path, "md5")


def normalise_relpath(path: str) -> str:
    """``./a/b.flac`` and ``a//b.flac`` both become ``a/b.flac`` so lookups do not depend on spelling."""
    return posixpath.normpath(path)


def parse_checksum_text(text: str, *, source: str = "<checksums>") -> dict[str, str]:
    """Parse ``sha256sum``/``md5sum`` output into ``{relative_path: lowercase_hex_digest}``.

    Accepts text (``<hex>  path``) and binary (``<hex> *path``) lines, GNU's backslash-escaped
    names, blank lines and ``#`` comments. A path listed twice with different digests is an error:
    silently keeping either one would make verification depend on line order.
    """
    entries: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        m = _LINE.match(line)
        if not m or len(m["digest"]) not in _DIGEST_HEX_LENGTHS:
            raise ChecksumFormatError(f"{source}:{lineno}: not a '<hex digest>  <path>' line: {raw!r}")
        name = m["path"]
        if escaped:
            name = _unescape(name)
        rel = normalise_relpath(name)
        digest = m["digest"].lower()
        previous = entries.get(rel)
        if previous is not None and previous != digest:
            raise ChecksumFormatError(f"{source}:{lineno}: {rel} is listed twice with different digests")
        entries[rel] = digest
    return entries


def parse_checksum_file(path: str | Path) -> dict[str, str]:
    """Read a ``MANIFEST.sha256``-style file (see :func:`parse_checksum_text`)."""
    path = Path(path)
    return parse_checksum_text(path.read_text(encoding="utf-8"), source=str(path))


def _unescape(name: str) -> str:
    """Undo GNU coreutils' escaping of ``\\`` and newlines in file names."""
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == "\\" and i + 1 < len(name):
            nxt = name[i + 1]
            out.append({"\\": "\\", "n": "\n", "r": "\r"}.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)
