"""The ``embed`` stage: the batched embedding engine (length buckets, bf16 where native, staged
parts and resume) for segments and whole-file utterances. Entry point: ``stage.run``."""
