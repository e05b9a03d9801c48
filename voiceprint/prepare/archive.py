"""Defensive extraction of ``.tar``, ``.tar.gz``/``.tgz`` and ``.zip`` archives.

:func:`safe_extract` checks the whole member list first (paths and links out of the target,
special files, decompression bombs) and refuses the archive before writing a byte; it extracts
into a temporary directory renamed into place with a marker (:func:`is_extracted`).
Design: docs/reliability.md#hostile-archives.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from voiceprint.common.atomic import atomic_dir

MARKER_NAME = ".voiceprint-extracted.json"
# Ratios are meaningless for tiny archives (a 200-byte tar.gz of a 1 MB text file is harmless), so the
# ratio test applies only once the declared content exceeds this.
RATIO_FLOOR_BYTES = 1 << 20
# Tar header, long-name/PAX extension and padding blocks a legitimate member may add to the stream.
_TAR_OVERHEAD_PER_MEMBER = 4 * 512
_TAR_OVERHEAD_FIXED = 1 << 20
_COPY_CHUNK = 1 << 20
# What corrupt or truncated compressed input raises from gzip/zlib, bz2, lzma and tarfile.
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)

MemberKind = Literal["file", "dir", "symlink", "hardlink"]


class ArchiveError(RuntimeError):
    """An archive that was refused or could not be read; the message names archive, member and reason."""


@dataclass(frozen=True)
class _Member:
    name: str  # normalised, relative, no '..'
    kind: MemberKind
    size: int
    link: str | None = None  # normalised target (relative to the archive root) for links


def safe_extract(
    archive: Path,
    target: Path,
    *,
    max_total_bytes: int = 50 * 2**30,
    max_ratio: float = 200.0,
    max_members: int = 1_000_000,
) -> list[Path]:
    """Extract ``archive`` into the directory ``target`` and return the extracted files and links.

    ``target`` is owned by this function: it must be absent, empty, or a previous extraction made
    here (recognised by its marker), and it is replaced as a whole. Raises :class:`ArchiveError`
    naming the archive, the offending member and the reason when the archive is refused.
    """
    archive = Path(archive)
    target = Path(target)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: archive not found")
    st = archive.stat()
    compressed_size = st.st_size
    # Name, size and mtime identify "the same archive" without re-reading gigabytes to hash it.
    identity = {"archive": archive.name, "size": compressed_size, "mtime_ns": st.st_mtime_ns}

    marker = read_marker(target)
    if marker is not None and all(marker.get(k) == v for k, v in identity.items()):
        return [target / rel for rel in marker.get("files", [])]
    if target.exists() and marker is None and (not target.is_dir() or any(target.iterdir())):
        raise ArchiveError(
            f"{archive}: refusing to extract into {target}: it exists, is not empty and was not "
            f"created by a previous extraction (no {MARKER_NAME}); remove it or choose another target"
        )

    kind = _archive_kind(archive)
    limits = _Limits(archive, compressed_size, max_total_bytes, max_ratio, max_members)
    members = _scan_zip(archive, limits) if kind == "zip" else _scan_tar(archive, limits)
    _check_links(archive, members)

    with atomic_dir(target) as tmp:
        if kind == "zip":
            _extract_zip(archive, tmp, members)
        else:
            _extract_tar(archive, tmp, members, limits)
        files = [m.name for m in members if m.kind != "dir"]
        files = list(dict.fromkeys(files))  # a tar may legitimately repeat a name; the last copy wins
        info = {**identity, "members": len(members), "files": files}
        (tmp / MARKER_NAME).write_text(json.dumps(info) + "\n", encoding="utf-8")
    return [target / rel for rel in files]


def read_marker(target: Path) -> dict[str, Any] | None:
    """The marker of a finished extraction in ``target``, or ``None`` when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(target) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_extracted(target: Path) -> bool:
    """Whether ``target`` holds a finished extraction (of whichever archive)."""
    return read_marker(target) is not None


# --------------------------------------------------------------------------------------------------
# validation


@dataclass
class _Limits:
    archive: Path
    compressed_size: int
    max_total_bytes: int
    max_ratio: float
    max_members: int
    count: int = 0
    total: int = 0

    def add(self, member_name: str, size: int) -> None:
        """Account for one member; refuse as soon as a limit is crossed so scanning stops early."""
        self.count += 1
        if self.count > self.max_members:
            raise self.refuse(member_name, f"more than {self.max_members} members")
        if size < 0:
            raise self.refuse(member_name, f"negative size {size}")
        self.total += size
        if self.total > self.max_total_bytes:
            raise self.refuse(
                member_name,
                f"declared sizes add up to more than max_total_bytes={self.max_total_bytes} (decompression bomb?)",
            )
        if self.total > RATIO_FLOOR_BYTES and self.total > self.max_ratio * max(self.compressed_size, 1):
            raise self.refuse(
                member_name,
                f"declared sizes ({self.total} bytes) exceed {self.max_ratio:g} x the archive size "
                f"({self.compressed_size} bytes) (decompression bomb?)",
            )

    def stream_budget(self) -> int:
        """Bytes the decompressed tar stream may take given the members seen so far."""
        payload = min(self.max_total_bytes, max(self.max_ratio * self.compressed_size, RATIO_FLOOR_BYTES))
        return int(payload) + _TAR_OVERHEAD_FIXED + _TAR_OVERHEAD_PER_MEMBER * (self.count + 1)

    def refuse(self, member: str, reason: str) -> ArchiveError:
        return ArchiveError(f"{self.archive}: refusing member {member!r}: {reason}")


def _archive_kind(archive: Path) -> Literal["zip", "tar"]:
    # Sniff the leading magic bytes rather than trusting the suffix. zipfile.is_zipfile is not used
    # because it searches the *end* of the file, and an uncompressed tar whose last member is a zip
    # would be mistaken for that zip.
    with open(archive, "rb") as fh:
        head = fh.read(4)
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except _READ_ERRORS:
        pass
    raise ArchiveError(f"{archive}: not a tar, tar.gz or zip archive (or it is truncated)")


def _normalise(archive: Path, raw_name: str) -> str:
    """Member name as a clean relative POSIX path; refuse anything that could land outside the target."""

    def refuse(reason: str) -> ArchiveError:
        return ArchiveError(f"{archive}: refusing member {raw_name!r}: {reason}")

    if not raw_name or "\x00" in raw_name:
        raise refuse("empty name or NUL byte in name")
    if "\\" in raw_name:
        raise refuse("backslash in name (Windows-style path)")
    if raw_name.startswith("/") or (len(raw_name) > 1 and raw_name[1] == ":"):
        raise refuse("absolute path")
    name = posixpath.normpath(raw_name)
    if name == ".." or name.startswith("../"):
        raise refuse("path escapes the target directory ('..')")
    if name == "." and raw_name.rstrip("/") not in (".", ""):
        raise refuse("path resolves to the target directory itself")
    return name


def _resolve_link(archive: Path, member: str, link: str, *, symlink: bool) -> str:
    """Where a link points, relative to the archive root; refuse targets outside it."""

    def refuse(reason: str) -> ArchiveError:
        return ArchiveError(f"{archive}: refusing member {member!r}: {reason} (link target {link!r})")

    if not link:
        raise refuse("link with an empty target")
    if link.startswith("/") or "\\" in link or "\x00" in link:
        raise refuse("link to an absolute or Windows-style path")
    # Symlinks are relative to the directory holding them; tar hardlinks to the archive root.
    base = posixpath.dirname(member) if symlink else ""
    resolved = posixpath.normpath(posixpath.join(base, link))
    if resolved == ".." or resolved.startswith("../"):
        raise refuse("link points outside the target directory")
    return resolved


def _prefixes(name: str) -> Iterator[str]:
    """``a/b/c`` -> ``a``, ``a/b`` (proper ancestors only)."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _check_links(archive: Path, members: list[_Member]) -> None:
    """Refuse paths that pass through a symlink and links whose target is unknown or special.

    Lexical ``..`` checks are only sound when no path component is itself a symlink; refusing
    paths through symlinks keeps them sound without touching the filesystem.
    """
    symlinks = {m.name for m in members if m.kind == "symlink"}
    kinds: dict[str, set[str]] = {}
    for m in members:
        kinds.setdefault(m.name, set()).add(m.kind)
    for name, ks in kinds.items():
        if len(ks) > 1 and ks & {"symlink", "hardlink"}:
            raise ArchiveError(f"{archive}: refusing member {name!r}: appears both as a link and as {sorted(ks)}")
    seen_files: set[str] = set()
    for m in members:
        through = next((p for p in _prefixes(m.name) if p in symlinks), None)
        if through is not None:
            raise ArchiveError(f"{archive}: refusing member {m.name!r}: its path goes through the symlink {through!r}")
        if m.kind == "symlink":
            assert m.link is not None
            hop = next((p for p in _prefixes(m.link) if p in symlinks), None)
            if hop is not None:
                raise ArchiveError(
                    f"{archive}: refusing member {m.name!r}: link target goes through the symlink {hop!r}"
                )
        elif m.kind == "hardlink":
            if m.link not in seen_files:
                raise ArchiveError(
                    f"{archive}: refusing member {m.name!r}: hardlink to {m.link!r}, which is not an "
                    f"earlier regular file in the archive"
                )
        if m.kind in ("file", "hardlink"):
            seen_files.add(m.name)


def _scan_tar(archive: Path, limits: _Limits) -> list[_Member]:
    members: list[_Member] = []
    with _open_tar_stream(archive, limits) as tar:
        try:
            for info in tar:
                members.append(_tar_member(archive, info, limits))
        except _READ_ERRORS as err:
            raise ArchiveError(f"{archive}: unreadable tar archive ({err})") from None
    return members


def _tar_member(archive: Path, info: tarfile.TarInfo, limits: _Limits) -> _Member:
    name = _normalise(archive, info.name)
    if name == "." and not info.isdir():
        raise limits.refuse(info.name, "a non-directory member named like the target directory itself")
    if info.isreg():
        limits.add(info.name, info.size)
        return _Member(name, "file", info.size)
    limits.add(info.name, 0)
    if info.isdir():
        return _Member(name, "dir", 0)
    if info.issym():
        return _Member(name, "symlink", 0, _resolve_link(archive, info.name, info.linkname, symlink=True))
    if info.islnk():
        return _Member(name, "hardlink", 0, _resolve_link(archive, info.name, info.linkname, symlink=False))
    if info.ischr() or info.isblk():
        raise limits.refuse(info.name, "device file")
    if info.isfifo():
        raise limits.refuse(info.name, "FIFO")
    raise limits.refuse(info.name, f"unsupported member type {info.type!r}")


def _scan_zip(archive: Path, limits: _Limits) -> list[_Member]:
    members: list[_Member] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                members.append(_zip_member(archive, zf, info, limits))
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveError(f"{archive}: unreadable zip archive ({err})") from None
    return members


def _zip_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: _Limits) -> _Member:
    name = _normalise(archive, info.filename)
    if name == "." and not info.is_dir():
        raise limits.refuse(info.filename, "a non-directory member named like the target directory itself")
    # Unix mode bits, when recorded. Many writers (zipfile.writestr among them) store permission
    # bits without a file type, so only a recorded type is trusted; no type means a regular file.
    mode = info.external_attr >> 16 if info.create_system == 3 else 0
    ftype = stat.S_IFMT(mode)
    if info.is_dir():
        limits.add(info.filename, 0)
        return _Member(name, "dir", 0)
    if ftype == stat.S_IFLNK:
        limits.add(info.filename, 0)
        if info.file_size > 4096:
            raise limits.refuse(info.filename, "symlink with an implausibly long target")
        link = zf.read(info).decode("utf-8", errors="replace")
        return _Member(name, "symlink", 0, _resolve_link(archive, info.filename, link, symlink=True))
    if ftype not in (0, stat.S_IFREG):
        raise limits.refuse(info.filename, "device file, FIFO or other special file")
    limits.add(info.filename, info.file_size)
    return _Member(name, "file", info.file_size)


# --------------------------------------------------------------------------------------------------
# extraction


class _BudgetReader(io.RawIOBase):
    """Decompressed-stream reader that refuses to produce more than the limits allow."""

    def __init__(self, inner: BinaryIO, limits: _Limits):
        self._inner = inner
        self._limits = limits
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        self.consumed += n or 0
        if self.consumed > self._limits.stream_budget():
            raise self._limits.refuse(
                "<stream>",
                f"decompressed stream exceeds {self._limits.stream_budget()} bytes "
                f"(headers or data beyond the declared sizes; decompression bomb?)",
            )
        return n or 0


class _TarStream:
    """Context manager: a streaming ``tarfile`` over the budgeted, decompressed archive."""

    def __init__(self, archive: Path, limits: _Limits):
        self._archive = archive
        self._limits = limits
        self._raw: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> tarfile.TarFile:
        raw = open(self._archive, "rb")
        self._raw = raw
        magic = raw.read(6)
        raw.seek(0)
        inner: BinaryIO
        if magic.startswith(b"\x1f\x8b"):
            inner = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        elif magic.startswith(b"BZh"):
            inner = bz2.BZ2File(raw, mode="rb")  # type: ignore[assignment]
        elif magic.startswith(b"\xfd7zXZ\x00"):
            inner = lzma.LZMAFile(raw, mode="rb")  # type: ignore[assignment]
        else:
            inner = raw
        stream = io.BufferedReader(_BudgetReader(inner, self._limits), buffer_size=_COPY_CHUNK)
        try:
            self._tar = tarfile.open(fileobj=stream, mode="r|")
        except _READ_ERRORS as err:
            raw.close()
            raise ArchiveError(f"{self._archive}: unreadable tar archive ({err})") from None
        return self._tar

    def __exit__(self, *exc: object) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._raw is not None:
            self._raw.close()


def _open_tar_stream(archive: Path, limits: _Limits) -> _TarStream:
    # Streaming mode ("r|") reads members strictly in order, so member data is skipped by reading
    # it through the budget rather than by seeking around it.
    return _TarStream(archive, limits)


def _extract_tar(archive: Path, dest: Path, members: list[_Member], limits: _Limits) -> None:
    # Second pass over the same bytes: recount from zero and check each member is the validated one.
    replay = _Limits(archive, limits.compressed_size, limits.max_total_bytes, limits.max_ratio, limits.max_members)
    with _open_tar_stream(archive, replay) as tar:
        index = 0
        try:
            for info in tar:
                member = _tar_member(archive, info, replay)
                if index >= len(members) or members[index] != member:
                    raise ArchiveError(f"{archive}: member {info.name!r} changed between validation and extraction")
                index += 1
                # The 'data' filter re-checks paths and links against the real filesystem: defence
                # in depth behind the validation above, and it drops setuid bits and ownership.
                tar.extract(info, dest, filter="data")
        except _READ_ERRORS as err:
            raise ArchiveError(f"{archive}: extraction failed ({err})") from None
    if index != len(members):
        raise ArchiveError(f"{archive}: archive changed between validation and extraction")


def _extract_zip(archive: Path, dest: Path, members: list[_Member]) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info, member in zip(zf.infolist(), members, strict=True):
            try:
                _extract_zip_member(zf, info, member, dest)
            except (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError) as err:
                # A CRC mismatch here usually means the header understated the member's size (the
                # copy stopped at the declared size): the archive is corrupt or lying, so refuse it.
                # NotImplementedError/RuntimeError: unsupported compression, encrypted member.
                raise ArchiveError(f"{archive}: refusing member {info.filename!r}: {err}") from None


def _extract_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, member: _Member, dest: Path) -> None:
    """Write one validated zip member below ``dest`` (the temporary directory of the extraction)."""
    out = dest / member.name
    if member.kind == "dir":
        out.mkdir(parents=True, exist_ok=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if member.kind == "symlink":
        assert member.link is not None
        rel = posixpath.relpath(member.link, posixpath.dirname(member.name) or ".")
        if out.is_symlink() or out.exists():
            out.unlink()
        os.symlink(rel, out)
        return
    # ZipExtFile stops at the declared file_size and checks the CRC, so a lying header
    # cannot write more than the validated total.
    with zf.open(info) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
    mode = info.external_attr >> 16 if info.create_system == 3 else 0
    if mode & 0o111:
        out.chmod(0o755)
