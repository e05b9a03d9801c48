"""Helpers shared by the ``benchmarks/bench_*.py`` scripts.

Every benchmark prints one JSON object per line (``emit``) so ``make bench`` can collect them with
``--out FILE``; every record carries the ``hardware()`` it was measured on. Nothing here imports a
heavy library at module level: a benchmark that never touches faiss or torch does not pay for them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "emit",
    "hardware",
    "mem_available_mb",
    "peak_rss_mb",
    "percentiles",
    "reset_peak_rss",
    "rss_mb",
]

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Memory (Linux /proc; psutil as a fallback elsewhere)
# --------------------------------------------------------------------------------------------


def _proc_kb(path: str, key: str) -> float | None:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])  # "VmRSS:   12345 kB"
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    kb = _proc_kb("/proc/self/status", "VmRSS")
    if kb is not None:
        return kb / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - neither /proc nor psutil
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (or since :func:`reset_peak_rss`), MiB."""
    kb = _proc_kb("/proc/self/status", "VmHWM")
    if kb is not None:
        return kb / 1024
    import resource  # ru_maxrss is KiB on Linux, bytes on macOS

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Restart the peak-RSS high-water mark at the current RSS (Linux >= 4.0); False if unsupported.

    Lets a benchmark attribute a peak to one phase (``peak_rss_mb() - rss_before``) instead of to
    whatever earlier phase of the process was largest.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mem_available_mb() -> float | None:
    """Memory the kernel could give us without swapping (``MemAvailable``), MiB; None if unknown."""
    kb = _proc_kb("/proc/meminfo", "MemAvailable")
    if kb is not None:
        return kb / 1024
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:  # pragma: no cover
        return None


# --------------------------------------------------------------------------------------------
# Timing statistics
# --------------------------------------------------------------------------------------------


def percentiles(samples_s: Iterable[float], qs: tuple[float, ...] = (50, 99)) -> dict[str, float]:
    """Latency percentiles in milliseconds from samples in seconds: ``{"p50_ms": .., "p99_ms": ..}``.

    Linear interpolation between order statistics (numpy's default), rounded to microseconds;
    NaN for no samples. With fewer than 100 samples p99 is close to the maximum: report the count.
    """
    xs = sorted(float(s) for s in samples_s)
    out: dict[str, float] = {}
    for q in qs:
        key = f"p{q:g}_ms"
        if not xs:
            out[key] = float("nan")
            continue
        pos = (len(xs) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        value = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
        out[key] = round(value * 1e3, 4)
    return out


# --------------------------------------------------------------------------------------------
# Hardware description
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    """Name of the first GPU, asked of torch (if already imported), faiss (if importable) or nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return str(torch.cuda.get_device_name(0))
        except Exception:
            pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            if out:
                return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import faiss

        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            return f"{faiss.get_num_gpus()} GPU(s) visible to faiss"
    except Exception:
        pass
    return None


@lru_cache(maxsize=1)
def _hardware() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    total_kb = _proc_kb("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "mem_total_gb": round(total_kb / 2**20, 1) if total_kb else None,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    for name in ("numpy", "faiss", "torch"):
        mod = sys.modules.get(name)
        if mod is not None:
            info[name] = getattr(mod, "__version__", "?")
    info["gpu"] = _gpu_name()
    return info


def hardware(**extra: Any) -> dict[str, Any]:
    """Where a number was measured: CPU model and count, memory, library versions, GPU (or None).

    Library versions are reported for the libraries the benchmark has imported (numpy, faiss,
    torch). ``loadavg_1m`` is read at each call: a load above the CPU count means other processes
    competed for the cores while the record was measured. ``extra`` adds fields such as the thread
    count the benchmark ran with.
    """
    try:
        load: float | None = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        load = None
    return {**_hardware(), "loadavg_1m": load, **extra}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null reads as "not measured"
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def emit(record: dict[str, Any], out: Path | str | None = None) -> None:
    """Print ``record`` as one JSON line on stdout (flushed) and append it to ``out`` if given."""
    line = json.dumps(_jsonable(record), separators=(",", ":"), allow_nan=False)
    print(line, flush=True)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(line + "\n")
