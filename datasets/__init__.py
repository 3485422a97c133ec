"""Data stages: each reads and writes explicit files (Parquet manifests plus image files)."""
