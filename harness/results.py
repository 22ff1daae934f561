"""Parquet results: schemas (results/README.md documents every column), atomic writes.

Every experiment folder holds rounds.parquet, clients.parquet, summary.parquet and config.yaml, in a
local folder or under a URI (harness/storage.py). The harness's columns (harness/columns.py) are the same for every
method; methods add their own columns (Strategy.client_columns, round_columns), and every file holds
those of all registered methods (null where a method has none), so a folder of experiments is one
dataset: `pd.read_parquet(list_of_files)`, `pl.read_parquet("DIR/*/rounds.parquet")` or DuckDB's
`read_parquet('DIR/*/rounds.parquet')`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from harness import storage
from harness.columns import ClientRow, RoundRow, SummaryRow, schema

ROUNDS = schema(RoundRow)
CLIENTS = schema(ClientRow)
SUMMARY = schema(SummaryRow)


def with_columns(schema: pa.Schema, extra: dict[str, pa.DataType]) -> pa.Schema:
    """`schema` followed by a method's own columns."""
    for name in extra:
        if name in schema.names:
            raise ValueError(f"a method's column {name!r} is a column of the harness")
    return pa.schema(list(schema) + [pa.field(n, t) for n, t in extra.items()])


def write_table(path: str | Path | storage.Location, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """Rows as one Parquet file, written whole (storage.Location.write_bytes)."""
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    table = pa.Table.from_pydict(columns, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.resolve(path).write_bytes(buf.getvalue())


def write_yaml(path: str | Path | storage.Location, data: dict[str, Any]) -> None:
    storage.resolve(path).write_bytes(yaml.safe_dump(data, sort_keys=False).encode())


def load(root: str | Path | storage.Location, table: str = "rounds") -> pd.DataFrame:
    """All experiments' `table` ('rounds', 'clients' or 'summary') under `root`, as one frame."""
    files = storage.resolve(root).find(f"{table}.parquet")
    if not files:
        raise FileNotFoundError(f"no {table}.parquet under {root}")
    return pd.concat([storage.read_parquet(f) for f in files], ignore_index=True)
