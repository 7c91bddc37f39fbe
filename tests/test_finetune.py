"""featx finetune: freeze modes, training, resume, metrics schema, export, init from a fitted head, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from timm.data import create_transform, resolve_model_data_config

from featx.backbones import create_backbone
from featx.cli import main
from featx.errors import FeatxError
from featx.finetuning import (
    FinetuneConfig, WarmupCosine, apply_freeze, build_optimizer, finetune, linear_head_from_dir, model_stages,
)
from featx.heads import heads_linear_map
from featx.sources import resolve_source

from conftest import make_image_folder

HEADS_SCHEMA = ("head", "model", "accuracy", "balanced_accuracy", "macro_f1", "n_train", "n_test", "fit_seconds")
FAST = dict(img_size=32, batch_size=8, workers=0, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models gain nothing from intra-op threads; one keeps the tests fast on a shared 2-core CPU."""
    yield


def _headed(name: str, n_classes: int = 3) -> torch.nn.Module:
    model, _ = create_backbone(name, img_size=32)
    model.reset_classifier(n_classes)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train 3 x 6, test 3 x 3 generated images."""
    root = tmp_path_factory.mktemp("ft") / "images"
    make_image_folder(root, per_class=6, splits=("train",))
    make_image_folder(root, per_class=3, splits=("test",), seed=1000)
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 2-epoch full fine-tune of test_efficientnet, run through the CLI with --json."""
    out = tmp_path_factory.mktemp("ft") / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["finetune", str(data), "--model", "test_efficientnet", "--weights", "random", "--out", str(out), "--epochs", "2",
                   "--batch-size", "8", "--img-size", "32", "--workers", "0", "--no-progress", "--json"])
    assert rc == 0
    return out, buf.getvalue()


# -- freezing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, head, last_stage, stem", [
    ("test_resnet", {"fc.weight", "fc.bias"}, "layer4.", ("conv1.", "bn1.")),
    ("test_efficientnet", {"classifier.weight", "classifier.bias"}, "blocks.4.", ("conv_stem.", "bn1.")),
    ("test_vit", {"head.weight", "head.bias"}, "blocks.5.", ("cls_token", "pos_embed", "patch_embed.")),
])
def test_freeze_modes_leave_exactly_the_intended_parameters_trainable(name, head, last_stage, stem):
    model = _headed(name)
    names = [n for n, _ in model.named_parameters()]
    stages, head_names = model_stages(model)
    assert set(head_names) == head
    assert all(n.startswith(stem) for n in stages[0]) and all(n.startswith(last_stage) or n.startswith(("conv_head", "bn2", "norm."))
                                                              for n in stages[-1])

    assert set(apply_freeze(model, "all")) == head
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head

    trainable = set(apply_freeze(model, "stages:1"))
    assert trainable == head | set(stages[-1])
    assert any(n.startswith(last_stage) for n in trainable) and not any(n.startswith(stem) for n in trainable)
    if name == "test_efficientnet":  # the final conv/norm before pooling belong to the last stage
        assert {"conv_head.weight", "bn2.weight"} <= trainable

    assert set(apply_freeze(model, "stages:2")) == head | set(stages[-1]) | set(stages[-2])
    assert set(apply_freeze(model, f"stages:{len(stages)}")) == set(names)
    assert set(apply_freeze(model, "none")) == set(names)
    with pytest.raises(FeatxError, match="more stages"):
        apply_freeze(model, f"stages:{len(stages) + 1}")


def test_freeze_all_trains_only_the_classifier_and_keeps_batchnorm_statistics(data, tmp_path):
    result = finetune(str(data), FinetuneConfig(model="test_resnet", freeze="all", epochs=1, **FAST), tmp_path / "run")
    before, _ = create_backbone("test_resnet", img_size=32)
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    for k, v in before.state_dict().items():  # weights and BatchNorm running stats untouched
        assert torch.equal(after[k], v), k
    assert not torch.equal(after["fc.weight"], _headed("test_resnet").fc.weight)
    assert result.metrics["trainable_params"] == after["fc.weight"].numel() + after["fc.bias"].numel()


# -- training ----------------------------------------------------------------------------------
def test_loss_falls(data, tmp_path):
    config = FinetuneConfig(model="test_vit", epochs=4, augment="none", lr=3e-3, probe=False, **FAST)
    result = finetune(str(data), config, tmp_path / "run")
    losses = [h["train_loss"] for h in result.history[1:]]  # epoch 0 is the start, scored but not trained
    assert losses[-1] < 0.6 * losses[0], losses
    assert result.metrics["accuracy"] > 0.5
    # a random start is no model to keep: the best fine-tuned candidate is the run's model
    assert result.metrics["kept"] == "finetuned" and result.metrics["baseline"] is None and "random" in result.metrics["decision"]["reason"]
    kept, best = (torch.load(tmp_path / "run" / name, weights_only=True) for name in ("best.pt", "finetuned.pt"))
    assert (kept["epoch"], kept["candidate"]["alpha"]) == (result.metrics["best_epoch"], result.metrics["chosen_alpha"])
    assert all(torch.equal(kept["model"][k], best["model"][k]) for k in best["model"])


def test_a_run_whose_validation_cannot_separate_the_models_keeps_the_probe_and_says_why(data, tmp_path, capsys):
    """Every candidate scores what the probe scores on validation: one-sided McNemar p = 1, the refitted probe is kept."""
    out = tmp_path / "run"
    assert main(["finetune", str(data), "--model", "test_efficientnet", "--weights", "random", "--out", str(out), "--epochs", "1", "--freeze", "stages:1",
                 "--batch-size", "8", "--img-size", "32", "--workers", "0", "--no-progress", "--json"]) == 0
    stdout = capsys.readouterr().out
    m = json.loads(stdout.strip().splitlines()[-1])
    assert json.loads((out / "metrics.json").read_text())["history"][0]["val_accuracy"] == 1.0
    assert m["kept"] == "start" and m["best_epoch"] == 0 and m["chosen_alpha"] is None
    assert m["decision"]["p_value"] == 1.0 and "within noise" in m["decision"]["reason"] and "kept the frozen probe" in stdout
    assert m["decision"]["n_candidates"] == 4  # one epoch, its three interpolations toward the probe
    assert m["accuracy"] == m["baseline"]["accuracy"] and m["gain_points"] == 0.0 and m["gain_ci"] == [0.0, 0.0]
    kept = torch.load(out / "best.pt", weights_only=True)
    trained = torch.load(out / "finetuned.pt", weights_only=True)
    assert kept["kept"] == "start" and kept["epoch"] == 0
    assert not torch.equal(kept["model"]["conv_head.weight"], trained["model"]["conv_head.weight"])  # trained: the last stage
    assert torch.equal(kept["model"]["conv_stem.weight"], trained["model"]["conv_stem.weight"])  # frozen in both
    assert (out / "export" / "model.safetensors").is_file()  # the export is the kept model (best.pt)


def _interrupt_at_epoch(monkeypatch, epoch: int, after: bool = False):
    """Raise KeyboardInterrupt when epoch ``epoch`` starts (or, with ``after``, once it is trained but not yet saved)."""
    from featx.finetuning._loop import Trainer

    original = Trainer.train_epoch

    def interrupted(self, loader, e, skipped, epochs=None):
        if e == epoch and not after:
            raise KeyboardInterrupt
        stats = original(self, loader, e, skipped, epochs)
        if e == epoch:
            raise KeyboardInterrupt
        return stats

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)


def test_resume_after_interruption_reproduces_the_uninterrupted_run(data, tmp_path, monkeypatch):
    config = FinetuneConfig(model="test_efficientnet", epochs=3, freeze="stages:2", **FAST)  # augmentation on
    full = finetune(str(data), config, tmp_path / "full")

    _interrupt_at_epoch(monkeypatch, 3)  # stopped after 2 of 3 epochs
    with pytest.raises(KeyboardInterrupt):
        finetune(str(data), config, tmp_path / "cut")
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = finetune(str(data), FinetuneConfig(**{**config.__dict__, "resume": True}), tmp_path / "cut")
    assert resumed.finished and resumed.resumed_from == 2

    assert [h.get("train_loss") for h in resumed.history] == [h.get("train_loss") for h in full.history]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "test_loss", "best_epoch"):
        assert resumed.metrics[key] == full.metrics[key], key
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_broken_images_are_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=5)
    (root / "class1" / "broken.png").write_bytes(b"not an image")
    (root / "class2" / "empty.png").write_bytes(b"")
    result = finetune(str(root), FinetuneConfig(model="test_resnet", epochs=1, freeze="all", **FAST), tmp_path / "run")
    assert result.metrics["n_skipped"] == 2
    assert result.metrics["n_train"] + result.metrics["n_val"] + result.metrics["n_test"] == 15
    assert result.metrics["eval_split"] == "holdout" and "held-out" in result.metrics["eval_split_description"]


# -- outputs -----------------------------------------------------------------------------------
def test_metrics_json_has_the_heads_schema(run):
    out, stdout = run
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert set(HEADS_SCHEMA) <= set(printed)
    # --freeze auto on 18 training images: the last 2 stages train; run.json keeps the option as given
    assert printed["head"] == "finetune:stages:2" and printed["freeze"] == "stages:2" and printed["model"] == "test_efficientnet"
    assert json.loads((out / "run.json").read_text())["config"]["freeze"] == "auto"
    assert printed["trainable_params"] < printed["total_params"]
    # validation: 10% of 6 per class, raised to the floor, which is capped at a third of the class: 2 per class
    assert printed["n_train"] + printed["n_val"] == 18 and printed["n_val"] == 6 and printed["n_test"] == 9 and printed["epochs"] == 2
    assert 0 <= printed["accuracy"] <= 1 and printed["fit_seconds"] > 0 and printed["wall_seconds"] >= printed["fit_seconds"]
    saved = json.loads((out / "metrics.json").read_text())
    assert {k: saved[k] for k in HEADS_SCHEMA} == {k: printed[k] for k in HEADS_SCHEMA}
    assert [h["epoch"] for h in saved["history"]] == [0, 1, 2]
    assert [c["alpha"] for c in saved["history"][1]["candidates"]] == [0.25, 0.5, 0.75, 1.0]
    assert printed["baseline"]["start"] == "probe" and printed["gain_points"] == pytest.approx(
        100 * (printed["accuracy"] - printed["baseline"]["accuracy"]))
    for m in (printed, printed["baseline"]):  # every accuracy with its 95% interval
        lo, hi = m["accuracy_ci"]
        assert lo <= m["accuracy"] <= hi and m["balanced_accuracy_ci"][0] <= m["balanced_accuracy"] <= m["balanced_accuracy_ci"][1]
    assert printed["gain_ci"][0] <= printed["gain_points"] <= printed["gain_ci"][1]
    assert printed["decision"]["kept"] == printed["kept"] and printed["decision"]["reason"] in stdout
    assert f"{printed['accuracy']:.3f} ({printed['accuracy_ci'][0]:.3f}–{printed['accuracy_ci'][1]:.3f})" in stdout


def test_test_predictions_hold_every_test_image_with_both_models_predictions(run, data):
    import csv

    out, stdout = run
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / metrics["test_predictions"], newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["id", "label", "prediction", "frozen_prediction"]
    src = resolve_source(data)
    test_ids = [src.ids[i] for i, s in enumerate(src.splits) if s == "test"]
    assert [r["id"] for r in rows] == test_ids and {r["label"] for r in rows} == {"class0", "class1", "class2"}
    assert np.mean([r["prediction"] == r["label"] for r in rows]) == pytest.approx(metrics["accuracy"])
    assert np.mean([r["frozen_prediction"] == r["label"] for r in rows]) == pytest.approx(metrics["baseline"]["accuracy"])


def _eval_batch(data, model_name: str):
    model = timm.create_model(model_name, num_classes=0)
    tf = create_transform(**resolve_model_data_config(model, args={"input_size": (3, 32, 32)}), is_training=False)
    src = resolve_source(data)
    test = [i for i, s in enumerate(src.splits) if s == "test"]
    return torch.stack([tf(src.load(i)) for i in test]), src.labels[test]


def test_export_loads_back_with_timm_and_predicts_the_same(run, data):
    out, _ = run
    x, y = _eval_batch(data, "test_efficientnet")
    trained = timm.create_model("test_efficientnet", num_classes=3)
    trained.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model"])  # --export best, the default
    from safetensors.torch import load_file

    by_name = timm.create_model("test_efficientnet", num_classes=3)
    by_name.load_state_dict(load_file(out / "export" / "model.safetensors"))
    local = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True)
    assert local.pretrained_cfg["label_names"] == ["class0", "class1", "class2"]
    with torch.inference_mode():
        ref = trained.eval()(x)
        for model in (by_name.eval(), local.eval()):
            assert torch.allclose(model(x), ref, atol=1e-5)
    accuracy = float((ref.argmax(1).numpy() == y).mean())
    assert accuracy == pytest.approx(json.loads((out / "metrics.json").read_text())["accuracy"])


def test_extract_reads_the_finetuned_checkpoint(run, data, tmp_path, capsys):
    out, _ = run
    args = ["extract", str(data), "--model", "test_efficientnet", "--img-size", "32", "--no-progress", "--workers", "0"]
    assert main(args + ["--weights", str(out / "last.pt"), "--out", str(tmp_path / "ft.h5")]) == 0
    assert main(args + ["--weights", "random", "--out", str(tmp_path / "random.h5")]) == 0
    import h5py

    with h5py.File(tmp_path / "ft.h5") as f1, h5py.File(tmp_path / "random.h5") as f2:
        a, b = f1["test_efficientnet"]["features"][:], f2["test_efficientnet"]["features"][:]
    assert a.shape == b.shape == (27, 256) and not np.allclose(a, b)
    capsys.readouterr()
    assert main(args + ["--weights", str(out), "--out", str(tmp_path / "dir.h5")]) == 2
    assert "best.pt" in capsys.readouterr().err


# -- init from a fitted head -------------------------------------------------------------------
@pytest.mark.parametrize("steps, n_classes", [
    ([("standardize", StandardScaler())], 3),
    ([("standardize", StandardScaler()), ("pca", PCA(5, whiten=True))], 3),
    ([("standardize", StandardScaler())], 2),
])
def test_linear_map_folds_preprocessing_into_the_weights(steps, n_classes):
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, (60, 8)) * rng.uniform(0.5, 4, 8)
    y = rng.integers(0, n_classes, 60)
    pipe = Pipeline(steps + [("head", LogisticRegression(max_iter=500))]).fit(X, y)
    W, b, classes = heads_linear_map(pipe)
    logits = X @ W.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    assert np.allclose(p / p.sum(1, keepdims=True), pipe.predict_proba(X), atol=1e-8)
    assert list(classes) == list(range(n_classes))
    with pytest.raises(FeatxError, match="Normalizer"):
        heads_linear_map(Pipeline([("l2", Normalizer())] + steps + [("head", LogisticRegression())]).fit(X, y))


@pytest.fixture(scope="module")
def features(data, tmp_path_factory):
    """test_resnet features of ``data`` cached by featx extract (32 px, fp32)."""
    out = tmp_path_factory.mktemp("feat") / "features.h5"
    assert main(["extract", str(data), "--model", "test_resnet", "--weights", "random", "--img-size", "32", "--out", str(out),
                 "--workers", "0", "--no-progress"]) == 0
    return out


def _fit(features, tmp_path, head: str, **kwargs):
    from featx import FitHeadConfig, fit_head, load_head

    out = tmp_path / "-".join([head, *map(str, kwargs)])
    fit_head(features, FitHeadConfig(head=head, **kwargs), out)
    return out, load_head(out)


@pytest.mark.parametrize("head", ["logreg", "torch-linear"])
def test_init_head_starts_from_the_fitted_linear_probe(data, features, tmp_path, head):
    from featx.store import load_features

    head_dir, loaded = _fit(features, tmp_path, head)
    test = load_features(features, "test_resnet", "test")
    weight, bias = linear_head_from_dir(head_dir, loaded.class_names, test.X.shape[1], model="test_resnet")
    logits = torch.from_numpy(test.X).float() @ weight.T + bias
    assert np.allclose(logits.softmax(1).numpy(), loaded.scores(test.X), atol=1e-4)
    # class names in another order than the head's: rows follow the caller's order
    names = loaded.class_names[::-1]
    weight2, bias2 = linear_head_from_dir(head_dir, names, test.X.shape[1])
    assert torch.equal(weight2, weight.flip(0)) and torch.equal(bias2, bias.flip(0))

    config = FinetuneConfig(model="test_resnet", freeze="all", init_head=str(head_dir), lr=1e-12, epochs=1, **FAST)
    result = finetune(str(data), config, tmp_path / "run")
    assert result.metrics["head"] == "finetune:all+init-head"
    assert result.metrics["accuracy"] == pytest.approx(float((loaded.pipeline.predict(test.X) == test.y).mean()))


def test_init_head_refuses_nonlinear_or_mismatched_heads(data, features, tmp_path):
    knn, _ = _fit(features, tmp_path, "knn")
    with pytest.raises(FeatxError, match="not linear"):
        linear_head_from_dir(knn, ["class0", "class1", "class2"], 32)
    l2, _ = _fit(features, tmp_path, "logreg", l2_normalize=True)
    with pytest.raises(FeatxError, match="Normalizer"):
        linear_head_from_dir(l2, ["class0", "class1", "class2"], 32)
    lin, loaded = _fit(features, tmp_path, "logreg")
    dim = loaded.meta["feature_dim"]
    with pytest.raises(FeatxError, match="same --model"):
        linear_head_from_dir(lin, loaded.class_names, dim + 1)
    with pytest.raises(FeatxError, match="classes"):
        linear_head_from_dir(lin, ["a", "b", "c"], dim)
    with pytest.raises(FeatxError, match="not 'test_vit'"):
        linear_head_from_dir(lin, loaded.class_names, dim, model="test_vit")


# -- bad input ---------------------------------------------------------------------------------
def _cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["finetune", *map(str, args), "--weights", "random", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress"])
    return rc, capsys.readouterr().err.strip()


def test_bad_input_exits_2_with_one_line(run, data, tmp_path, capsys):
    out, _ = run
    cases = [
        ((data, "--model", "test_efficientnet", "--out", out), "--resume"),  # RUN_DIR holds another run
        ((data, "--model", "test_resnet", "--out", out, "--resume"), "other settings"),
        ((tmp_path / "missing", "--model", "test_resnet", "--out", tmp_path / "r1"), "does not exist"),
        ((data, "--model", "test_resnet", "--out", tmp_path / "r2", "--freeze", "half"), "bad --freeze"),
        ((data, "--model", "test_resnet", "--out", tmp_path / "r3", "--freeze", "stages:9"), "more stages"),
        ((data, "--model", "test_resnett", "--out", tmp_path / "r4"), "did you mean"),
        ((data, "--model", "test_resnet", "--out", tmp_path / "r5", "--eval-split", "holdout"), "no split 'holdout'"),
    ]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    cases.append(((data, "--model", "test_resnet", "--out", tmp_path / "foreign"), "not empty"))
    one_each = make_image_folder(tmp_path / "one_each", n_classes=6, per_class=1)  # issue 17, bug 7: it ran and reported 0.0
    cases.append(((one_each, "--model", "test_resnet", "--out", tmp_path / "r6"), "needs at least 4 images per class"))
    for args, message in cases:
        rc, err = _cli(capsys, *args)
        assert rc == 2, (args, err)
        assert message in err and len(err.splitlines()) == 1 and err.startswith("featx finetune: error:"), err
        assert "--sweep" not in err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2  # the refused run is untouched
    capsys.readouterr()  # neither --weights nor --pretrained: refused, not a silent random initialisation
    assert main(["finetune", str(data), "--model", "test_resnet", "--out", str(tmp_path / "r7"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no weights for 'test_resnet'" in err and "--weights random" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r7").exists()


def test_overwrite_replaces_a_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(capsys, data, "--model", "test_resnet", "--out", out, "--epochs", "1", "--freeze", "all")[0] == 0
    rc, _ = _cli(capsys, data, "--model", "test_resnet", "--out", out, "--epochs", "1", "--freeze", "all", "--overwrite", "--seed", "1")
    assert rc == 0
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 1


def test_out_of_memory_names_the_fix(data, tmp_path, monkeypatch):
    from featx.finetuning._loop import Trainer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_epoch", oom)
    with pytest.raises(FeatxError, match="smaller --batch-size"):
        finetune(str(data), FinetuneConfig(model="test_resnet", epochs=1, **FAST), tmp_path / "run")


def test_optimizer_uses_layer_decay_over_trainable_parameters_and_warmup_cosine():
    model = _headed("test_resnet")
    apply_freeze(model, "stages:2")
    optimizer, scheduler = build_optimizer(model, FinetuneConfig(model="test_resnet", lr=1e-2, layer_decay=0.5, warmup=0.2), 10)
    ids = {id(p): n for n, p in model.named_parameters()}
    lr_of = {ids[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert set(lr_of) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert lr_of["fc.weight"] == pytest.approx(1e-2 / 3)  # warm-up step 0 of 2: 1/3 of the peak
    assert lr_of["layer4.0.conv1.weight"] == pytest.approx(lr_of["fc.weight"] * 0.5)
    assert lr_of["layer3.0.conv1.weight"] == pytest.approx(lr_of["fc.weight"] * 0.25)
    scale = WarmupCosine(total=10, warmup=2)
    assert [round(scale(s), 4) for s in (0, 1, 2, 6, 10)] == [0.3333, 0.6667, 1.0, 0.5, 0.0]


def test_ctrl_c_then_resume_ends_where_the_uninterrupted_run_ends(run, data, tmp_path, monkeypatch, capsys):
    reference, _ = run
    args = ["finetune", str(data), "--model", "test_efficientnet", "--weights", "random", "--out", str(tmp_path / "run"), "--epochs", "2",
            "--batch-size", "8", "--img-size", "32", "--workers", "0", "--no-progress"]
    _interrupt_at_epoch(monkeypatch, 2, after=True)  # epoch 2 trained (model and RNG moved on) but not yet checkpointed
    assert main(args) == 130
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "run", reference))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "test_loss"):
        assert got[key] == want[key], key
    assert [h.get("train_loss") for h in got["history"]] == [h.get("train_loss") for h in want["history"]]


# -- honest selection, budgets, BatchNorm ------------------------------------------------------
def _csv_source(root, path, poison: bool = False):
    """A CSV manifest of ``root``'s images; with ``poison``, every test label is replaced by another class."""
    import csv

    src = resolve_source(root)
    names = src.class_names
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i, split in enumerate(src.splits):
            label = int(src.labels[i])
            if poison and split == "test":
                label = (label + 1) % len(names)
            w.writerow([str(root / src.ids[i]), names[label], split])
    return path


@pytest.mark.parametrize("significance", [0.05, 1.0])  # 1: the test off, so a fine-tuned candidate can be kept
def test_every_choice_is_made_without_reading_the_test_labels(data, tmp_path, significance):
    """Poisoned test labels change the test score and nothing else: the probe and its C, every candidate's validation
    score, the chosen epoch and interpolation, the probe-or-fine-tune decision, the kept weights."""
    config = FinetuneConfig(model="test_efficientnet", epochs=3, lr=3e-3, significance=significance, **FAST)
    clean = finetune(_csv_source(data, tmp_path / "clean.csv"), config, tmp_path / "clean")
    poisoned = finetune(_csv_source(data, tmp_path / "poisoned.csv", poison=True), config, tmp_path / "poisoned")

    def choices(h):
        return (h["epoch"], h["val_accuracy"], h["val_loss"], h.get("train_loss"),
                [(c["alpha"], c["val_accuracy"], c["val_loss"]) for c in h.get("candidates", [])])

    assert [choices(h) for h in clean.history] == [choices(h) for h in poisoned.history]
    for key in ("best_epoch", "chosen_alpha", "decision", "kept"):
        assert clean.metrics[key] == poisoned.metrics[key], key
    assert clean.metrics["baseline"]["params"] == poisoned.metrics["baseline"]["params"]
    assert clean.metrics["accuracy"] != poisoned.metrics["accuracy"]  # the test labels were read, once, to score
    for name in ("best.pt", "finetuned.pt"):
        a, b = (torch.load(d / name, weights_only=True)["model"] for d in (tmp_path / "clean", tmp_path / "poisoned"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_test_curve_is_information_that_changes_nothing(data, tmp_path):
    config = FinetuneConfig(model="test_efficientnet", epochs=2, lr=3e-3, **FAST)
    plain = finetune(str(data), config, tmp_path / "plain")
    curve = finetune(str(data), FinetuneConfig(**{**config.__dict__, "test_curve": True}), tmp_path / "curve")
    assert [h.get("train_loss") for h in plain.history] == [h.get("train_loss") for h in curve.history]
    assert all("test_accuracy_info_only" in h and all("test_accuracy_info_only" in c for c in h["candidates"])
               for h in curve.history[1:])
    assert not any("test_accuracy_info_only" in h for h in plain.history)
    for key in ("best_epoch", "chosen_alpha", "decision", "accuracy"):
        assert plain.metrics[key] == curve.metrics[key], key


def test_max_minutes_covers_the_probe_and_no_epoch_starts_past_it(data, tmp_path, capsys):
    args = ["finetune", str(data), "--model", "test_efficientnet", "--weights", "random", "--out", str(tmp_path / "run"), "--epochs", "5",
            "--max-minutes", "0.0001", "--batch-size", "8", "--img-size", "32", "--workers", "0", "--no-progress", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out.strip().splitlines()[-1])
    # the probe alone used the budget: no epoch is trained, the frozen probe is the run's model
    assert metrics["epochs_done"] == 0 and metrics["stopped_by"] == "max-minutes" and metrics["kept"] == "start"
    assert "stopped by --max-minutes" in out and "no epoch was trained" in metrics["decision"]["reason"]
    assert not (tmp_path / "run" / "finetuned.pt").exists()
    assert main(args + ["--resume"]) == 0  # a budget-stopped run is finished: --resume reports it again, trains nothing
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["epochs_done"] == 0 and again["accuracy"] == metrics["accuracy"]


def test_max_minutes_fits_the_schedule_to_the_epochs_that_fit(data, tmp_path, monkeypatch, caplog):
    """Epochs of 2,000 s (estimated before the first, "measured" after it) and a final scoring of 600 s in 100 minutes: 2 fit
    from the start (5,400 s of room), 1 + 2 after the first epoch (which really took seconds); the cosine ends there."""
    import logging

    from featx.finetuning import _steps

    monkeypatch.setattr(_steps, "_epoch_seconds", lambda run: 2000.0)
    monkeypatch.setattr(_steps, "_final_seconds", lambda run: 600.0)
    with caplog.at_level(logging.INFO, logger="featx.finetuning._steps"):
        result = finetune(str(data), FinetuneConfig(model="test_efficientnet", epochs=5, max_minutes=100, **FAST), tmp_path / "run")
    fitted = [r.getMessage() for r in caplog.records if "the learning-rate schedule ends there" in r.getMessage()]
    assert len(fitted) == 2 and "(estimated), so 2 epochs" in fitted[0] and "(measured), so 3 epochs" in fitted[1]
    assert result.metrics["planned_epochs"] == 3 and result.metrics["epochs_done"] == 3 and result.metrics["stopped_by"] == "max-minutes"
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["scheduler"]["lr_lambdas"][0]["total"] == 3 * 2  # 12 training images / batch 8: 2 steps per epoch


@pytest.mark.parametrize("bn, frozen", [("frozen", True), ("train", False)])
def test_batchnorm_statistics_stay_pretrained_unless_asked(data, tmp_path, bn, frozen):
    config = FinetuneConfig(model="test_efficientnet", epochs=1, bn=bn, **FAST)
    finetune(str(data), config, tmp_path / "run")
    start = {k: v for k, v in timm.create_model("test_efficientnet").state_dict().items() if "running_mean" in k}
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert start and all(torch.equal(start[k], trained[k]) for k in start) == frozen


@pytest.mark.parametrize("seed", [0, 3])
def test_a_kept_probe_is_what_extract_and_fit_head_sweep_give_on_the_same_images(tmp_path, seed):
    """The run's frozen baseline (the model it keeps when nothing beats its start) predicts every test image as
    ``featx extract`` + ``featx fit-head --head logreg --sweep --seed S`` do: same features (extract's batched
    preprocessing is timm's transform pixel for pixel), same hold-out, same C. The images are of one colour and
    their classes arbitrary, so the predictions hang on the features and the C, not on an easy task."""
    import csv

    from featx import ExtractConfig, FitHeadConfig, extract, fit_head

    from conftest import write_image

    data = tmp_path / "images"
    for s, (split, per_class) in enumerate((("train", 10), ("test", 6))):
        for c in range(3):
            for i in range(per_class):
                write_image(data / split / f"class{c}" / f"{i}.png", (120, 110, 100), size=(37, 29), seed=1000 * s + 100 * c + i)
    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), weights)
    run = finetune(str(data), FinetuneConfig(model="test_efficientnet", weights=str(weights), epochs=1, seed=seed, **FAST), tmp_path / "run")
    store = tmp_path / "f.h5"
    extract(str(data), ExtractConfig(model="test_efficientnet", weights=str(weights), img_size=32, batch_size=8, workers=0,
                                     preprocess="device", runtime="torch", progress=False), store)
    fitted = fit_head(store, FitHeadConfig(head="logreg", sweep=True, seed=seed, progress=False), tmp_path / "head")
    with open(tmp_path / "run" / run.metrics["test_predictions"], newline="") as fh:
        frozen = {r["id"]: r["frozen_prediction"] for r in csv.DictReader(fh)}
    with open(tmp_path / "head" / "test_predictions.csv", newline="") as fh:
        swept = {r["id"]: r["predicted"] for r in csv.DictReader(fh)}
    assert frozen == swept and len(frozen) == 18
    assert run.metrics["baseline"]["refit_params"] == fitted.sweep["best"]
    assert run.metrics["baseline"]["accuracy"] == pytest.approx(fitted.metrics["accuracy"])
