"""``python -m tasks.run STAGE [ROOT]``: the command each ``dvc.yaml`` stage executes."""

from __future__ import annotations

import json
import logging
import sys

from voiceprint.config import ConfigError
from tasks.stages import STAGES, run_stage


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m tasks.run {{{','.join(STAGES)}}} [PROJECT_ROOT]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader narrates every SIMD probe at INFO
    try:
        summary = run_stage(argv[0], argv[1] if len(argv) > 1 else ".")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"stage": argv[0], **summary}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
