"""safe_extract(): hostile archives are refused before anything is written; good ones land atomically.

Every hostile case is built as ``.tar``, ``.tar.gz`` and ``.zip`` (where the format can express it:
zip has no hardlinks), with a harmless member *before* the hostile one, and the whole directory tree
around the target is hashed before and after: a refusal must leave it byte-identical (no partial
target, no temporary directory, no file planted outside).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from voiceprint.prepare import archive as archive_mod
from voiceprint.prepare.archive import MARKER_NAME, ArchiveError, read_marker, safe_extract

pytestmark = pytest.mark.timeout(60)

FORMATS = ["tar", "tar.gz", "zip"]


@dataclass(frozen=True)
class M:
    """One archive member, independent of the archive format."""

    name: str
    kind: str = "file"  # file | dir | symlink | hardlink | chr | blk | fifo
    data: bytes = b""
    link: str = ""


def _tarinfo(m: M) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(m.name)
    ti.type = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "blk": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[m.kind]
    ti.size = len(m.data) if m.kind == "file" else 0
    ti.linkname = m.link
    ti.mode = 0o755 if m.kind == "dir" else 0o644
    return ti


def make_tar(path: Path, members: list[M]) -> Path:
    """Write ``members`` verbatim (addfile keeps hostile names such as '/abs' or '../x' as they are)."""
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            tar.addfile(_tarinfo(m), io.BytesIO(m.data) if m.kind == "file" else None)
    return path


_ZIP_MODES = {
    "symlink": stat.S_IFLNK | 0o777,
    "chr": stat.S_IFCHR | 0o644,
    "blk": stat.S_IFBLK | 0o644,
    "fifo": stat.S_IFIFO | 0o644,
}


def make_zip(path: Path, members: list[M]) -> Path:
    """Zip members; links and special files are expressed through Unix mode bits, as Info-ZIP does."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for m in members:
            if m.kind == "hardlink":
                raise ValueError("zip has no hardlinks")
            info = zipfile.ZipInfo(m.name + ("/" if m.kind == "dir" and not m.name.endswith("/") else ""))
            info.compress_type = zipfile.ZIP_DEFLATED
            if m.kind in _ZIP_MODES:
                info.create_system = 3
                info.external_attr = _ZIP_MODES[m.kind] << 16
            zf.writestr(info, m.link.encode() if m.kind == "symlink" else m.data)
    return path


def make_archive(directory: Path, fmt: str, members: list[M], stem: str = "archive") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.{fmt}"
    return make_zip(path, members) if fmt == "zip" else make_tar(path, members)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (files hashed, links by target, directories by name)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def good_members() -> list[M]:
    return [
        M("pkg", "dir"),
        M("pkg/a.txt", data=b"alpha\n"),
        M("pkg/sub", "dir"),
        M("pkg/sub/b.bin", data=os.urandom(5000)),
        M("pkg/link-to-a", "symlink", link="a.txt"),
        M("pkg/sub/hard-b", "hardlink", link="pkg/sub/b.bin"),
    ]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """``tmp_path/site/downloads`` holds archives, ``tmp_path/site/out`` is the target; escapes with
    one or two ``..`` would land in ``site`` or ``tmp_path``, both inside the snapshot."""
    (tmp_path / "site" / "downloads").mkdir(parents=True)
    return tmp_path / "site"


def assert_refused(tmp_path: Path, archive: Path, target: Path, bad_member: str, reason: str, **limits: float) -> str:
    """Extraction raises ArchiveError naming archive, member and reason, and changes nothing on disk."""
    before = snapshot(tmp_path)
    with pytest.raises(ArchiveError) as exc:
        safe_extract(archive, target, **limits)
    message = str(exc.value)
    assert str(archive) in message and repr(bad_member) in message and reason in message, message
    assert snapshot(tmp_path) == before
    assert not target.exists()
    return message


# -- good archives (the positive control: refusals below are not "refuse everything") --------------


@pytest.mark.parametrize("name", ["good.tar", "good.tar.gz", "good.tgz"])
def test_extracts_tar(tmp_path: Path, name: str) -> None:
    arc = make_tar(tmp_path / name, good_members())
    target = tmp_path / "out"
    files = safe_extract(arc, target)
    assert sorted(p.relative_to(target).as_posix() for p in files) == [
        "pkg/a.txt",
        "pkg/link-to-a",
        "pkg/sub/b.bin",
        "pkg/sub/hard-b",
    ]
    assert (target / "pkg/a.txt").read_text() == "alpha\n"
    assert (target / "pkg/link-to-a").is_symlink() and (target / "pkg/link-to-a").read_text() == "alpha\n"
    assert (target / "pkg/sub/hard-b").read_bytes() == (target / "pkg/sub/b.bin").read_bytes()
    marker = read_marker(target)
    assert marker is not None and marker["archive"] == name
    # Nothing but the target beside the archive: the temporary directory was renamed, not left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out"])


def test_extracts_tar_made_from_dot(tmp_path: Path) -> None:
    """``tar -C dir .`` archives start with a './' member and prefix every name with './'."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("f")
    arc = tmp_path / "dot.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(src, arcname=".")
    files = safe_extract(arc, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in files] == ["d/f.txt"]
    assert (tmp_path / "out" / "d" / "f.txt").read_text() == "f"


def test_extracts_zip(tmp_path: Path) -> None:
    members = [
        M("dir", "dir"),
        M("dir/a.txt", data=b"alpha"),
        M("dir/deeper/b.txt", data=b"beta"),
        M("dir/link", "symlink", link="a.txt"),
    ]
    arc = make_zip(tmp_path / "good.zip", members)
    target = tmp_path / "out"
    files = safe_extract(arc, target)
    assert sorted(p.relative_to(target).as_posix() for p in files) == ["dir/a.txt", "dir/deeper/b.txt", "dir/link"]
    assert (target / "dir/link").is_symlink() and (target / "dir/link").read_text() == "alpha"


def test_rerun_skips_finished_extraction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arc = make_tar(tmp_path / "good.tar.gz", good_members())
    target = tmp_path / "out"
    first = safe_extract(arc, target)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished extraction must not be redone")

    monkeypatch.setattr(archive_mod, "_extract_tar", boom)
    assert safe_extract(arc, target) == first


def test_new_archive_replaces_previous_extraction(tmp_path: Path) -> None:
    target = tmp_path / "out"
    safe_extract(make_tar(tmp_path / "one.tar", good_members()), target)
    safe_extract(make_tar(tmp_path / "two.tar", [M("only.txt", data=b"2")]), target)
    assert sorted(p.name for p in target.iterdir()) == sorted([MARKER_NAME, "only.txt"])


def test_not_an_archive(tmp_path: Path) -> None:
    arc = tmp_path / "junk.tar.gz"
    arc.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(ArchiveError, match="not a tar"):
        safe_extract(arc, tmp_path / "out")


# -- crashes and existing directories ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_crash_mid_extraction_leaves_no_target(
    tmp_path: Path, site: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = [m for m in good_members() if not (fmt == "zip" and m.kind == "hardlink")]
    arc = make_archive(site / "downloads", fmt, members)
    before = snapshot(tmp_path)
    calls = {"n": 0}
    if fmt == "zip":
        real, owner, attr = archive_mod._extract_zip_member, archive_mod, "_extract_zip_member"
    else:
        real, owner, attr = tarfile.TarFile.extract, tarfile.TarFile, "extract"

    def flaky(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a Ctrl-C halfway through looks like
        real(*args, **kwargs)  # type: ignore[operator]

    monkeypatch.setattr(owner, attr, flaky)
    with pytest.raises(KeyboardInterrupt):
        safe_extract(arc, site / "out")
    assert calls["n"] == 3  # it really was interrupted halfway, after writing two members
    assert snapshot(tmp_path) == before  # no target, no temporary directory


def test_refuses_to_clobber_foreign_directory(tmp_path: Path) -> None:
    arc = make_tar(tmp_path / "good.tar", good_members())
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(ArchiveError, match="not empty"):
        safe_extract(arc, target)
    assert [p.name for p in target.iterdir()] == ["precious.txt"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_archive_leaves_a_previous_extraction_intact(tmp_path: Path, site: Path, fmt: str) -> None:
    target = site / "out"
    safe_extract(make_tar(site / "downloads" / "good.tar", good_members()), target)
    evil = make_archive(site / "downloads", fmt, [M("ok.txt", data=b"fine"), M("../evil", data=b"pwned")], "evil")
    before = snapshot(tmp_path)
    with pytest.raises(ArchiveError, match="escapes"):
        safe_extract(evil, target)
    assert snapshot(tmp_path) == before
    assert read_marker(target)["archive"] == "good.tar"


# -- hostile members ---------------------------------------------------------------------------------

OK = M("ok.txt", data=b"fine")  # always first: validation must reject before writing even this

HOSTILE: dict[str, tuple[list[M], str, str]] = {
    "dotdot": ([OK, M("../evil", data=b"pwned")], "../evil", "escapes"),
    "dotdot-twice": ([OK, M("../../evil", data=b"pwned")], "../../evil", "escapes"),
    "nested-dotdot": ([OK, M("a/../../evil", data=b"pwned")], "a/../../evil", "escapes"),
    "backslash": ([OK, M("..\\evil", data=b"pwned")], "..\\evil", "backslash"),
    "symlink-absolute": ([OK, M("etc", "symlink", link="/etc")], "etc", "absolute"),
    "symlink-up": ([OK, M("a/up", "symlink", link="../../outside")], "a/up", "outside"),
    "symlink-then-write-through": (
        [OK, M("d", "symlink", link="."), M("d/x.txt", data=b"x")],
        "d/x.txt",
        "through the symlink",
    ),
    "symlink-to-symlink": (
        [OK, M("a", "symlink", link="."), M("b", "symlink", link="a/x")],
        "b",
        "link target goes through the symlink",
    ),
    "hardlink-absolute": ([OK, M("passwd", "hardlink", link="/etc/passwd")], "passwd", "absolute"),
    "hardlink-up": ([OK, M("h", "hardlink", link="../../etc/passwd")], "h", "outside"),
    "hardlink-unknown": ([OK, M("h", "hardlink", link="not-in-archive")], "h", "not an earlier regular file"),
    "chardev": ([OK, M("null", "chr")], "null", "device"),
    "blockdev": ([OK, M("sda", "blk")], "sda", "device"),
    "fifo": ([OK, M("pipe", "fifo")], "pipe", "FIFO"),
}
# zip words some reasons differently (its special files are all "special file").
ZIP_REASON = {"chardev": "special file", "blockdev": "special file", "fifo": "special file"}
HOSTILE_CASES = [
    pytest.param(case, fmt, id=f"{case}-{fmt}")
    for case in HOSTILE
    for fmt in FORMATS
    if not (fmt == "zip" and any(m.kind == "hardlink" for m in HOSTILE[case][0]))
]


@pytest.mark.parametrize(("case", "fmt"), HOSTILE_CASES)
def test_refuses_hostile_member(tmp_path: Path, site: Path, case: str, fmt: str) -> None:
    members, bad_member, reason = HOSTILE[case]
    arc = make_archive(site / "downloads", fmt, members)
    if fmt == "zip":
        reason = ZIP_REASON.get(case, reason)
    assert_refused(tmp_path, arc, site / "out", bad_member, reason)


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_absolute_member_and_plants_nothing_there(tmp_path: Path, site: Path, fmt: str) -> None:
    planted = tmp_path / "planted.txt"  # an absolute name pointing inside the snapshot
    arc = make_archive(site / "downloads", fmt, [OK, M(str(planted), data=b"pwned")])
    assert_refused(tmp_path, arc, site / "out", str(planted), "absolute")
    assert not planted.exists()


# -- decompression bombs -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tar", "tar.gz"])
def test_refuses_tar_member_declaring_huge_size(tmp_path: Path, site: Path, fmt: str) -> None:
    # Only the header is written: a bomb announces its size long before it delivers the bytes.
    info = _tarinfo(M("huge.bin"))
    info.size = 2**40
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    arc = site / "downloads" / f"bomb.{fmt}"
    opener = gzip.open if fmt == "tar.gz" else open
    with opener(arc, "wb") as fh:
        fh.write(header + b"\0" * 4096)
    assert_refused(tmp_path, arc, site / "out", "huge.bin", "max_total_bytes")


@pytest.mark.parametrize("fmt", FORMATS)
def test_size_cap_applies_to_every_format(tmp_path: Path, site: Path, fmt: str) -> None:
    arc = make_archive(site / "downloads", fmt, [OK, M("big.bin", data=os.urandom(300_000))])
    assert_refused(tmp_path, arc, site / "out", "big.bin", "max_total_bytes=100000", max_total_bytes=100_000)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
@pytest.mark.parametrize("max_ratio", [10.0, 200.0])
def test_refuses_highly_compressible_zeros(tmp_path: Path, site: Path, fmt: str, max_ratio: float) -> None:
    arc = make_archive(site / "downloads", fmt, [OK, M("zeros.bin", data=bytes(8 << 20))])
    message = assert_refused(tmp_path, arc, site / "out", "zeros.bin", "decompression bomb", max_ratio=max_ratio)
    assert f"{max_ratio:g} x the archive size" in message
    # The same archive is fine when the caller allows the ratio.
    assert len(safe_extract(arc, site / "out", max_ratio=1e6)) == 2


def test_refuses_zip_whose_header_understates_the_size(tmp_path: Path, site: Path) -> None:
    """The sizes in both zip headers say 100 bytes; the deflated data is 8 MiB of zeros."""
    arc = make_zip(site / "downloads" / "liar.zip", [OK, M("zeros.bin", data=bytes(8 << 20))])
    data = arc.read_bytes()
    real = struct.pack("<I", 8 << 20)
    assert data.count(real) == 2  # local header and central directory
    arc.write_bytes(data.replace(real, struct.pack("<I", 100)))
    assert_refused(tmp_path, arc, site / "out", "zeros.bin", "CRC")


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_too_many_members(tmp_path: Path, site: Path, fmt: str) -> None:
    arc = make_archive(site / "downloads", fmt, [M(f"f{i}", data=b"x") for i in range(20)])
    assert_refused(tmp_path, arc, site / "out", "f10", "more than 10 members", max_members=10)


def test_refuses_oversized_header_payload(tmp_path: Path, site: Path) -> None:
    """A GNU long-name header that tarfile would read into memory is stopped by the stream budget."""
    arc = site / "downloads" / "longname.tar.gz"
    size = 8 << 20
    longname = tarfile.TarInfo("././@LongLink")
    longname.type, longname.size = tarfile.GNUTYPE_LONGNAME, size
    with gzip.open(arc, "wb", compresslevel=1) as gz:
        gz.write(longname.tobuf(format=tarfile.GNU_FORMAT))
        gz.write(b"a" * size)
        gz.write(_tarinfo(M("x")).tobuf(format=tarfile.GNU_FORMAT))
        gz.write(b"\0" * 1024)
    assert_refused(tmp_path, arc, site / "out", "<stream>", "decompressed stream exceeds", max_total_bytes=1 << 20)
