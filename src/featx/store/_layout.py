"""Where a store's groups live on disk, and how a commit changes that atomically at the cost of what it adds.

A store is a small HDF5 *index* (the ``FEATURES.h5`` the user names) whose entries are external
links, one per group, into files in the folder ``FEATURES.h5.d/`` beside it. HDF5 resolves the
links relative to the index, so plain ``h5py.File("FEATURES.h5")["model/features"]`` reads through
them. A group is one *part* file (a finished journal, moved in by a hard link, never rewritten) or,
when it was assembled from several parts (ranks of a torchrun job, images added later), a small
*head* file whose ``features`` is an HDF5 virtual dataset over the parts' rows and whose other row
columns (labels, ids, ...) are written out.

A commit, under an exclusive lock, links the new files into the folder, writes a new index beside
the old one and renames it over it (``os.replace``): a kill before the rename leaves the old store,
after it the new one; files no index refers to are removed at the next commit. Existing groups'
files are never opened for writing. Stores written before this layout (every group inside the one
file) are read as they are; the first commit into one hard-links that file into the folder (no
copy) and replaces it by an index that links to its groups.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py

from ..errors import FeatxError
from ..files import safe_name

try:
    import fcntl
except ImportError:  # Windows: commits are not locked against each other
    fcntl = None

__all__ = ["Link", "StoreCommit", "data_dir", "read_links", "fsync_file", "already_committed"]

_logger = logging.getLogger(__name__)
LAYOUT = "index-1"


def data_dir(out: Path) -> Path:
    """The folder beside the index that holds the group files: ``FEATURES.h5.d``."""
    return out.with_name(out.name + ".d")


@dataclass(frozen=True)
class Link:
    """Where a group lives: ``file`` inside the data folder ('' for a group inside the index itself) and its path there."""

    file: str
    path: str


def read_links(out: Path) -> tuple[dict[str, Link], dict]:
    """The store's groups and the index's attributes."""
    links = {}
    with h5py.File(out, "r") as f:
        for key in f:
            link = f.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                links[key] = Link(Path(link.filename).name, link.path)
            elif isinstance(link, h5py.HardLink) and isinstance(f.get(key), h5py.Group):
                links[key] = Link("", "/" + key)
        return links, dict(f.attrs)


def already_committed(path: Path, out: Path) -> bool:
    """Whether the journal ``path`` is the same file as the store or one of its group files (a kill struck right after its commit)."""
    out = Path(out)
    try:
        st = os.stat(path)
        if out.exists() and os.path.samestat(st, os.stat(out)):
            return True
        folder = data_dir(out)
        if not folder.is_dir() or not any(os.path.samestat(st, os.stat(p)) for p in folder.glob("*.h5")):
            return False
        return any(os.path.samestat(st, os.stat(folder / name)) for name in referenced_files(out))
    except OSError:
        return False


def referenced_files(out: Path) -> set[str]:
    """Names of the files in the store's folder that its groups are made of."""
    links, _ = read_links(out)
    folder, names = data_dir(out), set()
    for link in links.values():
        if link.file:
            names.add(link.file)
            with h5py.File(folder / link.file, "r") as f:
                parts = f[link.path].attrs.get("parts")
            if parts is not None:
                names.update(p[0] for p in json.loads(parts))
    return names


def fsync_file(path: Path) -> None:
    """Ask the OS to put ``path`` on disk (for power loss; a kill needs no fsync); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":
        fsync_file(path)


class StoreCommit:
    """Exclusive access to the store ``out`` while groups are added or replaced; :meth:`publish` makes the change visible.

    Use as a context manager; between enter and publish, nothing a reader sees changes.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.dir = data_dir(self.out)
        self.links: dict[str, Link] = {}
        self.attrs: dict = {}
        self._lock = None
        self._linked: list[Path] = []  # journals hard-linked into the folder; removed once published
        self._added: list[str] = []  # files this commit put into the folder

    def __enter__(self) -> "StoreCommit":
        try:
            self.dir.mkdir(exist_ok=True)
            self._lock = open(self.dir / ".lock", "a")
        except OSError as e:
            raise FeatxError(f"cannot write '{self.dir}': {e.strerror or e}") from None
        if fcntl is not None:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        if self.out.exists():
            try:
                self.links, self.attrs = read_links(self.out)
            except OSError as e:
                raise FeatxError(f"cannot read existing store '{self.out}': {e}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the lock

    # -- files ------------------------------------------------------------------------------
    def new_file(self, key: str, kind: str) -> str:
        """A fresh file name in the folder for a file this commit adds."""
        name = f"{safe_name(key)}.{kind}-{secrets.token_hex(6)}.h5"
        self._added.append(name)
        return name

    def add_file(self, path: Path, key: str) -> str:
        """Hard-link the finished file ``path`` into the folder (a kill leaves it where it was); its new name."""
        name = self.new_file(key, "part")
        target = self.dir / name
        try:
            os.link(path, target)
            self._linked.append(path)
        except OSError:  # no hard links on this file system: move it (same folder tree, still a rename)
            os.replace(path, target)
        return name

    def resolve(self, key: str) -> Link | None:
        """``key``'s link, with a group inside a pre-index store first moved into the folder (by a hard link)."""
        link = self.links.get(key)
        if link is not None and link.file == "":
            self._adopt_single_file_store()
            link = self.links[key]
        return link

    def _adopt_single_file_store(self) -> None:
        name = self.new_file("store", "base")
        try:
            os.link(self.out, self.dir / name)
        except OSError:
            _logger.warning("this file system has no hard links: copying '%s' once into '%s'", self.out, self.dir)
            shutil.copy2(self.out, self.dir / name)
        self.links = {k: (Link(name, v.path) if v.file == "" else v) for k, v in self.links.items()}

    def parts(self, key: str) -> list[tuple[str, str, int]]:
        """(file, group path, rows) of each part of group ``key``, in row order."""
        link = self.resolve(key)
        with h5py.File(self.dir / link.file, "r") as f:
            g = f[link.path]
            if "parts" in g.attrs:
                return [tuple(p) for p in json.loads(g.attrs["parts"])]
            return [(link.file, link.path, int(g["features"].shape[0]))]

    # -- publishing -------------------------------------------------------------------------
    def publish(self, key: str, link: Link) -> None:
        """Point ``key`` at ``link`` by writing a new index and renaming it over the old one."""
        if any(v.file == "" for v in self.links.values()):
            self._adopt_single_file_store()
        self.links[key] = link
        for name in {link.file, *self._added}:
            fsync_file(self.dir / name)
        _fsync_dir(self.dir)
        tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.index-tmp")
        try:
            with h5py.File(tmp, "w") as f:
                for k, v in sorted(self.links.items()):
                    f[k] = h5py.ExternalLink(f"{self.dir.name}/{v.file}", v.path)
                for k, v in self.attrs.items():
                    f.attrs[k] = v
                f.attrs["featx_store_layout"] = LAYOUT
            fsync_file(tmp)
            os.replace(tmp, self.out)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(self.out.parent)
        self._drop_journals()
        self._remove_unreferenced()

    def _drop_journals(self) -> None:
        """Remove the journals' old names (their files are in the folder now, under the new index)."""
        for path in self._linked:
            path.unlink(missing_ok=True)
        self._linked, self._added = [], []

    def _remove_unreferenced(self) -> None:
        """Delete group files no group refers to any more (replaced groups, leftovers of killed commits)."""
        try:
            keep = referenced_files(self.out)
        except (OSError, KeyError, ValueError) as e:  # leave everything in place rather than guess
            _logger.warning("could not list the files of '%s' (%s); not removing unused ones", self.out, e)
            return
        for path in self.dir.glob("*.h5"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
