"""Running ``segment`` and ``embed`` on a Dask cluster (``compute.engine: dask``).

The stage packages own their shard tasks; this package holds what they share: opening a client
(:mod:`.cluster`), cutting work units into shards by audio seconds (:mod:`.shards`), submitting
and collecting them with resume and a progress bar (:mod:`.runner`), and the per-worker-process
caches and torch threads (:mod:`.worker`). ``distributed`` is imported only when a client is
opened, so ``engine: local`` never needs it. Guide: docs/compute.md.
"""
