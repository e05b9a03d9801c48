"""download(): a real HTTP server on 127.0.0.1 misbehaving on purpose (cuts, stalls, 5xx, no Range)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from voiceprint.datasets import download as download_mod
from voiceprint.datasets.checksums import md5_file, parse_checksum_text, sha256_file
from voiceprint.datasets.download import DownloadError, download, part_path

pytestmark = pytest.mark.timeout(60)

PAYLOAD = os.urandom(3 * 65536 + 1234)  # several chunks, not a multiple of the chunk size
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
FAST = {"retries": 3, "backoff_s": 0.01, "timeout_s": 2, "progress": False}


class Scripted:
    """What the server does for each successive request; ``ok`` once the script runs out."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.actions: list[str] = []
        self.requests: list[dict[str, str]] = []
        self.release = threading.Event()  # lets stalled handlers finish at teardown
        self.stall_s = 5.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: Scripted  # set on a per-server subclass

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        s = self.script
        s.requests.append({k: v for k, v in self.headers.items()})
        action = s.actions.pop(0) if s.actions else "ok"
        data = s.payload
        if action == "404":
            self._simple(404)
            return
        if action == "500":
            self._simple(500)
            return
        if action == "stall-headers":
            s.release.wait(s.stall_s)
            self.close_connection = True
            return
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
        if action in ("cut", "stall"):
            half = len(body) // 2
            self.wfile.write(body[:half])
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


def test_normal_download(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    dest = tmp_path / "file.tar.gz"
    assert download(url, dest, sha256=SHA, md5=MD5, **FAST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not part_path(dest).exists()
    assert len(script.requests) == 1
    assert "Range" not in script.requests[0]
    assert script.requests[0].get("Accept-Encoding") == "identity"


def test_existing_verified_file_is_not_downloaded_again(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    dest = tmp_path / "file.tar.gz"
    dest.write_bytes(PAYLOAD)
    download(url, dest, sha256=SHA, **FAST)
    assert script.requests == []


def test_existing_corrupt_file_is_replaced(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    dest = tmp_path / "file.tar.gz"
    dest.write_bytes(b"stale")
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 1


def test_resume_after_interrupted_transfer(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    script.actions = ["cut"]
    dest = tmp_path / "file.tar.gz"
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2
    assert "Range" not in script.requests[0]
    # The second request asks for the rest, from wherever the first one's bytes ended up on disk
    # (at most the half the server sent; a chunk cut mid-way is read again).
    offset = int(script.requests[1]["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= len(PAYLOAD) // 2


def test_resume_from_part_left_by_an_earlier_run(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    dest = tmp_path / "file.tar.gz"
    part_path(dest).write_bytes(PAYLOAD[:1000])
    download(url, dest, md5=MD5, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [r.get("Range") for r in script.requests] == ["bytes=1000-"]


def test_server_ignoring_range_restarts_from_zero(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    script.actions = ["ignore-range"]
    dest = tmp_path / "file.tar.gz"
    part_path(dest).write_bytes(PAYLOAD[:1000])
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert script.requests[0]["Range"] == "bytes=1000-"


def test_416_means_the_part_is_complete(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    dest = tmp_path / "file.tar.gz"
    part_path(dest).write_bytes(PAYLOAD)
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 1 and script.requests[0]["Range"] == f"bytes={len(PAYLOAD)}-"


def test_retries_5xx(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    script.actions = ["500"]
    dest = tmp_path / "file.tar.gz"
    download(url, dest, sha256=SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2


def test_gives_up_after_bounded_retries(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    script.actions = ["500"] * 10
    dest = tmp_path / "file.tar.gz"
    with pytest.raises(DownloadError, match="HTTP 500") as exc:
        download(url, dest, sha256=SHA, **{**FAST, "retries": 2})
    assert url in str(exc.value)
    assert len(script.requests) == 3  # the first attempt and two retries
    assert not dest.exists()


def test_4xx_is_not_retried(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    script.actions = ["404"]
    with pytest.raises(DownloadError, match="404"):
        download(url, tmp_path / "file.tar.gz", **FAST)
    assert len(script.requests) == 1


def test_stalled_body_times_out_and_resumes(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    script.actions = ["stall"]
    dest = tmp_path / "file.tar.gz"
    download(url, dest, sha256=SHA, **{**FAST, "timeout_s": 0.5})
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2
    assert script.requests[1]["Range"].startswith("bytes=")


def test_stalled_headers_time_out_and_retry(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, script = server
    script.actions = ["stall-headers"]
    dest = tmp_path / "file.tar.gz"
    download(url, dest, sha256=SHA, **{**FAST, "timeout_s": 0.5})
    assert dest.read_bytes() == PAYLOAD
    assert len(script.requests) == 2


def test_checksum_mismatch(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "file.tar.gz"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as exc:
        download(url, dest, sha256=wrong, **FAST)
    message = str(exc.value)
    assert url in message and wrong in message and SHA in message
    assert not dest.exists()
    assert not part_path(dest).exists()


def test_md5_mismatch_names_md5(server: tuple[str, Scripted], tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(DownloadError, match=f"md5.*{'f' * 32}.*{MD5}"):
        download(url, tmp_path / "file.tar.gz", md5="f" * 32, **FAST)


def test_connection_refused_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(download_mod.time, "sleep", sleeps.append)
    # Port 9 on localhost: nothing listens, so every attempt is refused at once.
    with pytest.raises(DownloadError, match="consecutive failed attempts"):
        download("http://127.0.0.1:9/x", tmp_path / "x", retries=3, backoff_s=1.0, timeout_s=1, progress=False)
    assert sleeps == [1.0, 2.0, 4.0]  # exponential backoff between the four attempts


# -- checksums ---------------------------------------------------------------------------------------


def test_file_digests(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path) == SHA
    assert md5_file(path) == MD5


def test_parse_checksum_text() -> None:
    text = (
        f"# comment\n{SHA}  ./test-other/1/1-2-3.flac\n\n{MD5} *bin/file\n"
        f"\\{SHA}  dir/back\\\\slash\n"
    )
    assert parse_checksum_text(text) == {
        "test-other/1/1-2-3.flac": SHA,
        "bin/file": MD5,
        "dir/back\\slash": SHA,
    }


def test_parse_checksum_text_rejects_garbage() -> None:
    with pytest.raises(ValueError, match=r"<checksums>:1"):
        parse_checksum_text("abc  file\n")
    with pytest.raises(ValueError, match="twice"):
        parse_checksum_text(f"{SHA}  a\n{MD5[:0]}{'1' * 64}  ./a\n")


def test_parse_real_excerpts_manifest(excerpts_dir: Path) -> None:
    from voiceprint.datasets.checksums import parse_checksum_file

    entries = parse_checksum_file(excerpts_dir / "MANIFEST.sha256")
    assert len(entries) == 351
    first = sorted(entries)[0]
    assert first.startswith("test-other/") and not first.startswith("./")
    assert sha256_file(excerpts_dir / first) == entries[first]
