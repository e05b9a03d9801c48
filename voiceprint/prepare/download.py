"""Resumable, verified HTTP downloads.

:func:`download` streams into ``<dest>.part``, resumes with ``Range`` requests, retries transient
failures with exponential backoff, and renames the part into place only once its checksum matches.
Design: docs/reliability.md#downloads.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import requests
from tqdm import tqdm

from voiceprint.common.checksums import file_digests

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 16
MAX_BACKOFF_S = 60.0
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(?P<start>\d+)-(?P<end>\d+)|\*)/(?P<total>\d+|\*)")


class DownloadError(RuntimeError):
    """A download that failed for good; the message names the URL and the reason."""


class _Retryable(Exception):
    """An attempt that failed in a way another attempt may not (5xx, short body)."""


def part_path(dest: Path) -> Path:
    """Where the in-progress bytes of ``dest`` live (``x.tar.gz`` -> ``x.tar.gz.part``)."""
    return dest.with_suffix(dest.suffix + ".part")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 30,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` into ``dest`` and return ``dest``.

    ``retries`` bounds consecutive failed attempts; an attempt that received bytes resets the count
    (and the backoff), because a flaky link that keeps making progress should finish a large file
    rather than give up after five hiccups. ``timeout_s`` bounds connecting and each wait for data,
    which is what turns a stalled server into a retry instead of a hang.
    """
    dest = Path(dest)
    expected = {name: value.lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    if dest.exists():
        if not expected:
            return dest
        actual = file_digests(dest, expected)
        if actual == expected:
            return dest
        log.warning("%s exists but does not match its checksum; downloading it again", dest)
        dest.unlink()

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    failures = 0
    with requests.Session() as session:
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _attempt(session, url, part, timeout_s=timeout_s, progress=progress, desc=dest.name)
                break
            except (
                _Retryable,
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as err:
                after = part.stat().st_size if part.exists() else 0
                failures = 0 if after > before else failures + 1
                if failures > retries:
                    raise DownloadError(
                        f"{url}: giving up after {failures} consecutive failed attempts: {_describe(err)}"
                    ) from err
                delay = min(MAX_BACKOFF_S, backoff_s * 2 ** max(failures - 1, 0))
                log.warning(
                    "%s: %s; retrying in %.2f s (%d consecutive failures, %d allowed)",
                    url,
                    _describe(err),
                    delay,
                    failures,
                    retries,
                )
                time.sleep(delay)

    if expected:
        actual = file_digests(part, expected)
        for name, want in expected.items():
            if actual[name] != want:
                part.unlink(missing_ok=True)
                raise DownloadError(
                    f"{url}: {name} checksum mismatch: expected {want}, got {actual[name]} "
                    f"(the partial file was deleted; a rerun downloads it again)"
                )
    with open(part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, dest)
    return dest


def _attempt(session: requests.Session, url: str, part: Path, *, timeout_s: float, progress: bool, desc: str) -> None:
    """One request: append to ``part`` from where it ends; raise on anything short of complete."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: requests would otherwise transparently gunzip a Content-Encoding: gzip body, and
    # both the saved bytes and the Range offsets must be those of the file as published.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s)) as resp:
        status = resp.status_code
        if status == 416 and offset:
            total = _content_range(resp.headers.get("Content-Range"))[2]
            if total is None or total == offset:
                return  # the part already holds every byte; the checksum decides whether they are right
            part.unlink()  # the part is longer than the file: it cannot be a prefix of it
            raise _Retryable(f"partial file ({offset} bytes) is longer than the remote file ({total} bytes)")
        if status >= 500:
            raise _Retryable(f"HTTP {status} {resp.reason}")
        if status >= 400:
            raise DownloadError(f"{url}: HTTP {status} {resp.reason}")
        if status == 206:
            start, _, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start} instead of {offset}; starting over")
            mode = "ab"
        elif status == 200:
            if offset:
                log.info("%s: server ignored the Range request; restarting from zero", url)
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status} {resp.reason}")

        written = offset
        with (
            open(part, mode) as fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=None if progress else True,
                leave=False,
            ) as bar,
        ):
            for chunk in resp.iter_content(chunk_size=CHUNK_SIZE):
                fh.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        if total is not None and written < total:
            raise _Retryable(f"connection closed after {written} of {total} bytes")


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes 10-99/100`` -> (10, 99, 100); ``bytes */100`` -> (None, None, 100)."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not m:
        return None, None, None

    def num(key: str) -> int | None:
        v = m[key]
        return int(v) if v and v != "*" else None

    return num("start"), num("end"), num("total")


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
