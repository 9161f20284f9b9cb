"""Reading and writing the user's files safely: regular files only, bounded reads, atomic writes, and
outputs that never destroy inputs.

Invariants:
- Only regular files are read, and never beyond their size on disk: a path is refused before it is
  opened when it names a folder, device, FIFO or socket, then opened without blocking and checked again
  on the open descriptor (so a FIFO swapped in meanwhile cannot hang the read), and read with one
  bounded read of the `st_size` the descriptor reports.
- Outputs never destroy inputs: `check_outputs` refuses, before any work, an output that is the same file
  as an input (the same resolved path, or the same device and inode through a hard link) or as another
  output, a destination that is a folder, device or FIFO (replacing /dev/null would destroy it), and a
  destination whose folder does not exist.
- Every write is atomic: the bytes go to an anonymous file in the destination's folder (Linux O_TMPFILE;
  elsewhere a hidden `.NAME.XXXXXXXX.tmp` file), are flushed and fsynced, then linked under a hidden
  name and renamed over the destination, and the folder is fsynced. A write killed at any point leaves
  the previous file intact; with O_TMPFILE it leaves nothing else either (the hidden name exists only
  between the link and the rename), otherwise at most the hidden `.NAME.XXXXXXXX.tmp` file. A symlinked
  destination is followed: the file it points to is replaced. A replaced file keeps its permission bits;
  a new one gets those the umask allows.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

from graphopt.errors import GraphoptError, ModelLoadError, OutputPathError

PathLike = str | os.PathLike[str]


def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")


def _irregular_kind(path: PathLike) -> str | None:
    """What an existing non-regular `path` is ("a FIFO", ...), or None for a regular file or no file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _kind(mode)


def not_regular(path: PathLike) -> str | None:
    """Why an existing `path` must not be read (a folder, device, FIFO or socket: reading one could block
    forever or never end), or None for a regular file or a path that does not exist."""
    kind = _irregular_kind(path)
    return None if kind is None else f"{path} is {kind}, not a regular file"


def open_regular(path: PathLike, error: type[GraphoptError] = ModelLoadError, what: str = "file") -> BinaryIO:
    """`path` opened for reading, refused (raised as `error`) unless it is a regular file; never blocks."""
    refused = not_regular(path)
    if refused:
        raise error(refused)
    try:  # O_NONBLOCK: a FIFO swapped in after the check opens at once instead of waiting for a writer
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        raise error(f"{path} is {_kind(mode)}, not a regular file")
    return os.fdopen(handle, "rb")


def read_regular(path: PathLike, error: type[GraphoptError] = ModelLoadError, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, at most its size on disk when opened (`open_regular`)."""
    with open_regular(path, error, what) as stream:
        return stream.read(os.fstat(stream.fileno()).st_size)


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def _stage(folder: int, target: Path) -> tuple[int, str | None]:
    """A descriptor to write the new contents to, and its hidden name (None while it is anonymous)."""
    mode = target.stat().st_mode & 0o7777 if target.is_file() else 0o666 & ~_umask()
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            handle = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=folder)
            os.fchmod(handle, mode)
            return handle, None
        except OSError:  # a filesystem without anonymous files: a hidden named file instead
            pass
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(handle, mode)
    return handle, os.path.basename(staging)


def _link_anonymous(handle: int, folder: int, target: Path) -> str:
    """Give the anonymous file `handle` a hidden name in `folder`, just before it is renamed."""
    while True:
        name = f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:  # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: how an O_TMPFILE file gets a name
            os.link(f"/proc/self/fd/{handle}", name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=True)
            return name
        except FileExistsError:
            continue


def write_atomic(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(stream)` atomically (see the module docstring): an interrupted write
    never leaves a half-written file or destroys the one already there. An OSError becomes an
    `OutputPathError` naming the path."""
    target = Path(os.path.realpath(path))
    try:
        folder = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc
    staging: str | None = None
    try:
        handle, staging = _stage(folder, target)
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
            if staging is None:
                staging = _link_anonymous(stream.fileno(), folder, target)
        os.replace(staging, target.name, src_dir_fd=folder, dst_dir_fd=folder)
        staging = None
        os.fsync(folder)  # so that the rename itself survives a crash
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if staging is not None:
            try:
                os.unlink(staging, dir_fd=folder)
            except OSError:
                pass
        os.close(folder)


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name one file: the same resolved path, or (through a hard link) the same inode."""
    if Path(first).resolve() == Path(second).resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist yet
        return False


def _unwritable(output: PathLike) -> str | None:
    """Why `output` cannot be replaced by a regular file, or None."""
    destination = Path(os.path.realpath(output))
    kind = _irregular_kind(destination)
    if kind == "a folder":
        return f"output path is a directory: {output}"
    if kind is not None:
        return f"refusing to replace {output}: it is {kind}, not a regular file"
    if not destination.parent.is_dir():
        return f"output directory does not exist: {Path(output).parent}"
    return None


def check_outputs(outputs: Sequence[PathLike], inputs: Iterable[PathLike],
                  clash: type[GraphoptError] = OutputPathError) -> None:
    """Refuse, before any work, an output that is the same file as an input (raised as `clash`) or as an
    earlier output, or that cannot be replaced by a regular file (`OutputPathError`)."""
    inputs = list(inputs)
    for index, output in enumerate(outputs):
        source = next((p for p in inputs if same_file(output, p)), None)
        if source is not None:
            raise clash(f"refusing to overwrite the input model or data: output {output} is the same file as "
                        f"input {source}")
        other = next((p for p in outputs[:index] if same_file(output, p)), None)
        if other is not None:
            raise OutputPathError(f"refusing to write two outputs to one file: {other} and {output}")
        reason = _unwritable(output)
        if reason:
            raise OutputPathError(reason)
