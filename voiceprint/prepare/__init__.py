"""The ``prepare`` stage: acquire a dataset (local mirror, OpenSLR download or a folder), verify
every file and write the manifest and the rejects table. Entry point: ``stage.run``."""
