"""featx audit: injected label flips and near-duplicates are found, cleanlab gets out-of-fold probabilities only,
a pair across splits is reported once, bad input gives one line, fit-head and compare point to the audit."""

from __future__ import annotations

import json
import shutil
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from featx import AuditConfig, CompareConfig, ExtractConfig, audit, compare, extract
from featx.auditing import _labels, _page
from featx.cli import main
from featx.configs import NEAR_DUPLICATE_COSINE, NEAR_DUPLICATE_PIXELS
from featx.heads import blocked_top_k, near_duplicate_count, unit_rows
from featx.splits import stratified_folds

from conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread_module")


def write_store(path, X, labels, ids, splits, class_names, *, key="feats", digests=None):
    """A one-file feature store (the layout featx 0.1 wrote, which the reader still reads)."""
    names = list(dict.fromkeys(splits))
    with h5py.File(path, "w") as f:
        g = f.create_group(key)
        g["features"] = np.asarray(X, dtype=np.float32)
        g["labels"] = np.asarray(labels, dtype=np.int64)
        g.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        g["split"] = np.array([names.index(s) for s in splits], dtype=np.int8)
        if digests is not None:
            g["digest"] = np.array(digests, dtype="S32")
        g.attrs.update({"model": "synthetic", "weights_sha256": "0" * 64, "class_names": json.dumps(class_names),
                        "split_names": json.dumps(names), "num_params": 1, "images_per_s": 100.0, "image_list_sha256": "x"})
    return path


def faulty_blobs(n_per=100, n_test=25, K=4, dim=256, n_flips=20, n_copies=10, seed=0):
    """Gaussian classes (train and test) with ``n_flips`` training labels flipped and near-copies of ``n_copies`` test rows
    added to train; returns (arrays for write_store, flipped ids -> true class, [(copy id, original id)])."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.25, (K, dim))
    y_tr, y_te = np.repeat(np.arange(K), n_per), np.repeat(np.arange(K), n_test)
    X_tr = centres[y_tr] + rng.normal(0, 1, (len(y_tr), dim))
    X_te = centres[y_te] + rng.normal(0, 1, (len(y_te), dim))
    given = y_tr.copy()
    flipped = rng.choice(len(y_tr), n_flips, replace=False)
    given[flipped] = (y_tr[flipped] + rng.integers(1, K, n_flips)) % K
    picked = rng.choice(len(y_te), n_copies, replace=False)
    X_copies = X_te[picked] + rng.normal(0, 0.05, (n_copies, dim))
    ids = [f"train/{i}" for i in range(len(y_tr))] + [f"train/copy{j}" for j in range(n_copies)] + [f"test/{i}" for i in range(len(y_te))]
    X = np.concatenate([X_tr, X_copies, X_te])
    labels = np.concatenate([given, y_te[picked], y_te])
    splits = ["train"] * (len(y_tr) + n_copies) + ["test"] * len(y_te)
    return ((X, labels, ids, splits, [f"c{k}" for k in range(K)]), {f"train/{i}": int(y_tr[i]) for i in flipped},
            [(f"train/copy{j}", f"test/{i}") for j, i in enumerate(picked)])


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, one_thread_module):
    arrays, flips, copies = faulty_blobs()
    return write_store(tmp_path_factory.mktemp("faulty") / "faulty.h5", *arrays), flips, copies


def _config(**kw):
    return AuditConfig(device="cpu", progress=False, **kw)


def test_blocked_search_is_exact_with_many_blocks():
    rng = np.random.default_rng(1)
    X = unit_rows(rng.normal(size=(240, 12)))
    X[9] = X[4]  # an exact duplicate: found, though a row is never its own neighbour
    rows = np.arange(240)
    sims, idx = blocked_top_k(lambda r: X[r], rows, rows, 4, budget_bytes=12 * 4 * 2 * 25, device="cpu")  # blocks of 25 rows
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    assert np.allclose(sims, -np.sort(-S, axis=1)[:, :4], atol=1e-6)
    assert not (idx == rows[:, None]).any() and idx[4, 0] == 9 and idx[9, 0] == 4


def test_near_duplicate_count_without_torch_matches_the_blocked_search():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 12))
    X[200:230] = X[:30] + 0.05 * rng.normal(size=(30, 12))  # 30 queries with a close training row
    X = unit_rows(X)
    queries, reference = np.arange(150, 300), np.arange(0, 200)  # overlapping: a row is not its own near-duplicate
    for budget in (10**9, 12 * 4 * 8 * 20):  # one block, blocks of 20 rows
        sims, _ = blocked_top_k(lambda r: X[r], queries, reference, 1, budget_bytes=budget, device="cpu")
        expected = int((sims[:, 0] >= 0.95).sum())
        assert expected >= 30
        assert near_duplicate_count(lambda r: X[r], queries, reference, 0.95, budget_bytes=budget, device="cpu") == expected


def test_audit_finds_injected_flips_and_near_duplicates(faulty, tmp_path):
    store, flips, copies = faulty
    result = audit(store, _config(), tmp_path / "audit")
    pairs = {frozenset((p["a"], p["b"])): p for p in result.duplicates}
    assert {frozenset(c) for c in copies} == set(pairs)  # every copy found, nothing else (Gaussian rows are far apart)
    assert all(p["across_splits"] and {p["a_split"], p["b_split"]} == {"train", "test"} for p in pairs.values())
    assert result.cross_counts()["test_rows_with_training_duplicate"] == len(copies)
    suspects = result.labels.suspects
    top = [s["id"] for s in suspects[: len(flips)]]
    assert sum(i in flips for i in top) >= 0.7 * len(flips)
    found = [s for s in suspects if s["id"] in flips]
    assert len(found) >= 0.7 * len(flips)
    assert sum(s["suggested"] == f"c{flips[s['id']]}" for s in found) >= 0.8 * len(found)
    assert all(s["given"] != s["suggested"] for s in found)
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["near_duplicates"]["threshold"] == NEAR_DUPLICATE_COSINE and saved["near_duplicates"]["n_across_splits"] == len(copies)
    assert saved["label_issues"]["n_suspects"] == len(suspects) and saved["label_issues"]["suspects"][0]["suggested"]
    assert "fence" in saved["outliers"] and saved["confusable_pairs"]["pairs"]
    md = (tmp_path / "audit" / "audit.md").read_text()
    assert "## Likely label errors" in md and top[0] in md


def _spied_fold_run(monkeypatch, X, y, folds):
    """Run the out-of-fold probabilities and cleanlab through spies; (rows each fit trained on, cleanlab's pred_probs)."""
    import cleanlab.filter

    import featx.heads

    monkeypatch.setattr(_labels, "stratified_folds", folds)
    trained, received = [], []
    real_sweep, real_find = featx.heads.sweep, cleanlab.filter.find_label_issues

    def sweep(pipeline, X_train, y_train, grid, **kw):
        trained.append({row.tobytes() for row in X_train})
        return real_sweep(pipeline, X_train, y_train, grid, **kw)

    def find_label_issues(*, labels, pred_probs, **kw):
        received.append(pred_probs.copy())
        return real_find(labels=labels, pred_probs=pred_probs, **kw)

    monkeypatch.setattr(featx.heads, "sweep", sweep)
    monkeypatch.setattr(cleanlab.filter, "find_label_issues", find_label_issues)
    probs, _ = _labels.out_of_fold_probabilities(X, y, folds=5, seed=0, device="cpu")
    ranked, _ = _labels.label_issues(y, probs)
    return trained, received[0], probs, ranked


def test_cleanlab_gets_out_of_fold_probabilities_and_a_poisoned_split_shows_why(monkeypatch):
    (X, labels, ids, splits, _), flips, _ = faulty_blobs(n_copies=0)
    train = np.array([s == "train" for s in splits])
    X, y = X[train].astype(np.float32), labels[train]
    flipped = np.array([i in flips for i in np.asarray(ids)[train]])
    used = []

    def recording(y_, n, seed):
        used.extend(stratified_folds(y_, n, seed))
        return used

    trained, received, probs, ranked = _spied_fold_run(monkeypatch, X, y, recording)
    assert np.array_equal(received, probs)  # cleanlab ranks exactly these probabilities
    for rows_seen, (_, held) in zip(trained, used):  # ... and each row's came from a fit that never saw the row
        assert not rows_seen & {X[i].tobytes() for i in held}
    assert sorted(np.concatenate([held for _, held in used]).tolist()) == list(range(len(y)))
    oof_recall = flipped[ranked].sum() / flipped.sum()

    def poisoned(y_, n, seed):  # every held-out fold is also trained on: in-sample probabilities
        return [(np.arange(len(y_)), held) for _, held in stratified_folds(y_, n, seed)]

    trained, received, _, ranked = _spied_fold_run(monkeypatch, X, y, poisoned)
    assert all(len(rows) == len(y) for rows in trained)
    in_sample_recall = flipped[ranked].sum() / flipped.sum()
    assert oof_recall >= 0.7 and in_sample_recall <= 0.4, (oof_recall, in_sample_recall)  # memorised flips look right


def test_a_near_duplicate_across_splits_is_reported_once_with_both_ids(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(12, 32))
    X[11] = X[2]  # test row 11 is training row 2 (same bytes)
    X[5] = X[1] * 1.5  # a rescaled copy within train: cosine 1
    ids = [f"img{i}.png" for i in range(12)]
    digests = [f"{i:032x}" for i in range(12)]
    digests[11] = digests[2]
    store = write_store(tmp_path / "s.h5", X, [0, 1] * 6, ids, ["train"] * 8 + ["test"] * 4, ["a", "b"], digests=digests)
    result = audit(store, _config(k=3, folds=2), tmp_path / "out")
    assert [(p["a"], p["b"], p["across_splits"], p["identical_bytes"]) for p in result.duplicates] == [
        ("img1.png", "img5.png", False, False), ("img2.png", "img11.png", True, True)]
    assert result.cross_counts() == {"pairs_by_splits": {"train|train": 1, "test|train": 1}, "test_rows_with_training_duplicate": 1}


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_input_gives_one_line_each(tmp_path, capsys, caplog, monkeypatch):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 16))
    ids, splits = [f"i{i}" for i in range(30)], ["train"] * 30

    def notes(store, out):
        caplog.clear()
        rc, stdout, err = _run(capsys, "audit", store, "--out", tmp_path / out, "--device", "cpu", "--no-progress")
        assert rc == 0, err
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "thumbnails" not in r.getMessage()]
        assert all("\n" not in n and len(n) < 300 for n in said)
        return stdout, said

    out, said = notes(write_store(tmp_path / "u.h5", X, [-1] * 30, ids, splits, []), "u")
    assert said == ["no labels: label checks and same-class outlier distances skipped; near-duplicates and any-class outliers only"]
    assert "label issues: skipped (the store has no labels)" in out and "outliers (distance to the 10-th neighbour" in out
    saved = json.loads((tmp_path / "u" / "audit.json").read_text())
    assert saved["label_issues"]["skipped"] == "the store has no labels" and "flagged" in saved["outliers"]
    one_class = write_store(tmp_path / "one.h5", X, [0] * 30, ids, splits, ["only"])
    _, said = notes(one_class, "one")
    assert len(said) == 1 and "the training split holds a single class ('only')" in said[0]
    few = write_store(tmp_path / "few.h5", X, [0] * 12 + [1] * 12 + [2] * 3 + [3] * 3, ids, splits, list("abcd"))
    _, said = notes(few, "few")
    assert said == ["classes with 10 images or fewer have no same-class outlier distance (k=10): c (3), d (3)",
                    "classes with fewer than 5 training images are left out of the label checks: c (3), d (3)"]
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # not installed: the other checks still run
    _, said = notes(few, "no-cleanlab")
    assert said[-1] == "label checks skipped: cleanlab is not installed (pip install 'featx[audit]')"
    monkeypatch.undo()
    for argv, fragment in [(["--source", tmp_path / "nowhere"], "does not exist"), (["--threshold", "1.5"], "--threshold"),
                           (["--out", tmp_path / "u.h5"], "is a file")]:
        rc, _, err = _run(capsys, "audit", few, "--out", tmp_path / "x", *argv)
        assert rc == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("featx audit: error: ")
        assert fragment in err.strip().splitlines()[-1]
    rc, _, err = _run(capsys, "audit", one_class, "--out", tmp_path / "few", "--no-progress")  # another store's audit is kept
    assert rc == 2 and "holds an audit of other features" in err and (tmp_path / "few" / "audit.json").is_file()


def test_fit_head_and_compare_mention_the_audit_when_near_duplicates_cross_train_and_test(faulty, tmp_path, capsys):
    store, _, copies = faulty
    rc, out, err = _run(capsys, "fit-head", store, "--head", "ncm", "--out", tmp_path / "h", "--json")
    assert rc == 0, err
    lines = [line for line in out.splitlines() if "featx audit" in line]
    assert len(lines) == 1 and lines[0].startswith(f"Note: {len(copies)} of the 100 test images have a near-duplicate")
    assert json.loads(out.splitlines()[-1])["n_train_test_near_duplicates"] == len(copies)
    result = compare(store, CompareConfig(heads="ncm,ridge", progress=False, device="cpu"), tmp_path / "cmp")
    assert sum("featx audit" in line for line in result.summary().splitlines()) == 1
    arrays, _, _ = faulty_blobs(n_copies=0)
    clean = write_store(tmp_path / "clean.h5", *arrays)
    rc, out, _ = _run(capsys, "fit-head", clean, "--head", "ncm", "--out", tmp_path / "h2")
    assert rc == 0 and "featx audit" not in out


@pytest.fixture(scope="module")
def image_store(tmp_path_factory, one_thread_module):
    """Generated images in train/test folders with two copies of test images in train; a two-tap group."""
    root = make_image_folder(tmp_path_factory.mktemp("imgs") / "images", per_class=6, splits=("train",))
    make_image_folder(root, per_class=3, splits=("test",), seed=500)
    shutil.copy(root / "test" / "class0" / "000.png", root / "train" / "class0" / "copy-of-test-000.png")
    with Image.open(root / "test" / "class1" / "001.png") as im:
        im.resize((80, 64)).save(root / "train" / "class1" / "bigger-test-001.png")
    store = root.parent / "features.h5"
    extract(str(root), ExtractConfig(model="test_resnet", weights="random", img_size=32, layers="last,-1", workers=0, progress=False), store)
    return root, store


@pytest.fixture(scope="module")
def image_audit(image_store, tmp_path_factory):
    """featx audit of the image store from the command line; its output folder."""
    out = tmp_path_factory.mktemp("image_audit") / "a"
    rc = main(["audit", str(image_store[1]), "--out", str(out), "--device", "cpu", "--no-progress", "--json"])
    assert rc == 0
    return out


def test_audit_of_images_with_taps_writes_a_page_with_thumbnails(image_store, image_audit, tmp_path, monkeypatch):
    root, store = image_store
    saved = json.loads((image_audit / "audit.json").read_text())
    both = {"train/class0/copy-of-test-000.png", "test/class0/000.png"}  # (a random-init backbone finds other pairs too)
    pair = [p for p in saved["near_duplicates"]["pairs"] if {p["a"], p["b"]} == both]
    assert len(pair) == 1 and pair[0]["across_splits"]
    assert pair[0]["identical_bytes"] and pair[0]["similarity"] > 0.9999
    assert saved["taps"] == 2  # a two-tap group: every tap weighs the same in the cosine
    page = (image_audit / "audit.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') >= 2 and "no source" not in page and "<script" not in page
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    shutil.rmtree(root / "train" / "class2")  # the recorded source changed: thumbnails of those rows are missing, nothing fails
    try:
        result = audit(store, _config(source=str(moved), folds=2), tmp_path / "b")
        assert "no image" not in (tmp_path / "b" / "audit.html").read_text()
        src, _ = _page.open_thumbnail_source(None, str(root), store)
        assert 'class="missing"' in _page.page(result, src)
    finally:
        shutil.copytree(moved / "train" / "class2", root / "train" / "class2")
    src = _page.open_thumbnail_source(str(moved), None, store)[0]
    full = _page.page(result, src).count("data:image/jpeg")
    monkeypatch.setattr(_page, "MAX_PAGE_BYTES", 1_000_000 + 5_000)  # the text's megabyte and room for a few thumbnails
    small = _page.page(result, src)
    assert len(small.encode()) <= _page.MAX_PAGE_BYTES and 0 < small.count("data:image/jpeg") < full
    assert "thumbnails left out to keep the page under 20 MB" in small


def _probe_dom(browser: str, page, flags: list[str]) -> list[dict]:
    """Attributes of every <img> after the page loaded, as headless Chromium's DOM holds them."""
    import subprocess
    from html.parser import HTMLParser

    run = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=180)
    if run.returncode != 0 or "<body" not in run.stdout:
        pytest.skip(f"headless Chromium cannot run here: {run.stderr.strip().splitlines()[-1:] or run.returncode}")
    images, body = [], {}

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                images.append(dict(attrs))
            elif tag == "body":
                body.update(dict(attrs))

    Parser().feed(run.stdout)
    assert body.get("data-probed") == "1", "the page's load event never fired"
    return images


def test_the_page_shows_its_thumbnails_in_headless_chromium(image_audit, tmp_path):
    """Chromium opens audit.html from the file system: every image decodes (DOM) and its pixels are on screen (screenshot)."""
    import base64
    import io
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    probe = ("<script>window.addEventListener('load', () => { for (const i of document.images) { const r = i.getBoundingClientRect();"
             " i.dataset.loaded = (i.complete && i.naturalWidth > 0) ? '1' : '0'; i.dataset.box = [r.x, r.y, r.width, r.height]"
             ".map(Math.round).join(','); } document.body.dataset.probed = '1'; });</script>")
    page = tmp_path / "probed.html"  # the test's probe beside the page's own content; the page itself has no script
    page.write_text((image_audit / "audit.html").read_text().replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1200,2400"]
    images = _probe_dom(browser, page, flags)
    assert len(images) >= 10 and all(i["data-loaded"] == "1" for i in images), [i.get("alt") for i in images if i["data-loaded"] != "1"]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=180, check=True)
    screen = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    compared = 0
    for img in images:
        x, y, w, h = (int(v) for v in img["data-box"].split(","))
        if w < 8 or y + h > screen.shape[0] or x + w > screen.shape[1]:
            continue
        thumb = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).convert("RGB").resize((w, h), Image.BILINEAR)
        diff = np.abs(screen[y : y + h, x : x + w] - np.asarray(thumb, dtype=np.float32)).mean()
        assert diff < 12, f"{img['alt']} at {img['data-box']} does not show its thumbnail (mean difference {diff:.1f})"
        compared += 1
    assert compared >= 5


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_blocked_search_on_cuda_matches_cpu():
    rng = np.random.default_rng(5)
    X = unit_rows(rng.normal(size=(3000, 64)))
    rows = np.arange(3000)
    cpu = blocked_top_k(lambda r: X[r], rows, rows, 5, budget_bytes=64 * 4 * 8 * 700, device="cpu")
    gpu = blocked_top_k(lambda r: X[r], rows, rows, 5, budget_bytes=64 * 4 * 8 * 700, device="cuda")
    assert np.allclose(cpu[0], gpu[0], atol=1e-5) and (cpu[1] == gpu[1]).mean() > 0.999


def _scene(seed: int, layout: int | None = None) -> Image.Image:
    """A 32-pixel photograph-like image: smooth noise at three scales (the coarsest from ``layout``, when given)."""
    from scipy.ndimage import gaussian_filter

    def field(s, sigma):
        return gaussian_filter(np.random.default_rng(s).normal(size=(32, 32, 3)), (sigma, sigma, 0)) * sigma

    x = field(seed, 1.0) + field(seed + 1, 2.0) + field(seed + 2 if layout is None else layout, 4.0) * (1 if layout is None else 3)
    return Image.fromarray(((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8))


@pytest.fixture
def banded(tmp_path):
    """Images and a store whose cosines are set: a downscaled, re-encoded, mirrored copy of a test image and two different
    images of one layout, both pairs at cosine 0.8 (in the candidate band, below the threshold); other rows far apart."""
    import io

    root = tmp_path / "images"
    images = {"test/a/0.png": _scene(1), "train/b/0.png": _scene(10, layout=7), "train/b/1.png": _scene(20, layout=7)}
    small = images["test/a/0.png"].resize((24, 24), Image.BICUBIC).transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=50)
    images["train/a/copy.jpg"] = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    images.update({f"train/{c}/{i}.png": _scene(100 + 10 * i + 5 * (c == "b")) for c in "ab" for i in range(2, 8)})
    for name, im in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / name)
    ids = list(images)
    X = unit_rows(np.random.default_rng(6).normal(size=(len(ids), 256)))
    for a, b in [(ids.index("test/a/0.png"), ids.index("train/a/copy.jpg")), (ids.index("train/b/0.png"), ids.index("train/b/1.png"))]:
        other = X[b] - (X[b] @ X[a]) * X[a]
        X[b] = 0.8 * X[a] + 0.6 * other / np.linalg.norm(other)
    labels = [0 if name.split("/")[1] == "a" else 1 for name in ids]
    store = write_store(tmp_path / "band.h5", X, labels, ids, [name.split("/")[0] for name in ids], ["a", "b"])
    return root, store


def test_pixels_confirm_a_downscaled_re_encoded_copy_below_the_threshold_and_not_two_lookalikes(banded, tmp_path):
    root, store = banded
    result = audit(store, _config(source=str(root), k=3, folds=2), tmp_path / "out")
    assert [(p["a"], p["b"], p["found_by"]) for p in result.duplicates] == [("test/a/0.png", "train/a/copy.jpg", "pixels")]
    pair = result.duplicates[0]
    assert pair["similarity"] == pytest.approx(0.8, abs=1e-4) and pair["pixel_similarity"] >= NEAR_DUPLICATE_PIXELS
    assert result.verified == {"candidates": 2, "unreadable": 0, "confirmed": 1}
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())["near_duplicates"]
    assert saved["verify"] == "pixels" and saved["pixel_check"]["candidates"] == 2 and saved["pairs"][0]["found_by"] == "pixels"
    assert "pixel similarity >= 0.82" in (tmp_path / "out" / "audit.md").read_text()
    from featx.auditing._verify import pixel_similarities
    from featx.sources import resolve_source

    ids = list(result.rows.ids)
    lookalikes = pixel_similarities(resolve_source(str(root)), np.array(ids), np.array([[ids.index("train/b/0.png"), ids.index("train/b/1.png")]]))
    assert lookalikes[0] < NEAR_DUPLICATE_PIXELS - 0.1  # one layout, other detail: not a copy
    assert audit(store, _config(source=str(root), k=3, folds=2, verify="none"), tmp_path / "none").duplicates == []


def test_without_a_readable_source_the_cosine_alone_decides_and_one_line_says_so(banded, tmp_path, capsys, caplog):
    _, store = banded
    rc, _, err = _run(capsys, "audit", store, "--out", tmp_path / "out", "--k", "3", "--folds", "2", "--device", "cpu", "--no-progress")
    assert rc == 0, err
    said = [r.getMessage() for r in caplog.records if "pixel verification" in r.getMessage()]
    assert said == [f"thumbnails and pixel verification left out: the store records no source; pass --source; near-duplicates by "
                    f"cosine >= {NEAR_DUPLICATE_COSINE:g} alone"]
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())["near_duplicates"]
    assert saved["n_pairs"] == 0 and saved["verify"] == "none" and saved["pixel_threshold"] is None
    with pytest.raises(SystemExit):
        main(["audit", str(store), "--out", str(tmp_path / "x"), "--verify", "pixls"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("featx audit: error: argument --verify: invalid choice: 'pixls'")
    rc, _, err = _run(capsys, "audit", store, "--out", tmp_path / "x", "--pixel-threshold", "2")
    assert rc == 2 and "Traceback" not in err and "--pixel-threshold" in err.strip().splitlines()[-1]


def test_a_majority_of_near_duplicates_is_said_to_be_beyond_what_the_cosine_can_tell():
    # digits' 8-pixel images, enlarged for an ImageNet backbone, are all within cosine 0.88 of one another
    from featx.fitting import near_duplicates_line

    assert "inflates the score" in near_duplicates_line(4, 100, "f.h5")
    line = near_duplicates_line(360, 360, "f.h5")
    assert "cannot tell copies from look-alikes" in line and "featx audit f.h5" in line and "inflates" not in line
