"""Personal client state: what a method keeps per client between its rounds (FedLPS scores, P-UCBV
arms, ...), for thousands of clients.

Values are stored serialised (torch.save of the value), so only bytes are held: in memory by default,
or in one SQLite file on disk (`engine.state_store: disk`). Each client has separate namespaces for
the state that travels with its task ("client") and the state the server keeps about it.
"""
from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import torch


def _dump(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _load(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=False)


class StateStore:
    def get(self, client_id: int, namespace: str = "client") -> Any:
        blob = self._get(namespace, client_id)
        return None if blob is None else _load(blob)

    def put(self, client_id: int, value: Any, namespace: str = "client") -> None:
        self._put(namespace, client_id, _dump(value))

    def nbytes(self) -> int:
        return sum(len(b) for _, _, b in self.items())

    def export(self) -> list[tuple[str, int, bytes]]:
        """Everything, for checkpoints."""
        return list(self.items())

    def restore(self, rows: list[tuple[str, int, bytes]]) -> None:
        self.clear()
        for ns, cid, blob in rows:
            self._put(ns, cid, blob)

    # backends implement these
    def _get(self, namespace: str, client_id: int) -> bytes | None: ...
    def _put(self, namespace: str, client_id: int, blob: bytes) -> None: ...
    def items(self) -> Iterator[tuple[str, int, bytes]]: ...
    def clear(self) -> None: ...


class MemoryStore(StateStore):
    def __init__(self):
        self._data: dict[tuple[str, int], bytes] = {}

    def _get(self, namespace, client_id):
        return self._data.get((namespace, client_id))

    def _put(self, namespace, client_id, blob):
        self._data[(namespace, client_id)] = blob

    def items(self):
        for (ns, cid), blob in sorted(self._data.items()):
            yield ns, cid, blob

    def clear(self):
        self._data.clear()


class DiskStore(StateStore):
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path))
        self._db.execute("CREATE TABLE IF NOT EXISTS state (ns TEXT, cid INTEGER, blob BLOB, PRIMARY KEY (ns, cid))")

    def _get(self, namespace, client_id):
        row = self._db.execute("SELECT blob FROM state WHERE ns=? AND cid=?", (namespace, client_id)).fetchone()
        return None if row is None else row[0]

    def _put(self, namespace, client_id, blob):
        self._db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", (namespace, client_id, blob))
        self._db.commit()

    def items(self):
        yield from self._db.execute("SELECT ns, cid, blob FROM state ORDER BY ns, cid").fetchall()

    def clear(self):
        self._db.execute("DELETE FROM state")
        self._db.commit()
