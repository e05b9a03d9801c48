"""The ``evaluate`` stage: verification (EER, minDCF, AS-norm) and identification metrics with
speaker-level bootstrap intervals, DET and score plots. Entry point: ``stage.run``."""
