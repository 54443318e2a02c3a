"""Row-index files a user gives: which dataset rows their model was trained on (and, optionally, which to audit
as non-members).

A file holds integer row indices into the configured dataset, one per sample: ``.npy`` (a 1-D integer array),
``.parquet`` (one integer column, or a column named ``index``) or ``.csv`` (one integer per line, an optional
header). Anything else — floats, negative or out-of-range indices, duplicates — is a :class:`UserError` naming the
field and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymia.errors import UserError

SUFFIXES = (".npy", ".parquet", ".csv")


def _read(path: Path, field: str) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            name = "index" if "index" in table.column_names else (table.column_names[0] if table.num_columns == 1
                                                                 else None)
            if name is None:
                raise UserError(f"{path} has columns {table.column_names}; give one integer column or one named "
                                "'index'", field=field)
            return table.column(name).to_numpy(zero_copy_only=False)
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if lines and not lines[0].lstrip("-").isdigit():
            lines = lines[1:]  # a header
        return np.asarray([int(ln.split(",")[0]) for ln in lines], dtype=np.int64)
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read row indices from {path} ({exc}); write a 1-D integer array "
                        "(numpy.save), a one-column Parquet file or one integer per line", field=field) from None


def read_rows(path: Path, n: int, *, field: str) -> np.ndarray:
    """Sorted int64 row indices from ``path``, each in ``[0, n)`` and given once."""
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{path}: expected a {', '.join(SUFFIXES)} file of row indices", field=field)
    if not path.is_file():
        raise UserError(f"file not found: {path}", field=field)
    rows = np.asarray(_read(path, field))
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise UserError(f"{path} holds a {rows.dtype} array of shape {list(rows.shape)}; expected a 1-D array of "
                        "integer row indices", field=field)
    if len(rows) == 0:
        raise UserError(f"{path} holds no row indices", field=field)
    bad = rows[(rows < 0) | (rows >= n)]
    if len(bad):
        raise UserError(f"{len(bad)} indices in {path} are outside the dataset's rows 0-{n - 1}, e.g. {int(bad[0])}; "
                        "indices refer to rows of the configured dataset (data:), in its order", field=field)
    uniq, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"{int((counts > 1).sum())} indices in {path} appear more than once, e.g. "
                        f"{int(uniq[counts > 1][0])}; list each training sample once", field=field)
    return uniq.astype(np.int64)
