"""The ``segment`` stage: voice activity detection (Silero, or energy on request) over every
manifest file, written as speech segments. Entry point: ``stage.run``."""
