"""Parquet files written atomically (temporary name, then rename) with string metadata."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_table(table: pa.Table, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``table`` with ``metadata`` to ``path`` so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    pq.write_table(table.replace_schema_metadata(metadata), tmp)
    os.replace(tmp, path)
    return path


def read_table(path: str | Path) -> tuple[pa.Table, dict[str, str]]:
    """The table and its string metadata."""
    table = pq.read_table(path)
    return table, {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
