"""The subjects file (``subjects.parquet``): the filter's output, one subject per image, the build's input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from blipdiff.infra.atomic import atomic_path

SUBJECT_COLUMNS = ("image_id", "label_mid", "label_name", "x_min", "x_max", "y_min", "y_max", "area", "aspect")
SUBJECTS_SCHEMA = pa.schema([(name, pa.string()) for name in SUBJECT_COLUMNS[:3]]
                            + [(name, pa.float64()) for name in SUBJECT_COLUMNS[3:]])


def write_subjects(subjects: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as temp:
        pq.write_table(pa.Table.from_pandas(subjects, schema=SUBJECTS_SCHEMA, preserve_index=False), temp)


def read_subjects(path: Path) -> pd.DataFrame:
    """Read a ``subjects.parquet``, checking that it has the filter's columns."""
    table = pq.read_table(path)
    if tuple(table.column_names) != SUBJECT_COLUMNS:
        raise ValueError(f"{path} is not a subjects file: columns {table.column_names}")
    return table.cast(SUBJECTS_SCHEMA).to_pandas()
