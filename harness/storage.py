"""Where results live: a local folder or a URI (`file://`, `s3://`, `gs://`, or any scheme that
pyarrow.fs, or fsspec through it, resolves), behind one small interface.

Every write is whole-or-nothing. Locally: a temporary file in the same folder (created with the
process's umask, so colleagues can read a shared folder), fsync, then a rename over the final name.
Elsewhere: the whole object is written under a temporary name, then moved to its final name (on
object stores a server-side copy, so the final name never holds a partial object). Credentials and
endpoints come from the environment (`AWS_*`, `GOOGLE_*`, ...), never from files in the results; the
S3 endpoint of `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) is passed to pyarrow explicitly.
"""
from __future__ import annotations

import io
import os
import secrets
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from harness.errors import UserError


def _skipped(name: str) -> bool:
    """Names that are no experiment's: Tune's folder, the parts of a running experiment, temporary files."""
    return name.startswith(("_", "."))


def s3_options() -> dict:
    """pyarrow S3FileSystem options from the environment: the endpoint of an S3-compatible store and
    the region, given explicitly (not every pyarrow code path reads them from the environment, and
    without a region pyarrow asks AWS where the bucket is)."""
    options = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
    return options


class Location:
    """A file or folder: a pyarrow FileSystem, the path in it, and the name people see (the URI)."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path.rstrip("/") or "/", uri.rstrip("/")

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rsplit("/", 1)[0] or "/", self.uri.rsplit("/", 1)[0])

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path}/{name}", f"{self.uri}/{name}")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    # -- reading -------------------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def children(self) -> list[Location]:
        """The entries of this folder (none if it does not exist)."""
        if self._info().type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return sorted((self / info.base_name for info in infos), key=lambda loc: loc.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def find(self, filename: str) -> list[Location]:
        """Every file called `filename` at or below this folder, skipping folders whose names start
        with '_' or '.' (Tune's state, temporary files)."""
        found, folders = [], [self]
        while folders:
            folder = folders.pop()
            for child in folder.children():
                if _skipped(child.name):
                    continue
                info = child._info()
                if info.type == pafs.FileType.Directory:
                    folders.append(child)
                elif child.name == filename:
                    found.append(child)
        return sorted(found, key=lambda loc: loc.path)

    # -- writing -------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Replace this file by `data`, whole or not at all."""
        tmp = self.parent / f".{self.name}.{secrets.token_hex(4)}.tmp"
        if self.local:
            _write_local(Path(self.path), Path(tmp.path), data)
            return
        self.fs.create_dir(self.parent.path, recursive=True)
        try:
            with self.fs.open_output_stream(tmp.path) as f:
                f.write(data)
            self.fs.move(tmp.path, self.path)
        except BaseException:
            try:
                self.fs.delete_file(tmp.path)
            except OSError:
                pass
            raise

    def delete(self) -> None:
        """Remove this file or folder with everything in it; nothing if it does not exist."""
        kind = self._info().type
        if kind == pafs.FileType.Directory:
            if self.local:
                shutil.rmtree(self.path)
            else:
                self.fs.delete_dir(self.path)
        elif kind != pafs.FileType.NotFound:
            self.fs.delete_file(self.path)


def _write_local(path: Path, tmp: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the mode follows the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a crash once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def resolve(where: str | os.PathLike | Location) -> Location:
    """A local path (`~` expanded, made absolute) or a URI as a Location."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    if "://" not in text:
        path = Path(text).expanduser().absolute()
        return Location(pafs.LocalFileSystem(), path.as_posix(), path.as_posix())
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        path = Path(unquote(urlparse(text).path))
        return Location(pafs.LocalFileSystem(), path.as_posix(), path.as_posix())
    try:
        if scheme in ("s3", "s3a"):
            fs, path = pafs.S3FileSystem(**s3_options()), text.split("://", 1)[1]
        else:
            try:
                fs, path = pafs.FileSystem.from_uri(text)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                import fsspec.core  # any scheme fsspec knows, through pyarrow's handler

                spec, path = fsspec.core.url_to_fs(text)
                fs = pafs.PyFileSystem(pafs.FSSpecHandler(spec))
    except (ImportError, ValueError, OSError, pa.ArrowException) as e:
        raise UserError(text, f"cannot open this location: {e}") from None
    return Location(fs, path.rstrip("/"), text)


def read_parquet(location: Location):
    """One Parquet file as a pandas frame."""
    return pq.read_table(location.path, filesystem=location.fs).to_pandas()


def merge_parquet(parts: list[Location], dest: Location, schema: pa.Schema) -> None:
    """Concatenate Parquet files of one schema into `dest` (one row group per part), written whole."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema) as writer:
        for part in parts:
            writer.write_table(pq.read_table(part.path, filesystem=part.fs, schema=schema))
    dest.write_bytes(buf.getvalue())


def tune_storage(location: Location) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Tune's RunConfig."""
    return (location.path, None) if location.local else (location.path, location.fs)


# -- one writer per output folder ------------------------------------------------------------------

LEASE = ".fedbench-lease.json"  # a hidden name: never taken for an experiment's folder or file
LEASE_TTL_S = 120.0  # a lease not renewed for this long is its owner's no more (an owner on another host)
_TAKEOVER_SETTLE_S = 1.0  # on object stores: wait, then read back, so of two racing writers one wins


_HELD: dict[str, list] = {}  # folder URI -> [its Lease, how many holders in this process]


class FolderHeld(UserError):
    """The output folder is another run's or sweep's right now."""


class Lease:
    """The right to write into `folder`: a file `<folder>/.fedbench-lease.json` naming the owner (host,
    pid, process start time, command, when taken and last renewed). A thread renews it every
    LEASE_TTL_S / 4 seconds. Another owner's lease is taken over only after a check that it is dead:
    on this host, its process is gone (or is another process with the same pid); from another host,
    it was not renewed for LEASE_TTL_S seconds. Locally the lease file is created exclusively
    (O_EXCL); on object stores, where no exclusive create exists, it is written, then read back after a
    second: of two racing writers, the later write wins and the earlier writer sees it and stops."""

    def __init__(self, folder: Location, command: str):
        self.folder, self.file, self.command = folder, folder / LEASE, command
        self.token = secrets.token_hex(8)
        self._stop = None
        self._created_folder = False

    def _record(self, taken: float) -> dict:
        import socket
        import time

        return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
                "command": self.command, "token": self.token, "taken": taken, "renewed": time.time()}

    def _read(self) -> dict | None:
        """The lease there now: None if there is none; {} if it cannot be read (a writer that died
        while writing it, or some other file)."""
        import json

        try:
            data = json.loads(self.file.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> Lease:
        import json
        import time

        if self.folder.uri in _HELD:  # this process holds it already (a sweep that then reports)
            _HELD[self.folder.uri][1] += 1
            self._nested = True
            return self
        self._nested = False
        self._created_folder = self.local_folder_missing()
        taken = time.time()
        for _ in range(3):
            holder = self._read()
            if holder is not None and not self._dead(holder):
                raise FolderHeld(str(self.folder), f"in use by {_describe(holder)}; wait for it to end, or use "
                                                   f"another --out")
            if holder is not None:
                import logging

                logging.getLogger(__name__).warning("%s: taking over the lease of %s, which is no longer running",
                                                    self.folder, _describe(holder) if holder else "a damaged lease")
            data = json.dumps(self._record(taken)).encode()
            if self.folder.local:
                if holder is not None:
                    _discard_local(Path(self.file.path), holder)
                if _create_local(Path(self.file.path), data):
                    break
                continue  # someone else created it meanwhile: check that one
            self.file.write_bytes(data)
            time.sleep(_TAKEOVER_SETTLE_S)
            if (self._read() or {}).get("token") == self.token:
                break
        else:
            holder = self._read() or {}
            raise FolderHeld(str(self.folder), f"in use by {_describe(holder)}; wait for it to end, or use another --out")
        self._start_renewing(taken)
        _HELD[self.folder.uri] = [self, 1]
        return self

    def local_folder_missing(self) -> bool:
        return self.folder.local and not Path(self.folder.path).exists()

    def _dead(self, holder: dict) -> bool:
        import socket
        import time

        if not holder:  # unreadable: dead once it is older than the time a writer needs to write it
            try:
                age = time.time() - self.file.fs.get_file_info(self.file.path).mtime.timestamp()
            except (OSError, AttributeError):
                return True
            return age > 10.0
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return _process_start(holder["pid"]) != holder.get("started")
        return time.time() - float(holder.get("renewed", 0)) > LEASE_TTL_S

    def _start_renewing(self, taken: float) -> None:
        import json
        import threading

        stop = self._stop = threading.Event()

        def renew():
            while not stop.wait(LEASE_TTL_S / 4):
                try:
                    if (self._read() or {}).get("token") == self.token:
                        self.file.write_bytes(json.dumps(self._record(taken)).encode())
                except OSError:
                    pass

        threading.Thread(target=renew, name="fedbench-lease", daemon=True).start()

    def release(self) -> None:
        """Give the folder up (only a lease that is still ours is removed), and remove the folder
        again if the lease made it and nothing else was written."""
        if getattr(self, "_nested", False):
            self._nested = False
            _HELD[self.folder.uri][1] -= 1
            return
        if self._stop is None:
            return
        _HELD.pop(self.folder.uri, None)
        self._stop.set()
        self._stop = None
        try:
            if (self._read() or {}).get("token") == self.token:
                self.file.delete()
            if self._created_folder:
                os.rmdir(self.folder.path)  # only if empty
        except OSError:
            pass

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _process_start(pid: int) -> float | None:
    """The start time of process `pid` (None if there is none): a pid and its start time name one process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _describe(holder: dict) -> str:
    import time

    if not holder:
        return "a writer whose lease file is being written or is damaged"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("taken", 0))))
    return f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {when})"


def _create_local(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` if there is no such file; False if there is one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    _write_local(tmp, path.parent / f".{tmp.name}.tmp", data)
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists: the lease is whole when it appears
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _discard_local(path: Path, holder: dict) -> None:
    """Remove the dead lease at `path` if it is still the one checked (another taker may have
    replaced it meanwhile): it is renamed aside first, and put back if it changed."""
    import json

    aside = path.parent / f".{path.name}.{secrets.token_hex(4)}.dead"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        now = json.loads(aside.read_bytes())
    except (OSError, ValueError):
        now = {}
    if now != holder and now:  # a live taker's lease: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
