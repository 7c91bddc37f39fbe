"""WebDataset tar shards as a source: indexed once by their headers, each image then read by offset.

A sample is the group of members sharing a key (WebDataset's rule: the member name up to the
first dot of its file name); its image is the ``jpg``/``jpeg``/``png``/``webp`` member, its label
the ``cls``, ``txt`` or ``json`` member when present (in that order). The standard library's
``tarfile`` serves better here than a streaming reader: the index gives every image a fixed
place in the image list (so batches, resumes and the split across ranks are deterministic),
and an image is then one ``seek`` and one ``read`` in its shard, in order, without unpacking.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np

from ..errors import FeatxError
from ..splits import SPLIT_FOLDER_NAMES
from ._files import natural_key
from ._source import UNLABELED, ImageSource, TarMembers

__all__ = ["expand_braces", "shard_paths", "tar_source", "SHARD_IMAGE_FIELDS", "CLASS_LIST"]

_logger = logging.getLogger(__name__)
SHARD_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
_LABEL_FIELDS = ("cls", "txt", "json")
CLASS_LIST = "classes.txt"  # beside the shards: the name of integer label k on line k
_JSON_LABEL_KEYS = ("cls", "label", "class", "class_name")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # WebDataset: key up to the first dot of the file name


def _matching_brace(text: str, start: int) -> int:
    """Index of the '}' closing the '{' at ``start``, or -1."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _top_level_split(body: str) -> list[str]:
    """``body`` split at the commas outside nested braces."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(body):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    return items + [body[start:]]


def expand_braces(pattern: str) -> list[str]:
    """``train-{000..127}.tar`` / ``{a,b}-0.tar`` / ``{train-{0..1},test-0}.tar`` expanded in bash's order (the first
    brace from the left, with its nested braces, then the rest; zero padding kept), as WebDataset does."""
    open_at = pattern.find("{")
    if open_at < 0:
        return [pattern]
    close_at = _matching_brace(pattern, open_at)
    if close_at < 0:
        raise FeatxError(f"'{{' without a matching '}}' in '{pattern}'")
    body, prefix, suffix = pattern[open_at + 1 : close_at], pattern[:open_at], pattern[close_at + 1 :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(v).zfill(width) for v in range(int(a), int(b) + step, step)]
    elif len(parts := _top_level_split(body)) > 1:
        items = parts
    else:
        raise FeatxError(f"cannot expand '{{{body}}}' in '{pattern}'; use {{000..127}} (a range) or {{a,b}} (a list)")
    return [prefix + s for item in items for s in expand_braces(item + suffix)]


def shard_paths(text: str) -> list[Path] | None:
    """The shard files named by a SOURCE (a .tar file, a folder of them, a brace pattern); None if it names no shards."""
    path = Path(text)
    if "{" in text and not path.exists():
        paths = [Path(p) for p in expand_braces(text)]
    elif path.is_file() and path.suffix.lower() == ".tar":
        paths = [path]
    elif path.is_dir():
        tars = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".tar" and not p.name.startswith("."))
        subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if not tars or subdirs:
            return None
        paths = tars
    else:
        return None
    not_tar = [p for p in paths if p.suffix.lower() != ".tar"]
    if not_tar:
        raise FeatxError(f"'{not_tar[0]}' is not an uncompressed .tar shard; featx reads WebDataset shards by offset, "
                         "so recompress them as plain .tar files")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FeatxError(f"{len(missing)} of {len(paths)} shards of '{text}' do not exist (first: '{missing[0]}')")
    seen: dict[Path, str] = {}
    for p in paths:
        if p.resolve() in seen:
            also = "" if seen[p.resolve()] == str(p) else f" (also as '{p}')"
            raise FeatxError(f"'{text}' names the shard '{seen[p.resolve()]}' twice{also}, so its images would be read twice; "
                             "name every shard once")
        seen[p.resolve()] = str(p)
    return paths


def _shard_split(path: Path) -> str:
    """'train' for train-000001.tar or .../train/000001.tar; any recognised split name likewise; else 'train'."""
    for token in re.split(r"[-_.]", path.stem.lower()):
        if token in SPLIT_FOLDER_NAMES:
            return token
    return path.parent.name.lower() if path.parent.name.lower() in SPLIT_FOLDER_NAMES else "train"


def _label(tf: tarfile.TarFile, fields: dict) -> str:
    """The sample's label as text ('' when it has none or it cannot be read)."""
    for name in _LABEL_FIELDS:
        member = fields.get(name)
        if member is None:
            continue
        try:
            text = tf.extractfile(member).read().decode("utf-8").strip()
        except (OSError, tarfile.TarError, UnicodeDecodeError, AttributeError):
            return ""
        if name == "json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return ""
            if isinstance(value, dict):
                value = next((value[k] for k in _JSON_LABEL_KEYS if k in value), None)
            return "" if value is None or isinstance(value, (dict, list)) else str(value).strip()
        return str(int(text)) if name == "cls" and text.lstrip("-").isdigit() else text
    return ""


def _index_shard(path: Path) -> list[tuple[str, str, int, int]]:
    """(key, label text, data offset, size) of each sample with an image, in the order of the shard."""
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise FeatxError(f"cannot read tar shard '{path}': {e}; pass uncompressed WebDataset .tar shards") from None
    samples: dict[str, dict] = {}
    with tf:
        try:
            for m in tf:
                match = _KEY_EXT.match(m.name.removeprefix("./")) if m.isfile() else None
                if match:
                    samples.setdefault(match.group(1), {})[match.group(2).lower()] = m
        except (tarfile.TarError, OSError) as e:
            _logger.warning("tar shard '%s' is damaged after %d samples (%s); using the samples before it", path, len(samples), e)
        out, no_image = [], 0
        for key, fields in samples.items():
            image = next((fields[f] for f in fields if f.rsplit(".", 1)[-1] in SHARD_IMAGE_FIELDS), None)
            if image is None:
                no_image += 1
                continue
            out.append((key, _label(tf, fields), image.offset_data, image.size))
    if no_image:
        _logger.warning("%d samples of '%s' have no image member (%s); ignored", no_image, path, "/".join(SHARD_IMAGE_FIELDS))
    return out


def _class_list(path: Path, labels: list[str]) -> list[str] | None:
    """The class names of integer labels, one per line of ``path`` (line k names label k); None without the file."""
    if not path.is_file():
        return None
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise FeatxError(f"cannot read the class names in '{path}': {e}") from None
    if len(set(names)) != len(names) or not names:
        raise FeatxError(f"'{path}' must name every class once, one per line (line k names the integer label k)")
    bad = sorted({y for y in labels if y and not (y.isdigit() and int(y) < len(names))}, key=natural_key)
    if bad:
        raise FeatxError(f"'{path}' names the integer labels 0..{len(names) - 1}, but the shards hold the label(s) "
                         f"{', '.join(bad[:5])}; list one name per label, or remove the file to use the labels as they are")
    _logger.info("class names of the shards' integer labels from '%s' (%d classes)", path, len(names))
    return names


def tar_source(paths: list[Path], name: str, split: str | None = None) -> ImageSource:
    """An :class:`ImageSource` over the samples of ``paths`` (ids ``<shard>/<key>``), split per shard or ``split``."""
    ids, labels, splits, shard, offset, size = [], [], [], [], [], []
    for k, path in enumerate(paths):
        shard_split = split or _shard_split(path)
        for key, label, off, n in _index_shard(path):
            ids.append(f"{path.stem}/{key}")
            labels.append(label)
            splits.append(shard_split)
            shard.append(k)
            offset.append(off)
            size.append(n)
    if not ids:
        raise FeatxError(f"no images found in the tar shards of '{name}' (members ending in {', '.join(SHARD_IMAGE_FIELDS)})")
    class_names = _class_list(paths[0].parent / CLASS_LIST, labels)
    if class_names is not None:
        labels = [class_names[int(y)] if y else "" for y in labels]
    else:
        class_names = sorted({y for y in labels if y}, key=natural_key)
    index = {c: i for i, c in enumerate(class_names)}
    return ImageSource(
        name=name,
        ids=ids,
        labels=np.array([index[y] if y else UNLABELED for y in labels], dtype=np.int64),
        splits=splits,
        class_names=class_names,
        root=paths[0].parent,
        tar=TarMembers([str(p) for p in paths], np.array(shard, np.int32), np.array(offset, np.int64), np.array(size, np.int64)),
    )
