"""The ``index`` stage: FAISS indexes over segment embeddings and speaker centroids, plus
enrollment of new speakers without a rebuild. Entry point: ``stage.run``."""
