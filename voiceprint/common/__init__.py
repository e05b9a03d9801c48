"""Shared layer of every stage: atomic writes, audio decoding, checksums, the project layout,
staged Parquet parts, Parquet schemas, numeric precision and memory release."""
