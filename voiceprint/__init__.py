"""voiceprint: speaker-recognition data pipeline."""

__version__ = "0.1.0"

import os as _os

# oneDNN caches one compiled primitive per convolution shape (1024 by default). Variable-length
# segments make nearly every batch a new shape, so the cache grew with the dataset: embed's peak
# RSS rose 1.37x from 1x to 16x data. 16 entries keep it within 1.2x and were faster, not slower
# (benchmarks/bench_pipeline.py). Read by oneDNN when it first builds a primitive; a user's own
# setting wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
