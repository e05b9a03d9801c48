"""safe_extract(): hostile archives are refused before anything is written; good ones land atomically."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from voiceprint.datasets import archive as archive_mod
from voiceprint.datasets.archive import MARKER_NAME, ArchiveError, read_marker, safe_extract

pytestmark = pytest.mark.timeout(60)


def _info(name: str, *, type_: bytes = tarfile.REGTYPE, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = size
    ti.linkname = linkname
    ti.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    return ti


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """Write ``members`` verbatim (addfile keeps hostile names such as '/abs' or '../x' as they are)."""
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def good_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        (_info("pkg", type_=tarfile.DIRTYPE), b""),
        (_info("pkg/a.txt"), b"alpha\n"),
        (_info("pkg/sub", type_=tarfile.DIRTYPE), b""),
        (_info("pkg/sub/b.bin"), os.urandom(5000)),
        (_info("pkg/link-to-a", type_=tarfile.SYMTYPE, linkname="a.txt"), b""),
        (_info("pkg/sub/hard-b", type_=tarfile.LNKTYPE, linkname="pkg/sub/b.bin"), b""),
    ]


def assert_nothing_written(tmp_path: Path, archive: Path, target: Path) -> None:
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


# -- good archives -----------------------------------------------------------------------------------


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
    safe_extract(make_tar(tmp_path / "two.tar", [(_info("only.txt"), b"2")]), target)
    assert sorted(p.name for p in target.iterdir()) == sorted([MARKER_NAME, "only.txt"])


def test_extracts_zip(tmp_path: Path) -> None:
    arc = tmp_path / "good.zip"
    with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dir/", "")
        zf.writestr("dir/a.txt", "alpha")
        zf.writestr("dir/deeper/b.txt", "beta")
        link = zipfile.ZipInfo("dir/link")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "a.txt")
    target = tmp_path / "out"
    files = safe_extract(arc, target)
    assert sorted(p.relative_to(target).as_posix() for p in files) == ["dir/a.txt", "dir/deeper/b.txt", "dir/link"]
    assert (target / "dir/link").is_symlink() and (target / "dir/link").read_text() == "alpha"


def test_crash_mid_extraction_leaves_no_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arc = make_tar(tmp_path / "good.tar.gz", good_members())
    target = tmp_path / "out"
    real_extract = tarfile.TarFile.extract
    calls = {"n": 0}

    def flaky(self: tarfile.TarFile, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a Ctrl-C halfway through looks like
        real_extract(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile.TarFile, "extract", flaky)
    with pytest.raises(KeyboardInterrupt):
        safe_extract(arc, target)
    assert_nothing_written(tmp_path, arc, target)


def test_refuses_to_clobber_foreign_directory(tmp_path: Path) -> None:
    arc = make_tar(tmp_path / "good.tar", good_members())
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(ArchiveError, match="not empty"):
        safe_extract(arc, target)
    assert [p.name for p in target.iterdir()] == ["precious.txt"]


def test_not_an_archive(tmp_path: Path) -> None:
    arc = tmp_path / "junk.tar.gz"
    arc.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(ArchiveError, match="not a tar"):
        safe_extract(arc, tmp_path / "out")


# -- hostile tar members -----------------------------------------------------------------------------


HOSTILE_TAR = {
    "dotdot": ([(_info("ok.txt"), b"fine"), (_info("../evil"), b"pwned")], "../evil", "escapes"),
    "nested-dotdot": ([(_info("a/../../evil"), b"pwned")], "a/../../evil", "escapes"),
    "absolute": ([(_info("/tmp/voiceprint-evil"), b"pwned")], "/tmp/voiceprint-evil", "absolute"),
    "symlink-etc": ([(_info("etc", type_=tarfile.SYMTYPE, linkname="/etc"), b"")], "etc", "absolute"),
    "symlink-up": ([(_info("a/up", type_=tarfile.SYMTYPE, linkname="../../outside"), b"")], "a/up", "outside"),
    "through-symlink": (
        [(_info("d", type_=tarfile.SYMTYPE, linkname="."), b""), (_info("d/x.txt"), b"x")],
        "d/x.txt",
        "through the symlink",
    ),
    "hardlink-passwd": (
        [(_info("passwd", type_=tarfile.LNKTYPE, linkname="/etc/passwd"), b"")],
        "passwd",
        "absolute",
    ),
    "hardlink-unknown": (
        [(_info("h", type_=tarfile.LNKTYPE, linkname="not-in-archive"), b"")],
        "h",
        "not an earlier regular file",
    ),
    "chardev": ([(_info("null", type_=tarfile.CHRTYPE), b"")], "null", "device"),
    "blockdev": ([(_info("sda", type_=tarfile.BLKTYPE), b"")], "sda", "device"),
    "fifo": ([(_info("pipe", type_=tarfile.FIFOTYPE), b"")], "pipe", "FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TAR))
def test_refuses_hostile_tar_member(tmp_path: Path, case: str) -> None:
    members, bad_member, reason = HOSTILE_TAR[case]
    arc = make_tar(tmp_path / "evil.tar.gz", members)
    target = tmp_path / "out"
    with pytest.raises(ArchiveError) as exc:
        safe_extract(arc, target)
    message = str(exc.value)
    assert str(arc) in message and repr(bad_member) in message and reason in message
    assert_nothing_written(tmp_path, arc, target)
    assert not Path("/tmp/voiceprint-evil").exists()


def test_refuses_member_declaring_huge_size(tmp_path: Path) -> None:
    # Only the header is written: a bomb announces its size long before it delivers the bytes.
    arc = tmp_path / "bomb.tar.gz"
    with gzip.open(arc, "wb") as gz:
        gz.write(_info("huge.bin", size=2**40).tobuf(format=tarfile.GNU_FORMAT))
        gz.write(b"\0" * 4096)
    target = tmp_path / "out"
    with pytest.raises(ArchiveError, match=r"'huge.bin'.*max_total_bytes"):
        safe_extract(arc, target)
    assert_nothing_written(tmp_path, arc, target)


@pytest.mark.parametrize("max_ratio", [10.0, 200.0])
def test_refuses_highly_compressible_zeros(tmp_path: Path, max_ratio: float) -> None:
    arc = make_tar(tmp_path / "zeros.tar.gz", [(_info("zeros.bin"), bytes(4 << 20))])
    target = tmp_path / "out"
    with pytest.raises(ArchiveError, match=r"'zeros.bin'.*decompression bomb"):
        safe_extract(arc, target, max_ratio=max_ratio)
    assert_nothing_written(tmp_path, arc, target)
    # The same archive is fine when the caller allows the ratio.
    assert len(safe_extract(arc, target, max_ratio=1e6)) == 1


def test_refuses_too_many_members(tmp_path: Path) -> None:
    arc = make_tar(tmp_path / "many.tar", [(_info(f"f{i}"), b"x") for i in range(20)])
    with pytest.raises(ArchiveError, match="more than 10 members"):
        safe_extract(arc, tmp_path / "out", max_members=10)


def test_refuses_oversized_header_payload(tmp_path: Path) -> None:
    """A GNU long-name header that tarfile would read into memory is stopped by the stream budget."""
    arc = tmp_path / "longname.tar.gz"
    size = 8 << 20
    with gzip.open(arc, "wb", compresslevel=1) as gz:
        gz.write(_info("././@LongLink", type_=tarfile.GNUTYPE_LONGNAME, size=size).tobuf(format=tarfile.GNU_FORMAT))
        gz.write(b"a" * size)
        gz.write(_info("x").tobuf(format=tarfile.GNU_FORMAT))
        gz.write(b"\0" * 1024)
    target = tmp_path / "out"
    with pytest.raises(ArchiveError, match="decompressed stream exceeds"):
        safe_extract(arc, target, max_total_bytes=1 << 20)
    assert_nothing_written(tmp_path, arc, target)


# -- hostile zip members -----------------------------------------------------------------------------


def _zip_with(path: Path, name: str, data: bytes = b"x", *, mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.txt", "fine")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize(
    ("name", "data", "mode", "reason"),
    [
        ("../evil", b"x", None, "escapes"),
        ("/abs/evil", b"x", None, "absolute"),
        ("..\\evil", b"x", None, "backslash"),
        ("etc", b"/etc", stat.S_IFLNK | 0o777, "absolute"),
        ("up", b"../outside", stat.S_IFLNK | 0o777, "outside"),
        ("pipe", b"", stat.S_IFIFO | 0o644, "special file"),
    ],
)
def test_refuses_hostile_zip_member(tmp_path: Path, name: str, data: bytes, mode: int | None, reason: str) -> None:
    arc = _zip_with(tmp_path / "evil.zip", name, data, mode=mode)
    target = tmp_path / "out"
    with pytest.raises(ArchiveError) as exc:
        safe_extract(arc, target)
    assert repr(name) in str(exc.value) and reason in str(exc.value) and str(arc) in str(exc.value)
    assert_nothing_written(tmp_path, arc, target)


def test_refuses_zip_bomb(tmp_path: Path) -> None:
    arc = tmp_path / "bomb.zip"
    with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(8 << 20))
    target = tmp_path / "out"
    with pytest.raises(ArchiveError, match=r"'zeros.bin'.*decompression bomb"):
        safe_extract(arc, target)
    assert_nothing_written(tmp_path, arc, target)
