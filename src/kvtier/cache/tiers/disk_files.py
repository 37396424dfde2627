"""The disk tier's file layer: object names, whole-file reads into ``bytes`` or into a caller's
buffers, sizes and folders. Plain functions over paths and file descriptors, no state and no lock:
``DiskTier`` (disk.py) holds the invariants (index, ledger, crash safety) and calls these."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable, Sequence

from kvtier.cache.codec import CorruptObjectError, read_header
from kvtier.cache.keys import DIGEST_SIZE, BlockKey

SUFFIX = ".kvt"
TEMP_SUFFIX = ".tmp"
HEX_LEN = 2 * DIGEST_SIZE
HEX2_RE = re.compile(r"[0-9a-f]{2}")  # the key folders: the first two hex characters of a key
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
# What one read leaves in its slot when it has no object: the file is gone (a miss), or reading
# it failed (a miss and a counted error).
GONE = 0
FAILED = 1
# read_into's outcomes besides those: the whole object is in the caller's buffer, or the file has
# another size than the buffer (an object of another codec: the caller falls back to get).
READ = 2
OTHER_SIZE = 3

PROOF_BYTES = 1 << 16  # a header is ~100 bytes + 4 per token: 64 KiB covers 16k-token blocks


def is_object(path: str, key: BlockKey) -> bool:
    """Whether the file at ``path`` is a kvtier block object stored under ``key``: its header parses
    (magic, version, bounds) and names that key."""
    try:
        with open(path, "rb") as f:
            return read_header(f.read(PROOF_BYTES)).key == key
    except (OSError, CorruptObjectError):
        return False


def read_file(path: str, into: Sequence[memoryview] | None = None) -> bytes | int:
    """The whole file (or ``READ`` / ``OTHER_SIZE`` with ``into``), or ``GONE`` / ``FAILED``."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except FileNotFoundError:
        return GONE
    except OSError:  # permissions, a path component that is not a folder, too many open files
        return FAILED
    return read_fd(fd, into)


def read_fd(fd: int, into: Sequence[memoryview] | None = None) -> bytes | int:
    """The whole file open at ``fd`` (closed here) in one ``read`` into a ``bytes`` of its size,
    or ``FAILED``.

    An object is never modified in place (``put`` renames a new file over it), so ``fstat``'s size
    is the size to read; the one extra byte asked for, and the loop, only matter for a file someone
    else shrinks or grows while it is read: the result is then whatever the file held at EOF, as
    ``f.read()`` would return.
    """
    try:
        size = os.fstat(fd).st_size
        if into is not None:
            return read_fd_into(fd, size, into)
        data = os.read(fd, size + 1)
        if len(data) == size:
            return data
        parts = [data]  # grew or shrank under us, or a read cut short: read on to EOF
        while chunk := os.read(fd, max(size, 1 << 16)):
            parts.append(chunk)
        return b"".join(parts)
    except OSError:  # EIO, EISDIR (a folder at the object's name)
        return FAILED
    finally:
        os.close(fd)


def read_fd_into(fd: int, size: int, into: Sequence[memoryview]) -> int:
    """Fill the buffers ``into`` in order from ``fd`` when the file has exactly their total size:
    ``READ``, ``OTHER_SIZE``, or ``FAILED`` when the file ends early (shrunk under us). The
    caller closes ``fd``."""
    if size != sum(len(part) for part in into):
        return OTHER_SIZE
    parts = list(into)
    while parts:
        n = os.readv(fd, parts)
        if n == 0:
            return FAILED
        while parts and n >= len(parts[0]):  # drop the filled buffers, cut the partly filled one
            n -= len(parts.pop(0))
        if parts and n:
            parts[0] = parts[0][n:]
    return READ


def write_all(fd: int, parts: Sequence[bytes | memoryview], size: int) -> None:
    """Write ``parts`` (``size`` bytes in all) to ``fd`` in order: one ``writev`` (and the lock
    released once) unless the kernel writes less, then the rest. Raises OSError."""
    views = [memoryview(p).cast("B") for p in parts]
    while size:
        n = os.writev(fd, views)
        if n <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        size -= n
        while views and n >= len(views[0]):  # drop the written parts, cut the partly written one
            n -= len(views.pop(0))
        if views and n:
            views[0] = views[0][n:]


def object_path(ns_dir: str, key: BlockKey) -> str:
    """The file that holds ``key`` in a namespace folder (whether or not it exists)."""
    h = key.hex()
    return os.path.join(ns_dir, h[:2], h + SUFFIX)


def write_temp(path: str, parts: Sequence[bytes | memoryview], size: int, fsync: bool) -> str:
    """Write ``parts`` (``size`` bytes in all) to a new temp file beside ``path``, the object's final
    name (``.<name>.<pid>.<random>.tmp``: never served, removed at start-up once old), and return
    its path; the caller renames it onto ``path``. Plain ``os`` calls, each of which releases the
    interpreter lock. Raises OSError, leaving no temp file behind."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name[:HEX_LEN]}.{os.getpid()}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:  # first object of this folder, or a clear() by someone else
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        write_all(fd, parts, size)
        if fsync:
            os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def parse_key(name: str, prefix: str) -> BlockKey | None:
    """``<64 lowercase hex>.kvt`` in the folder named by its first two characters, else None."""
    if len(name) != HEX_LEN + len(SUFFIX) or not name.startswith(prefix):
        return None
    h = name[:HEX_LEN]
    try:
        key = bytes.fromhex(h)
    except ValueError:
        return None
    # fromhex accepts upper case and spaces; only the exact form this tier writes is an object.
    return key if len(key) == DIGEST_SIZE and key.hex() == h else None


def size_of_objects(ns_dir: str) -> int:
    """What a purge left (files it keeps: ones that are not provably kvtier objects)."""
    total = 0
    with contextlib.suppress(OSError):
        for sub in subdirs(ns_dir, HEX2_RE.fullmatch):
            for e in os.scandir(sub.path):
                if e.name.endswith(SUFFIX):
                    with contextlib.suppress(OSError):
                        total += e.stat(follow_symlinks=False).st_size
    return total


def size_or_zero(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def subdirs(path: str, accept: Callable[[str], object]) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return [e for e in it if accept(e.name) and e.is_dir(follow_symlinks=False)]


def rmdir_if_empty(path: str) -> None:
    with contextlib.suppress(OSError):  # not empty (another process wrote meanwhile), or gone already
        os.rmdir(path)
