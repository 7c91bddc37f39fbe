"""What a new user met on a fresh clone, round two (issue 'Tried as a new user would, round two'): each report reproduced, then fixed."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone

from conftest import make_image_folder
from featx.cli import main
from featx.errors import FeatxError

pytestmark = pytest.mark.usefixtures("one_thread_module")
FAST = ["--img-size", "32", "--workers", "0", "--no-progress"]
ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, command, *fragments):
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"featx {command}: error: "), err
    for f in fragments:
        assert f in last, last
    return last


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def store(tmp_path_factory, one_thread_module):
    """train 3 x 6 / test 3 x 3 images through a random test_resnet (asked for by name), and a logreg head on them."""
    root = tmp_path_factory.mktemp("r2")
    imgs = make_image_folder(root / "imgs", per_class=6, splits=("train",))
    make_image_folder(imgs, per_class=3, splits=("test",), seed=1000)
    assert main(["extract", str(imgs), "--model", "test_resnet", "--weights", "random", "--out", str(root / "f.h5"), *FAST]) == 0
    assert main(["fit-head", str(root / "f.h5"), "--head", "logreg", "--out", str(root / "head")]) == 0
    return root


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shards_of(folder: Path, out: Path, names: list[str], label=lambda cls: cls.encode(), label_ext: str = "txt") -> list[Path]:
    """The images of ``folder/<class>/*.png`` dealt round-robin into shards ``out/<name>.tar``."""
    files = sorted(p for p in folder.rglob("*.png"))
    return [_tar(out / f"{name}.tar", {m: d for f in files[k::len(names)] for m, d in (
        (f"{f.parent.name}-{f.stem}.png", f.read_bytes()), (f"{f.parent.name}-{f.stem}.{label_ext}", label(f.parent.name)))})
        for k, name in enumerate(names)]


# -- 1. nested brace patterns ---------------------------------------------------------------------------------
def test_nested_braces_expand_in_bash_order_and_a_shard_named_twice_is_refused(tmp_path, capsys):
    from featx.sources import expand_braces, resolve_source

    assert expand_braces("s/{train-{000000..000001},test-000000}.tar") == ["s/train-000000.tar", "s/train-000001.tar", "s/test-000000.tar"]
    assert expand_braces("a{b,c{d,e}f}g") == ["abg", "acdfg", "acefg"]  # bash: echo a{b,c{d,e}f}g
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    _shards_of(folder, tmp_path / "s", ["train-000000", "train-000001", "test-000000"])
    src = resolve_source(str(tmp_path / "s" / "{train-{000000..000001},test-000000}.tar"))
    assert len(src) == 12 and len(set(src.ids)) == 12 and src.split_names == ["train", "test"]
    for pattern in ("{train-000000,train-000000}.tar", "train-00000{0,0}.tar"):
        with pytest.raises(FeatxError, match="names the shard .* twice"):
            resolve_source(str(tmp_path / "s" / pattern))
    rc, _, err = run(capsys, "extract", tmp_path / "s" / "train-00000{0,0}.tar", "--model", "test_resnet", "--weights", "random",
                     "--out", tmp_path / "f.h5", *FAST)
    one_line_error(rc, err, "extract", "twice", "name every shard once")
    assert not list(tmp_path.glob("f.h5*"))


# -- 2. no weights named ----------------------------------------------------------------------------------------
def test_extract_without_weights_is_refused_and_random_weights_are_asked_for_by_name(tmp_path, capsys):
    from featx import ExtractConfig, extract

    imgs = make_image_folder(tmp_path / "imgs", per_class=2)
    before = files_under(tmp_path)
    rc, _, err = run(capsys, "extract", imgs, "--model", "test_resnet", "--out", tmp_path / "f.h5", *FAST)
    one_line_error(rc, err, "extract", "--weights", "--pretrained", "--weights random")
    with pytest.raises(FeatxError, match="no weights for 'test_resnet'"):
        extract(str(imgs), ExtractConfig(model="test_resnet", img_size=32, progress=False), tmp_path / "f.h5")
    rc, _, err = run(capsys, "compare", imgs, "--model", "test_resnet", "--out", tmp_path / "cmp", *FAST)
    one_line_error(rc, err, "compare", "names no weights", "test_resnet=WEIGHTS", "'random'")
    assert files_under(tmp_path) == before and not (tmp_path / "cmp").exists()
    rc, out, err = run(capsys, "extract", imgs, "--model", "test_resnet", "--weights", "random", "--out", tmp_path / "f.h5", *FAST)
    assert rc == 0, err
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["test_resnet"].attrs["weights"] == "random"
    assert "Features (96-dimensional) are in" in out  # the summary names the feature dimension
    assert "96-dimensional" in run(capsys, "extract", imgs, "--model", "test_resnet", "--weights", "random", "--out",
                                   tmp_path / "f.h5", *FAST)[1]  # the cache hit too


def test_extract_help_names_package_and_random_weights(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'package': the EfficientNet-Lite0/1/2 ImageNet weights" in text and "'random'" in text


# -- 3. an output that cannot be written ----------------------------------------------------------------------------
def _refuses_files(folder: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(fd)
    os.unlink(probe)
    return False


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder in which no file can be created: read-only for a normal user; for root (who may write anywhere) /proc."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        chosen = next((f for f in (folder, Path("/proc")) if _refuses_files(f)), None)
        if chosen is None:
            pytest.skip("no folder here refuses new files")
        yield chosen
    finally:
        folder.chmod(0o755)


def test_unwritable_outputs_are_refused_in_one_line_before_any_work(store, unwritable, tmp_path, capsys, monkeypatch):
    import featx.embedder
    import featx.fitting._workflow

    def no_work(*a, **k):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(featx.embedder.ImageEmbedder, "fit", no_work)  # predict and compare embed nothing
    monkeypatch.setattr(featx.fitting._workflow, "plan_fit", no_work)  # fit-head reads nothing
    cases = [
        ("fit-head", [store / "f.h5", "--head", "ridge", "--out", unwritable / "head"], "--out"),
        ("evaluate", [store / "head", store / "f.h5", "--out-dir", unwritable / "eval"], "--out-dir"),
        ("predict", [store / "head", store / "imgs", "--out", unwritable / "p.csv", "--workers", "0"], "--out"),
        ("compare", [store / "imgs", "--model", "test_resnet=random", "--out", unwritable / "cmp", *FAST], "--out"),
        ("predict", [store / "head", store / "imgs", "--out", store / "imgs" / "test" / "class0" / "000.png" / "p.csv"], "--out"),
    ]
    before = files_under(store)
    for command, args, option in cases:
        rc, out, err = run(capsys, command, *args)
        one_line_error(rc, err, command, f"cannot write {option}")
    assert files_under(store) == before
    from featx.evaluation import evaluate_head  # the library says the same to its callers

    with pytest.raises(FeatxError, match="cannot write --out-dir"):
        evaluate_head(store / "head", store / "f.h5", out_dir=unwritable / "eval")


# -- 4. group names HDF5 cannot hold ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key, fragment", [("a/b", "contains '/'"), (".", "is '.'"), ("", "is empty"), ("  ", "is empty")])
def test_a_key_hdf5_cannot_hold_is_refused_before_extracting(tmp_path, capsys, monkeypatch, key, fragment):
    import featx.embedder

    def no_work(*a, **k):
        raise AssertionError("extraction started")

    monkeypatch.setattr(featx.embedder.ImageEmbedder, "fit", no_work)
    imgs = make_image_folder(tmp_path / "imgs", per_class=2)
    rc, _, err = run(capsys, "extract", imgs, "--model", "test_resnet", "--weights", "random", "--key", key, "--out",
                     tmp_path / "f.h5", *FAST)
    one_line_error(rc, err, "extract", fragment, "--key NAME")
    assert not list(tmp_path.glob("f.h5*"))


# -- 5. the README's compare example from a clone ---------------------------------------------------------------------
def test_cifar_subset_takes_the_archive_or_folder_as_an_argument(tmp_path):
    data = tmp_path / "cifar10-jpeg"
    for split, n in (("train", 3), ("test", 2)):
        make_image_folder(data / split, n_classes=2, per_class=n, ext=".jpg")
    script = [sys.executable, str(ROOT / "benchmarks" / "cifar_subset.py"), "--train", "2", "--test", "1"]
    for given in (data, tmp_path):  # the unpacked folder, or the folder holding it
        done = subprocess.run(script + ["--out", str(tmp_path / "s.csv"), "--cifar-tar", str(given)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rows = (tmp_path / "s.csv").read_text().splitlines()
        assert rows[0] == "path,label,split" and len(rows) == 1 + 2 * 2 + 2 * 1
    done = subprocess.run(script + ["--out", str(tmp_path / "t.csv"), "--cifar-tar", str(tmp_path / "missing.tar.gz")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "--cifar-tar" in done.stderr and "Traceback" not in done.stderr


# -- 6. a sweep's choice that moved with the thread count ------------------------------------------------------------
class _Replayed(ClassifierMixin, BaseEstimator):
    """A head whose fit at C gets a fixed set of rows wrong: X holds [row id, true label], ``wrong`` maps C to row ids."""

    def __init__(self, C: float = 1.0, wrong: dict | None = None):
        self.C = C
        self.wrong = wrong

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def fit_grid(self, X, y, grid):
        return [clone(self).set_params(**entry).fit(X, y) for entry in grid]

    def predict(self, X):
        ids, labels = X[:, 0].astype(int), X[:, 1].astype(int)
        return np.where(np.isin(ids, (self.wrong or {}).get(self.C, [])), (labels + 1) % 3, labels)


def test_a_flat_curve_gives_the_same_choice_when_single_validation_rows_flip():
    """The demo chose C=10 with 2 threads and C=316 with one: on its flat curve (288 validation rows) the top moved by a
    row or two from run to run. Entries the validation rows cannot tell from the best (exact McNemar, p >= 0.05) are
    ties; their middle is the choice, and it stays where it is when single rows flip."""
    from sklearn.pipeline import Pipeline

    from featx.heads import SweptHead
    from featx.heads._sweep import validation_split

    y = np.repeat([0, 1, 2], 100)
    X = np.stack([np.arange(len(y)), y], 1).astype(np.float32)
    val = validation_split(y, 0.2, 0)[1]
    Cs = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]

    def choose(n_wrong):
        wrong = {C: val[:n].tolist() for C, n in zip(Cs, n_wrong)}  # nested: one more error is one more row
        swept = SweptHead(Pipeline([("head", _Replayed(wrong=wrong))]), [{"C": C} for C in Cs], random_state=0).fit(X, y)
        return swept.result_

    one_thread, two_threads = choose([25, 10, 4, 4, 3, 4]), choose([25, 10, 3, 4, 4, 4])  # the top moved by one row
    assert one_thread.best == two_threads.best == {"C": 10.0} and one_thread.n_tied == two_threads.n_tied == 4
    assert [bool(c.get("tied")) for c in one_thread.curve] == [False, False, True, True, True, True]
    clear = choose([25, 10, 0, 12, 12, 12])  # 12 rows apart is no noise: the best stands alone
    assert clear.best == {"C": 0.1} and clear.n_tied == 1


# -- 9. odd CSV rows --------------------------------------------------------------------------------------------------
def test_odd_csv_rows_and_columns_are_counted_with_their_lines(tmp_path, caplog):
    from featx.sources import resolve_source

    make_image_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "m.csv").write_text("path,label,notes\nimgs/class0/000.png,a,x\n,b,y\nimgs/class1/000.png,b,y,extra\n\n"
                                    "imgs/class1/001.png,b,\n\"\",c,\n")
    (tmp_path / "p.csv").write_text("path\nimgs/class0/000.png\n  \nimgs/class0/001.png,imgs/class1/000.png\n")
    with caplog.at_level(logging.WARNING):
        src, paths_only = resolve_source(tmp_path / "m.csv"), resolve_source(tmp_path / "p.csv")
    assert len(src) == 3 and len(paths_only) == 2
    text = caplog.text
    assert "2 rows of" in text and "have an empty path and are skipped: lines 3, 7" in text
    assert "more values than the header (the extra values are ignored): line 4" in text
    assert "columns notes of" in text and "are not read" in text
    assert "empty path and are skipped: line 3" in text and "more values than the header (the extra values are ignored): line 4" in text


# -- messages ---------------------------------------------------------------------------------------------------------
def test_suggested_commands_name_the_real_store_and_quote_paths_with_spaces(tmp_path, capsys):
    spaced = tmp_path / "my features"
    spaced.mkdir()
    imgs = make_image_folder(tmp_path / "imgs", per_class=4)
    assert main(["extract", str(imgs), "--model", "test_resnet", "--weights", "random", "--out", str(spaced / "f.h5"), *FAST]) == 0
    capsys.readouterr()
    rc, out, err = run(capsys, "fit-head", spaced / "f.h5", "--head", "ridge", "--out", spaced / "my head")
    assert rc == 0, err
    assert f"""evaluate with 'featx evaluate "{spaced / 'my head'}" "{spaced / 'f.h5'}"'""" in out
    assert "96-dimensional" in out and "FEATURES.h5" not in out
    rc, _, err = run(capsys, "evaluate", spaced / "missing head", spaced / "f.h5")
    one_line_error(rc, err, "evaluate", f'--out "{spaced / "missing head"}"')


def test_an_image_folder_where_a_store_or_a_head_belongs_is_named_as_such(store, tmp_path, capsys):
    imgs = store / "imgs"
    before = files_under(store)
    rc, _, err = run(capsys, "fit-head", imgs, "--head", "ridge", "--out", tmp_path / "h")
    last = one_line_error(rc, err, "fit-head", "is an image folder, not a feature store", "featx extract")
    assert "does not exist" not in last
    rc, _, err = run(capsys, "predict", imgs, store / "head", "--out", tmp_path / "p.csv")  # the arguments swapped
    last = one_line_error(rc, err, "predict", "is an image folder, not a head folder", "HEAD_DIR")
    assert f"--out {imgs}" not in last  # never suggests writing a head into the images
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    rc, _, err = run(capsys, "evaluate", tmp_path / "notes", store / "f.h5")
    last = one_line_error(rc, err, "evaluate", "holds no featx head")
    assert "--out HEAD_DIR" in last and f"--out {tmp_path / 'notes'}" not in last
    assert files_under(store) == before and (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_sweep_messages_say_what_was_done_once_and_for_which_head(store, tmp_path, capsys, caplog, monkeypatch):
    import featx.heads._sweep as sweep_module

    rc, out, err = run(capsys, "fit-head", store / "f.h5", "--head", "logreg", "--sweep", "--param", "solver=sklearn",
                       "--out", tmp_path / "sk")
    assert rc == 0, err
    assert "Sweep (one fit per value" in out and "one batched pass" not in out
    with caplog.at_level(logging.INFO):
        rc, out, err = run(capsys, "fit-head", store / "f.h5", "--head", "ncm", "--sweep", "--out", tmp_path / "ncm")
    assert rc == 0 and (out + caplog.text).lower().count("nothing to sweep") == 1
    edge = {"param": "alpha", "value": 1e6, "side": "high", "next": 3.16e6}  # whatever this tiny set's curve: an edge
    monkeypatch.setattr(sweep_module, "grid_edges", lambda grid, best, scores: [edge])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc, out, err = run(capsys, "compare", store / "f.h5", "--heads", "ridge", "--out", tmp_path / "cmp", "--no-progress")
    assert rc == 0, err
    edges = [r.getMessage() for r in caplog.records if "grid" in r.getMessage()]
    assert edges == ["'ridge' on 'test_resnet': the chosen alpha=1e+06 is the largest value of the grid; the best may lie above it: "
                     "extend the grid to 3.16e+06 (--param alpha=VALUE fits one value)"], edges
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc, out, err = run(capsys, "fit-head", store / "f.h5", "--head", "ridge", "--sweep", "--out", tmp_path / "ridge")
    assert rc == 0 and (out + caplog.text).count("extend the grid") == 1  # said once, not again in the summary


def test_a_garbage_checkpoint_is_refused_without_torchs_advice_to_load_it_unsafely(tmp_path, capsys):
    from fractions import Fraction

    torch.save({"weights": Fraction(1, 3)}, tmp_path / "pickled.pth")  # an object, not a tensor: pickled
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x04garbage")
    imgs = make_image_folder(tmp_path / "imgs", per_class=2)
    for name in ("pickled.pth", "garbage.pth"):
        rc, _, err = run(capsys, "extract", imgs, "--model", "test_resnet", "--weights", tmp_path / name, "--out", tmp_path / "f.h5", *FAST)
        last = one_line_error(rc, err, "extract", "not a file of plain tensors", "re-save it as a plain state dict")
        assert "weights_only=False" not in last and "weights_only` set to `False" not in last


def test_compare_with_weights_no_package_holds_leaves_no_folder(tmp_path, capsys):
    imgs = make_image_folder(tmp_path / "imgs", per_class=2)
    rc, _, err = run(capsys, "compare", imgs, "--model", "resnet18=package", "--out", tmp_path / "cmp", *FAST)
    one_line_error(rc, err, "compare", "no packaged weights for 'resnet18'")
    assert not (tmp_path / "cmp").exists()


def test_integer_shard_labels_take_their_names_from_classes_txt(store, tmp_path, capsys):
    names = ["class0", "class1", "class2"]
    _shards_of(store / "imgs" / "test", tmp_path / "s", ["test-000000"], label=lambda cls: str(names.index(cls)).encode(),
               label_ext="cls")
    (tmp_path / "s" / "classes.txt").write_text("\n".join(names) + "\n")
    rc, _, err = run(capsys, "extract", tmp_path / "s" / "test-000000.tar", "--model", "test_resnet", "--weights", "random",
                     "--out", tmp_path / "shards.h5", *FAST)
    assert rc == 0, err
    rc, out, err = run(capsys, "evaluate", store / "head", tmp_path / "shards.h5", "--split", "test", "--out-dir", tmp_path / "ev",
                       "--json")
    assert rc == 0, err  # the head fitted on the folder scores the shards: same class names
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 9
    (tmp_path / "s" / "classes.txt").write_text("class0\nclass1\n")
    rc, _, err = run(capsys, "extract", tmp_path / "s" / "test-000000.tar", "--model", "test_resnet", "--weights", "random",
                     "--out", tmp_path / "two.h5", *FAST)
    one_line_error(rc, err, "extract", "classes.txt", "label(s) 2")


def test_readme_says_what_the_help_says_about_preprocessing_and_position_loading():
    readme = (ROOT / "README.md").read_text()
    assert "(`--preprocess auto`" in readme and "(`--preprocess device`)" not in readme
    assert "by position, with a notice" not in readme and "`weights_load`" in readme
