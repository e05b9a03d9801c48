"""The ``compare-encoder@NAME`` and ``compare`` stages: every configured encoder on the same
audio, cluster metrics, plots and one comparison table. Entry points: ``stage.run_encoder``, ``stage.run``."""
