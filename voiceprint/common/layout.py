"""Where each stage reads and writes, relative to a project root.

One place defines the data layout so that DVC's ``dvc.yaml``, the Prefect flows, the CLI and the
tests agree on paths. ``voiceprint evaluate --dataset folder:PATH`` uses a layout rooted in a
scratch directory, which is how it avoids touching the DVC-tracked outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> Layout:
        return cls(Path(root).resolve())

    def resolve(self, path: str | Path) -> Path:
        """A path from a table (or params.yaml) as an absolute path.

        Tables store paths relative to the root where the file lies inside the project, and files
        of a corpus outside it by the base written in params.yaml (``../shared/datasets/...``,
        ``~/corpora/...``), so the same text names the same file from any checkout. The root is a
        resolved path, so leading ``..`` parts are taken off it.
        """
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        base, parts = self.root, list(p.parts)
        while parts and parts[0] == "..":
            base, parts = base.parent, parts[1:]
        return base.joinpath(*parts)

    def relative(self, path: str | Path) -> Path:
        """``path`` relative to the root where it lies inside it, else its absolute form."""
        absolute = Path(path).resolve()
        try:
            return absolute.relative_to(self.root)
        except ValueError:
            return absolute

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def downloads(self) -> Path:
        """Partial and complete archives and their extracted trees, read in place by ``prepare``;
        no DVC output, so resume survives a rerun."""
        return self.data / "downloads"

    @property
    def file_cache(self) -> Path:
        """``prepare``'s per-file digests and decode results (size and mtime keyed); no DVC output."""
        return self.data / "cache" / "prepare-files.parquet"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.parquet"

    @property
    def segments(self) -> Path:
        return self.data / "segments.parquet"

    def rejects(self, stage: str) -> Path:
        """One rejects table per stage (DVC outputs cannot be shared); DuckDB unions them."""
        return self.data / "rejects" / f"{stage}.parquet"

    def reject_tables(self) -> list[Path]:
        """Every rejects table the stages write (those that exist): the union is "the" rejects table."""
        files = sorted((self.data / "rejects").glob("*.parquet")) + [self.embeddings / "rejects.parquet"]
        return [f for f in files if f.exists()]

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / "ecapa"

    @property
    def embeddings(self) -> Path:
        return self.data / "embeddings"

    @property
    def segment_embeddings(self) -> Path:
        return self.embeddings / "segments.parquet"

    @property
    def utterance_embeddings(self) -> Path:
        return self.embeddings / "utterances.parquet"

    @property
    def index_dir(self) -> Path:
        return self.data / "index"

    @property
    def enrollments(self) -> Path:
        """Speakers added with ``voiceprint enroll``; outside the DVC outputs so reruns keep them."""
        return self.root / "enrollments"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def embed_stats(self) -> Path:
        """The embed stage's timing (DVC metrics): kept out of ``data/embeddings`` so that a rerun
        writing the same vectors leaves that output, and everything downstream, unchanged."""
        return self.data / "embed_stats.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"
