"""``python -m tasks.run STAGE [ITEM]``: the command each ``dvc.yaml`` stage executes (in the project root)."""

from __future__ import annotations

import json
import logging
import sys

from voiceprint.config import ConfigError
from voiceprint.stages import ITEM_STAGES, STAGES, ProjectBusyError, run_stage


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        print(f"usage: python -m tasks.run {{{','.join(STAGES)}}} [ITEM]", file=sys.stderr)
        return 2
    item = argv[1] if argv[0] in ITEM_STAGES and len(argv) > 1 else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader narrates every SIMD probe at INFO
    try:
        summary = run_stage(argv[0], ".", item=item)
    except (ConfigError, ProjectBusyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"stage": argv[0], **({"item": item} if item else {}), **summary}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
