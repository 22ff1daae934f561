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
