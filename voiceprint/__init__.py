"""voiceprint: speaker-recognition data pipeline."""

__version__ = "0.1.0"
