"""Personal client state: what a method keeps per client between its rounds (FedLPS scores, P-UCBV
arms, ...), for thousands of clients.

Values are stored serialised (torch.save of the value), so only bytes are held: in memory by default,
or in one SQLite file on disk (`engine.state_store: disk`), in a temporary folder of the process that
runs the experiment: every run starts empty and a checkpoint carries the store's content. Each client
has separate namespaces for the state that travels with its task ("client") and the state the server
keeps about it.

Stored values and checkpoints hold tensors and plain data only (None, bool, int, float, str, bytes,
lists, tuples, dicts), so `torch.load(weights_only=True)`, or for values without tensors an unpickler
that knows no global at all, reads them and never runs pickled code: `dumps` refuses anything else,
`loads` refuses to unpickle anything else.
"""
from __future__ import annotations

import collections
import io
import pickle
import shutil
import sqlite3
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch

_BUILTINS = (type(None), bool, int, float, str, bytes)
_SCALARS = (*_BUILTINS, torch.dtype, torch.device, torch.Size)


def check_plain(value: Any, where: str = "state") -> bool:
    """Raise TypeError naming the first part of `value` that is not a tensor or plain data. True when
    `value` holds Python's own types only (no tensor, dtype, device, size or ordered dict)."""
    builtins_only = True
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if type(v) in _BUILTINS:
            continue
        if isinstance(v, _SCALARS) or isinstance(v, torch.Tensor):
            builtins_only = False
            continue
        if type(v) in (dict, collections.OrderedDict):
            builtins_only = builtins_only and type(v) is dict
            for k, item in v.items():
                if not isinstance(k, (str, int)):
                    raise TypeError(f"{at} has a key of type {type(k).__name__}; keys must be str or int")
                builtins_only = builtins_only and type(k) in (str, int)
                stack.append((item, f"{at}.{k}"))
        elif type(v) in (list, tuple):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(v))
        else:
            raise TypeError(f"{at} is a {type(v).__module__}.{type(v).__qualname__}; state must hold tensors and "
                            f"plain data (None, bool, int, float, str, bytes, list, tuple, dict) only")
    return builtins_only


class _BuiltinsOnly(pickle.Unpickler):
    """Python's own types need no global: a pickle that names one is not a value `dumps` wrote."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not plain data")


def dumps(value: Any, where: str = "state") -> bytes:
    """`value` (tensors and plain data) as bytes that `loads` reads: a plain pickle when it holds
    Python's own types only (a bandit's state: read and written every round, where torch.save's zip
    archive and its weights-only unpickler cost a millisecond each), torch.save's archive otherwise."""
    if check_plain(value, where):
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def loads(blob: bytes, where: str = "state") -> Any:
    """The value of `dumps`; anything that would need arbitrary unpickling is refused."""
    try:
        if blob[:2] != b"PK":  # not torch.save's zip archive: a pickle of Python's own types
            return _BuiltinsOnly(io.BytesIO(blob)).load()
        return torch.load(io.BytesIO(blob), weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefusedState(f"{where}: refused, it holds more than tensors and plain data ({first})") from None


class RefusedState(ValueError):
    """Saved state that would need arbitrary unpickling: never loaded, never silently replaced."""


class StateStore:
    def get(self, client_id: int, namespace: str = "client") -> Any:
        blob = self._get(namespace, client_id)
        return None if blob is None else loads(blob, f"state of client {client_id} ({namespace})")

    def put(self, client_id: int, value: Any, namespace: str = "client") -> None:
        self._put(namespace, client_id, dumps(value, f"state of client {client_id} ({namespace})"))

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

    def close(self) -> None:
        """Release what the store holds (the disk store's temporary folder)."""


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
    """One SQLite file in a new temporary folder (removed with the store): it starts empty, so a
    run never picks up another run's state; `restore` fills it from a checkpoint."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="fedbench-state-", dir=folder))
        self.path = self.folder / "client_state.sqlite"
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("CREATE TABLE state (ns TEXT, cid INTEGER, blob BLOB, PRIMARY KEY (ns, cid))")
        self._cleanup = weakref.finalize(self, _remove, self._db, self.folder)

    def close(self) -> None:
        self._cleanup()

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


def _remove(db: sqlite3.Connection, folder: Path) -> None:
    db.close()
    shutil.rmtree(folder, ignore_errors=True)
