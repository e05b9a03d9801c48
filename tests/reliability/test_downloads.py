"""download(): a real HTTP server on 127.0.0.1 misbehaving on purpose.

The server drops connections mid-file, answers 5xx before 200, stalls (before the headers and in
the middle of the body), ignores ``Range``, and serves corrupt bytes. The client must retry with
exponential backoff, resume with ``Range: bytes=N-`` from exactly the bytes it has, end with a file
equal to the source, and fail with a message naming the URL (and the expected and actual checksum).
Also here: the checksum helpers that decide "equal to the source".
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from voiceprint.common.checksums import md5_file, parse_checksum_file, parse_checksum_text, sha256_file
from voiceprint.prepare import download as download_mod
from voiceprint.prepare.download import MAX_BACKOFF_S, DownloadError, download, part_path

pytestmark = pytest.mark.timeout(60)

PAYLOAD = os.urandom(3 * 65536 + 1234)  # several chunks, not a multiple of the chunk size
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
FAST = {"retries": 3, "backoff_s": 0.01, "timeout_s": 2, "progress": False}


class Scripted:
    """What the server does for each successive request (``ok`` once the script runs out), and
    what it saw: request headers, arrival times, and the size of the client's ``.part`` file at
    the moment each request arrived (so a ``Range`` can be checked against the bytes on disk)."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.actions: list[str] = []
        self.requests: list[dict[str, str]] = []
        self.arrivals: list[float] = []
        self.part_sizes: list[int] = []
        self.watch: Path | None = None  # the client's part file
        self.release = threading.Event()  # lets stalled handlers finish at teardown
        self.stall_s = 5.0

    def ranges(self) -> list[str | None]:
        return [r.get("Range") for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: Scripted  # set on a per-server subclass

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        s = self.script
        s.arrivals.append(time.monotonic())
        s.part_sizes.append(s.watch.stat().st_size if s.watch is not None and s.watch.exists() else 0)
        s.requests.append(dict(self.headers.items()))
        action = s.actions.pop(0) if s.actions else "ok"
        if action in ("404", "500", "503"):
            self._simple(int(action))
            return
        if action == "stall-headers":
            s.release.wait(s.stall_s)
            self.close_connection = True
            return
        data = s.payload
        if action == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = self.headers.get("Range")
        if rng and action != "ignore-range":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if action in ("cut", "cut-after-chunk", "stall", "cut-before-body"):
            sent = {"cut-before-body": 0, "cut-after-chunk": download_mod.CHUNK_SIZE + 100}.get(action, len(body) // 2)
            self.wfile.write(body[:sent])
            self.wfile.flush()
            if action == "stall":
                s.release.wait(s.stall_s)
            self.close_connection = True
            return
        self.wfile.write(body)

    def _simple(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server() -> Iterator[tuple[str, Scripted]]:
    script = Scripted(PAYLOAD)
    handler = type("Handler", (_Handler,), {"script": script})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/file.tar.gz", script
    finally:
        script.release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def dest(tmp_path: Path, server: tuple[str, Scripted]) -> Path:
    """Where the file goes; the server watches its ``.part`` to check each ``Range`` against it."""
    path = tmp_path / "file.tar.gz"
    server[1].watch = part_path(path)
    return path


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays download() asks for, instead of sleeping them."""
    calls: list[float] = []
    monkeypatch.setattr(download_mod.time, "sleep", calls.append)
    return calls


def _offset(range_header: str) -> int:
    assert range_header.startswith("bytes=") and range_header.endswith("-"), range_header
    return int(range_header.removeprefix("bytes=").removesuffix("-"))


# -- complete files and resume -----------------------------------------------------------------------


def test_normal_download(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    assert download(url, dest, sha256=SHA, md5=MD5, **FAST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not part_path(dest).exists()
    assert script.ranges() == [None]
    assert script.requests[0].get("Accept-Encoding") == "identity"


def test_existing_verified_file_is_not_downloaded_again(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    dest.write_bytes(PAYLOAD)
    download(url, dest, sha256=SHA, **FAST)
    assert script.requests == []


def test_existing_corrupt_file_is_replaced(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    dest.write_bytes(b"stale")
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 1


def test_dropped_connection_resumes_from_the_bytes_on_disk(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    script.actions = ["cut"]
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    first, second = script.ranges()
    assert first is None
    # The retry asks for exactly the rest of what is on disk: a chunk cut mid-way is not
    # written, so the part holds at most the half the server sent, and more than nothing.
    offset = _offset(second)
    assert offset == script.part_sizes[1]
    assert 0 < offset <= len(PAYLOAD) // 2


def test_repeated_drops_each_resume_where_the_last_one_stopped(
    server: tuple[str, Scripted], dest: Path, sleeps: list[float]
) -> None:
    url, script = server
    # Each cut delivers a full read chunk and a bit: enough for the client to keep something.
    script.actions = ["cut-after-chunk"] * 3
    download(url, dest, md5=MD5, **{**FAST, "retries": 1, "backoff_s": 0.5})
    assert dest.read_bytes() == PAYLOAD
    offsets = [_offset(r) for r in script.ranges()[1:]]
    assert offsets == script.part_sizes[1:] and len(offsets) == 3
    assert offsets == sorted(set(offsets)) and offsets[0] > 0  # strictly forward, never from zero
    # Every cut made progress, so retries=1 never ran out and the backoff never grew.
    assert sleeps == [0.5, 0.5, 0.5]


def test_resume_from_part_left_by_an_earlier_run(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    part_path(dest).write_bytes(PAYLOAD[:1000])
    download(url, dest, md5=MD5, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert script.ranges() == ["bytes=1000-"]


def test_server_ignoring_range_restarts_from_zero(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    script.actions = ["ignore-range"]
    part_path(dest).write_bytes(b"x" * 1000)  # not a prefix: appending the 200 body would corrupt it
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert script.ranges() == ["bytes=1000-"]


def test_416_means_the_part_is_complete(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    part_path(dest).write_bytes(PAYLOAD)
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert script.ranges() == [f"bytes={len(PAYLOAD)}-"]


# -- retries and backoff -----------------------------------------------------------------------------


def test_500_then_200_retries_after_one_backoff(server: tuple[str, Scripted], dest: Path, sleeps: list[float]) -> None:
    url, script = server
    script.actions = ["500"]
    download(url, dest, sha256=SHA, **{**FAST, "backoff_s": 0.25})
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2 and script.ranges() == [None, None]  # a 500 writes nothing to resume
    assert sleeps == [0.25]


def test_backoff_delays_are_exponential_on_the_wire(server: tuple[str, Scripted], dest: Path) -> None:
    """Real sleeps: the gaps between the server's request arrivals are at least 0.1, 0.2, 0.4 s."""
    url, script = server
    script.actions = ["500", "503", "500"]
    download(url, dest, sha256=SHA, **{**FAST, "backoff_s": 0.1})
    assert dest.read_bytes() == PAYLOAD
    gaps = [b - a for a, b in zip(script.arrivals, script.arrivals[1:])]
    assert len(gaps) == 3
    for gap, delay in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert delay <= gap < delay + 2.0, gaps  # upper bound: generous for a loaded CI machine


def test_backoff_doubles_up_to_the_cap_then_gives_up_naming_the_url(tmp_path: Path, sleeps: list[float]) -> None:
    # Port 9 on localhost: nothing listens, so every attempt is refused at once.
    url = "http://127.0.0.1:9/x"
    with pytest.raises(DownloadError) as exc:
        download(url, tmp_path / "x", retries=8, backoff_s=1.0, timeout_s=1, progress=False)
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_BACKOFF_S, MAX_BACKOFF_S]
    message = str(exc.value)
    assert message.startswith(f"{url}: giving up after 9 consecutive failed attempts")
    assert "ConnectionError" in message


def test_gives_up_after_bounded_retries(server: tuple[str, Scripted], dest: Path, sleeps: list[float]) -> None:
    url, script = server
    script.actions = ["500"] * 10
    with pytest.raises(DownloadError, match="HTTP 500") as exc:
        download(url, dest, sha256=SHA, **{**FAST, "retries": 2, "backoff_s": 1.0})
    assert str(exc.value).startswith(f"{url}: giving up after 3 consecutive failed attempts")
    assert len(script.requests) == 3  # the first attempt and two retries
    assert sleeps == [1.0, 2.0]
    assert not dest.exists()


def test_connection_dropped_before_any_byte_is_not_progress(
    server: tuple[str, Scripted], dest: Path, sleeps: list[float]
) -> None:
    """Headers then a hang-up, forever: no bytes arrive, so the retries run out (no endless loop)."""
    url, script = server
    script.actions = ["cut-before-body"] * 10
    with pytest.raises(DownloadError, match=r"IncompleteRead\(0 bytes read") as exc:
        download(url, dest, **{**FAST, "retries": 2, "backoff_s": 1.0})
    assert url in str(exc.value)
    assert len(script.requests) == 3 and sleeps == [1.0, 2.0]
    assert not dest.exists()


def test_4xx_is_not_retried(server: tuple[str, Scripted], dest: Path, sleeps: list[float]) -> None:
    url, script = server
    script.actions = ["404"]
    with pytest.raises(DownloadError, match="404") as exc:
        download(url, dest, **FAST)
    assert url in str(exc.value)
    assert len(script.requests) == 1 and sleeps == []


def test_stalled_body_times_out_and_resumes(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    script.actions = ["stall"]
    started = time.monotonic()
    download(url, dest, sha256=SHA, **{**FAST, "timeout_s": 0.5})
    assert time.monotonic() - started < script.stall_s  # the read timeout fired, not the stall's end
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2
    assert _offset(script.ranges()[1]) == script.part_sizes[1] > 0


def test_stalled_headers_time_out_and_retry(server: tuple[str, Scripted], dest: Path) -> None:
    url, script = server
    script.actions = ["stall-headers"]
    started = time.monotonic()
    download(url, dest, sha256=SHA, **{**FAST, "timeout_s": 0.5})
    assert time.monotonic() - started < script.stall_s
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2


# -- checksums ---------------------------------------------------------------------------------------


def test_checksum_mismatch_names_url_expected_and_actual(server: tuple[str, Scripted], dest: Path) -> None:
    url, _ = server
    wrong = "0" * 64
    with pytest.raises(DownloadError) as exc:
        download(url, dest, sha256=wrong, **FAST)
    assert str(exc.value).startswith(f"{url}: sha256 checksum mismatch: expected {wrong}, got {SHA}")
    assert not dest.exists()
    assert not part_path(dest).exists()


def test_corrupt_bytes_from_the_server_are_refused_and_a_rerun_recovers(
    server: tuple[str, Scripted], dest: Path
) -> None:
    url, script = server
    script.actions = ["corrupt"]
    corrupt_sha = hashlib.sha256(bytes([PAYLOAD[0] ^ 0xFF]) + PAYLOAD[1:]).hexdigest()
    with pytest.raises(DownloadError, match=f"expected {SHA}, got {corrupt_sha}"):
        download(url, dest, sha256=SHA, **FAST)
    assert not dest.exists() and not part_path(dest).exists()  # nothing unverified is kept
    download(url, dest, sha256=SHA, **FAST)  # the deleted part means a clean start, not a resume
    assert dest.read_bytes() == PAYLOAD
    assert script.ranges() == [None, None]


def test_md5_mismatch_names_md5(server: tuple[str, Scripted], dest: Path) -> None:
    url, _ = server
    with pytest.raises(DownloadError, match=f"md5.*{'f' * 32}.*{MD5}"):
        download(url, dest, md5="f" * 32, **FAST)


def test_file_digests(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path) == SHA
    assert md5_file(path) == MD5


def test_parse_checksum_text() -> None:
    text = f"# comment\n{SHA}  ./test-other/1/1-2-3.flac\n\n{MD5} *bin/file\n\\{SHA}  dir/back\\\\slash\n"
    assert parse_checksum_text(text) == {
        "test-other/1/1-2-3.flac": SHA,
        "bin/file": MD5,
        "dir/back\\slash": SHA,
    }


def test_parse_checksum_text_rejects_garbage() -> None:
    with pytest.raises(ValueError, match=r"<checksums>:1"):
        parse_checksum_text("abc  file\n")
    with pytest.raises(ValueError, match="twice"):
        parse_checksum_text(f"{SHA}  a\n{'1' * 64}  ./a\n")


def test_parse_real_excerpts_manifest(excerpts_dir: Path) -> None:
    entries = parse_checksum_file(excerpts_dir / "MANIFEST.sha256")
    assert len(entries) == 351
    first = sorted(entries)[0]
    assert first.startswith("test-other/") and not first.startswith("./")
    assert sha256_file(excerpts_dir / first) == entries[first]
