"""WebDataset tar shards as a source: the same features as the same images in a folder, labels, splits, ranks' shares."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from featx import ExtractConfig, FeatureStore, extract, load_features
from featx.distributed import contiguous_shares
from featx.errors import FeatxError
from featx.sources import expand_braces, resolve_source

from conftest import make_image_folder


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, out_dir: Path, prefix: str = "train", n_shards: int = 2, *, unlabeled: tuple[str, ...] = ()) -> list[Path]:
    """The images of ``folder`` (``<class>/<name>``) as WebDataset shards: key ``<class>/<stem>``, label as txt, cls or json."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(n_shards):
        path = out_dir / f"{prefix}-{k:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for j, f in enumerate(files[k::n_shards]):
                rel = f.relative_to(folder)
                key = f"{rel.parent.as_posix()}/{f.stem}"
                _add(tar, f"{key}{f.suffix}", f.read_bytes())
                if rel.as_posix() in unlabeled:
                    continue
                cls = rel.parts[0]
                if j % 3 == 0:
                    _add(tar, f"{key}.txt", cls.encode())
                elif j % 3 == 1:
                    _add(tar, f"{key}.json", json.dumps({"label": cls, "note": "x"}).encode())
                else:
                    _add(tar, f"{key}.cls", cls.encode())  # not an integer: used as the class name
        shards.append(path)
    return shards


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"model": "test_resnet", "weights": "random", "batch_size": 4, "img_size": 64, "workers": 0, "progress": False, **kw})


def test_shards_give_the_features_of_the_same_images_in_a_folder(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    (folder / "class1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    shards = write_shards(folder, tmp_path / "shards", unlabeled=("class2/001.png",))
    spec = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    src = resolve_source(spec)
    assert len(src) == 13 and src.class_names == ["class0", "class1", "class2"] and set(src.splits) == {"train"}
    assert src.ids[0].startswith("train-000000/class") and all(i.split("/", 1)[0] in ("train-000000", "train-000001") for i in src.ids)
    extract(str(folder), _cfg(), tmp_path / "folder.h5")
    extract(spec, _cfg(), tmp_path / "shards.h5")
    a, b = load_features(tmp_path / "folder.h5"), load_features(tmp_path / "shards.h5")
    assert len(a) == len(b) == 12
    by_id = {i: k for k, i in enumerate(a.ids)}
    order = [by_id[i.split("/", 1)[1] + ".png"] for i in b.ids]
    assert np.allclose(b.X, a.X[order], atol=1e-5) and np.array_equal(b.digests, a.digests[order])
    unlabeled = b.ids.tolist().index(next(i for i in b.ids if i.endswith("class2/001")))
    assert b.y[unlabeled] == -1 and np.array_equal(np.delete(b.y, unlabeled), np.delete(a.y[order], unlabeled))
    with FeatureStore(tmp_path / "shards.h5") as s, FeatureStore(tmp_path / "folder.h5") as f:
        (shard_id, reason), = s.skipped()
        assert shard_id.endswith("/class1/corrupt") and [reason] == [r for _, r in f.skipped()]
    assert shards[0].stat().st_size > 0 and not (tmp_path / "shards" / "class0").exists()  # read by offset, nothing unpacked


def test_labels_from_cls_txt_json_and_splits_from_shard_names(tmp_path):
    shard = tmp_path / "s" / "val-000000.tar"
    shard.parent.mkdir()
    png = (make_image_folder(tmp_path / "one", n_classes=1, per_class=1) / "class0" / "000.png").read_bytes()
    with tarfile.open(shard, "w") as tar:
        for key, extra in [("a", ("cls", b"10")), ("b", ("cls", b"2")), ("c", ("txt", b"2\n")), ("d", ("json", b"7")),
                           ("e", ("json", b"{bad")), ("f", None), ("g.x", ("jpg", png))]:
            _add(tar, f"{key}.png" if key != "g.x" else "g.x.webp", png)
            if extra:
                _add(tar, f"{key}.{extra[0]}", extra[1])
        _add(tar, "h.txt", b"no image")  # a sample without an image is ignored
        _add(tar, "._hidden.png", png)  # not a sample (a file name starting with a dot)
    train = tmp_path / "s" / "train-000000.tar"
    with tarfile.open(train, "w") as tar:
        _add(tar, "z.png", png)
        _add(tar, "z.cls", b"10")
    src = resolve_source(tmp_path / "s")
    assert src.ids == ["train-000000/z", "val-000000/a", "val-000000/b", "val-000000/c", "val-000000/d", "val-000000/e",
                       "val-000000/f", "val-000000/g"]
    assert src.class_names == ["2", "7", "10"]  # natural order of the label texts
    assert src.labels.tolist() == [2, 2, 0, 0, 1, -1, -1, -1]
    assert src.splits == ["train"] + ["val"] * 7
    assert resolve_source(tmp_path / "s", split="extra").split_names == ["extra"]
    assert np.asarray(src.load(1)).shape[2] == 3


def test_ranks_get_whole_shards(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    write_shards(folder, tmp_path / "shards", n_shards=4)
    src = resolve_source(tmp_path / "shards")
    starts = src.shard_starts()
    assert starts.tolist() == [0, 3, 6, 9]
    shares = contiguous_shares(len(src), 2, starts)
    assert shares == [(0, 6), (6, 12)]
    for a, b in shares:
        assert len(set(src.tar.shard[a:b].tolist()) & set(np.delete(src.tar.shard, np.arange(a, b)).tolist())) == 0


def test_brace_patterns_and_bad_shards(tmp_path):
    assert expand_braces("s/train-{000..002}.tar") == ["s/train-000.tar", "s/train-001.tar", "s/train-002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    with pytest.raises(FeatxError, match="2 of 3 shards .* do not exist"):
        (tmp_path / "t-0.tar").write_bytes(b"")
        resolve_source(str(tmp_path / "t-{0..2}.tar"))
    (tmp_path / "x.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(FeatxError, match="cannot read tar shard"):
        resolve_source(tmp_path / "x.tar")
    with pytest.raises(FeatxError, match="not an uncompressed .tar shard"):
        (tmp_path / "y-0.tar.gz").write_bytes(b"")
        resolve_source(str(tmp_path / "y-{0..0}.tar.gz"))
