"""Parquet results: schemas (results/README.md documents every column), atomic writes.

Every experiment folder holds rounds.parquet, clients.parquet, summary.parquet and config.yaml. The
harness's columns below are the same for every method; methods add their own columns
(Strategy.client_columns, round_columns), and every file holds those of all registered methods
(null where a method has none), so a folder of experiments is one dataset:
`pd.read_parquet(list_of_files)`, `pl.read_parquet("DIR/*/rounds.parquet")` or DuckDB's
`read_parquet('DIR/*/rounds.parquet')`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

S, I, F = pa.string(), pa.int64(), pa.float64()

IDENTITY = [("experiment", S), ("setting", S), ("setting_title", S), ("method", S), ("method_label", S),
            ("method_title", S), ("dataset", S), ("model", S), ("seed", I)]

ROUNDS = pa.schema(IDENTITY + [
    ("round", I), ("acc_clients_mean", F), ("acc_clients_std", F), ("acc_global_clients_mean", F),
    ("acc_clients_mean_authors_tests", F), ("acc_clients_std_authors_tests", F),
    ("acc_global_clients_mean_authors_tests", F), ("acc_global", F),
    ("train_loss", F), ("train_acc", F), ("clients_ok", I), ("clients_failed", I),
    ("clients_late", I), ("clients_not_kept", I), ("clients_offline_short", I),
    ("keep_ratio_mean", F),
    ("sim_round_s", F), ("sim_total_s", F),
    ("flops", F), ("flops_total", F),
    ("bytes_up", I), ("bytes_down", I), ("bytes_up_total", I), ("bytes_down_total", I),
    ("flops_dropped", F), ("bytes_dropped", I),
    ("wall_s", F), ("wall_total_s", F),
])

CLIENTS = pa.schema(IDENTITY + [
    ("round", I), ("client_id", I), ("tier", S), ("cap", F), ("keep_ratio", F), ("num_samples", I),
    ("flops", F), ("bytes_up", I), ("bytes_down", I),
    ("sim_s", F), ("sim_down_s", F), ("sim_compute_s", F), ("sim_up_s", F),
    ("train_acc", F), ("train_loss", F), ("status", S), ("error", S),
])

SUMMARY = pa.schema(IDENTITY + [
    ("rounds", I), ("status", S), ("final_acc", F), ("best_acc", F), ("final_acc_global", F),
    ("final_acc_global_clients", F),
    ("sim_total_s", F), ("flops_total", F), ("bytes_up_total", I), ("bytes_down_total", I),
    ("wall_total_s", F),
])



def with_columns(schema: pa.Schema, extra: dict[str, pa.DataType]) -> pa.Schema:
    """`schema` followed by a method's own columns."""
    for name in extra:
        if name in schema.names:
            raise ValueError(f"a method's column {name!r} is a column of the harness")
    return pa.schema(list(schema) + [pa.field(n, t) for n, t in extra.items()])


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    table = pa.Table.from_pydict(columns, schema=schema)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
    write_atomic(path, write)


def load(root: str | Path, table: str = "rounds") -> pd.DataFrame:
    """All experiments' `table` ('rounds', 'clients' or 'summary') under `root`, as one frame."""
    files = sorted(Path(root).glob(f"**/{table}.parquet"))
    if not files:
        raise FileNotFoundError(f"no {table}.parquet under {root}")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
