"""featx finetune's choices on small validation sets: the keep-or-replace rule, the validation size, the probe's C,
WiSE-FT interpolation and the budget arithmetic (no training here: these run in milliseconds)."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import torch

from featx.errors import FeatxError
from featx.finetuning import FinetuneConfig, decide, one_sided_mcnemar
from featx.finetuning._budget import epochs_that_fit
from featx.finetuning._data import choose_images, validation_counts
from featx.finetuning._interpolation import interpolate_state, interpolated, snapshot
from featx.sources import ImageSource


@pytest.mark.parametrize("only_start, only_candidate, p", [
    (0, 0, 1.0),
    (0, 1, 0.5),  # one lucky image: a coin flip
    (0, 5, 1 / 32),
    (1, 5, 7 / 64),  # P(X >= 5), X ~ Bin(6, 1/2) = (6 + 1) / 64
    (3, 0, 1.0),
    (2, 10, (comb(12, 10) + comb(12, 11) + 1) / 4096),
])
def test_one_sided_mcnemar_on_known_counts(only_start, only_candidate, p):
    assert one_sided_mcnemar(only_start, only_candidate) == pytest.approx(p, rel=1e-12)


def _entry(correct, loss, **where):
    correct = np.asarray(correct, bool)
    return {**where, "val_accuracy": float(correct.mean()), "val_loss": loss, "correct": correct.tolist()}


def test_one_more_right_image_of_25_is_noise_and_the_probe_is_kept():
    """The held-out photo set's case: the probe 24/25 on validation, epoch 3 25/25."""
    start = _entry([True] * 24 + [False], 0.20, epoch=0, alpha=0.0)
    candidate = _entry([True] * 25, 0.10, epoch=3, alpha=1.0)
    d = decide(start, candidate, significance=0.05)
    assert d.kept == "start" and (d.only_start, d.only_candidate, d.n_val) == (0, 1, 25) and d.p_value == pytest.approx(0.5)
    assert d.reason == ("kept the frozen probe: epoch 3 is +4.0 points on 25 validation images (1 right only for it, 0 only for the "
                        "frozen probe; one-sided exact McNemar p = 0.5 >= 0.05), within noise")


def test_a_clear_gain_with_a_lower_loss_replaces_the_probe_and_a_higher_loss_does_not():
    start = _entry([True] * 30 + [False] * 20, 0.9, epoch=0, alpha=0.0)
    candidate = _entry([True] * 30 + [True] * 12 + [False] * 8, 0.5, epoch=4, alpha=0.5)  # 12 discordant, all its way
    d = decide(start, candidate, significance=0.05)
    assert d.kept == "finetuned" and d.p_value == pytest.approx(0.5 ** 12)
    assert d.reason.startswith("kept epoch 4 interpolated 50% of the way from the frozen probe: +24.0 points on 50 validation images")
    worse_loss = {**candidate, "val_loss": 1.2}
    d = decide(start, worse_loss, significance=0.05)
    assert d.kept == "start" and "is not lower" in d.reason


def test_the_p_value_is_corrected_for_the_number_of_candidates_the_best_was_chosen_from():
    """CIFAR-10 at 10 per class, 34 epochs x 4 candidates: the best was 10 images up on 30 validation images (p = 2^-10
    uncorrected) and 9 points below the probe on test images. Bonferroni over 136 candidates: p = 0.13, the probe stays."""
    start = _entry([True] * 10 + [False] * 20, 2.0, epoch=0, alpha=0.0)
    candidate = _entry([True] * 20 + [False] * 10, 1.5, epoch=16, alpha=0.75)
    d = decide(start, candidate, significance=0.05, n_candidates=136)
    assert d.kept == "start" and d.p_value == pytest.approx(2.0 ** -10) and d.p_adjusted == pytest.approx(136 * 2.0 ** -10)
    assert "0.00098, 0.13 for the best of 136 candidates >= 0.05), within noise" in d.reason
    assert decide(start, candidate, significance=0.05, n_candidates=20).kept == "finetuned"  # p = 0.0195
    assert decide(start, candidate, significance=0.05, n_candidates=10 ** 6).p_adjusted == 1.0


def test_significance_one_turns_the_test_off_and_a_random_start_has_nothing_to_keep():
    start = _entry([True, False, True, True], 0.5, epoch=0, alpha=0.0)
    candidate = _entry([True, True, True, True], 0.4, epoch=1, alpha=1.0)
    assert decide(start, candidate, significance=0.05).kept == "start"
    assert decide(start, candidate, significance=1.0).kept == "finetuned"
    assert decide(None, candidate, significance=0.05).kept == "finetuned"
    assert decide(start, None, significance=0.05).kept == "start"


@pytest.mark.parametrize("per_class, n_classes, expected", [
    (6, 3, 2),  # a third of 6: the floor of 20 is capped
    (10, 10, 3),
    (120, 2, 20),  # 10% would be 12: the floor
    (245, 2, 25),  # 10%
    (500, 10, 50),
    (5000, 10, 250),  # 500 per class would be 5,000 in all: the ceiling of 2,500
])
def test_validation_adapts_to_the_data(per_class, n_classes, expected):
    y = np.repeat(np.arange(n_classes), per_class)
    counts = validation_counts(y, FinetuneConfig(model="m"))
    assert counts == {c: expected for c in range(n_classes)}


def _source(per_class: int, n_classes: int = 3, test_per_class: int = 0) -> ImageSource:
    labels = np.r_[np.repeat(np.arange(n_classes), per_class), np.repeat(np.arange(n_classes), test_per_class)]
    splits = ["train"] * (per_class * n_classes) + ["test"] * (test_per_class * n_classes)
    return ImageSource(name="s", ids=[f"{i}.png" for i in range(len(labels))], labels=labels, splits=splits,
                       class_names=[f"c{i}" for i in range(n_classes)])


def test_validation_is_carved_from_training_images_per_class():
    src = _source(40, test_per_class=5)
    images = choose_images(src, FinetuneConfig(model="m"))
    assert np.bincount(src.labels[images.val]).tolist() == [13, 13, 13]  # floor 20, capped at a third of 40
    assert not set(images.val) & set(images.train) and not set(images.test) & (set(images.train) | set(images.val))
    assert set(np.asarray(src.splits)[images.test]) == {"test"}


@pytest.mark.parametrize("per_class, test_per_class, need", [(1, 0, 4), (3, 0, 4), (2, 2, 3)])
def test_too_few_images_per_class_are_refused_naming_the_minimum(per_class, test_per_class, need):
    with pytest.raises(FeatxError, match=f"needs at least {need} images per class") as e:
        choose_images(_source(per_class, n_classes=10, test_per_class=test_per_class), FinetuneConfig(model="m"))
    assert "--sweep" not in str(e.value) and "'c0'" in str(e.value)


def test_the_probe_chooses_c_by_cross_validation_on_small_sets_and_on_a_hold_out_on_large_ones(monkeypatch):
    from featx.finetuning import _probe

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16))
    y = np.repeat(np.arange(3), 30)
    X = (centres[y] + rng.normal(0, 1.5, (90, 16))).astype(np.float32)
    small = _probe.fit_probe(X[:60], y[:60], X[60:], y[60:], 3, seed=0, device="cpu")
    assert small.info["chosen_by"].startswith("5-fold cross-validation") and small.info["n_refit"] == 90
    assert not torch.equal(small.start[0], small.refit[0])  # the refit saw the validation images too
    monkeypatch.setattr(_probe, "KFOLD_BELOW", 10)
    large = _probe.fit_probe(X[:60], y[:60], X[60:], y[60:], 3, seed=0, device="cpu")
    assert large.info["chosen_by"].startswith("a stratified 20% hold-out")


def test_the_probe_kept_when_nothing_beats_it_is_fit_heads_swept_logreg_on_every_training_image():
    """The run's train and validation rows arrive in its own order; stacked back into the source's order, the refit is
    fit-head --sweep's model on the same rows with the same seed (same hold-out, same C), so a kept probe is the frozen
    baseline itself."""
    from featx.finetuning import _probe
    from featx.heads import grid_of, heads_linear_map, make_head, sweep

    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (3, 16))
    y = np.repeat(np.arange(3), 40)
    X = (centres[y] + rng.normal(0, 2.0, (120, 16))).astype(np.float32)
    order = rng.permutation(120)
    fit, val = order[:84], order[84:]
    probe = _probe.fit_probe(X[fit], y[fit], X[val], y[val], 3, seed=3, device="cpu",
                             source_order=np.argsort(np.concatenate([fit, val]), kind="stable"))
    fitted, result = sweep(make_head("logreg", device="cpu", random_state=3), X, y, grid_of("logreg"), random_state=3)
    assert probe.info["refit_params"] == result.best and probe.info["n_refit"] == 120
    W, b, _ = heads_linear_map(fitted)
    weight, bias = probe.refit
    np.testing.assert_allclose(weight.numpy(), W, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), b, rtol=1e-4, atol=1e-5)


def test_interpolation_is_the_weighted_mean_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    start = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked.fill_(7)
    own = snapshot(model)
    mixed = interpolate_state(start, own, 0.25)
    assert torch.allclose(mixed["0.weight"], start["0.weight"] + 0.25)
    assert mixed["1.num_batches_tracked"].item() == 7  # counters are not interpolated
    with interpolated(model, start, 0.5):
        assert torch.allclose(model[0].weight, start["0.weight"] + 0.5)
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("budget, elapsed, epoch_s, final_s, done, fits", [
    (600, 100, 100, 50, 0, 4),  # 450 s left after the final scoring: 4 epochs of 100 s
    (600, 580, 100, 50, 0, 0),  # the probe used the budget up: no epoch
    (600, 250, 100, 0, 2, 5),
])
def test_epochs_that_fit_count_the_final_scoring(budget, elapsed, epoch_s, final_s, done, fits):
    assert epochs_that_fit(budget, elapsed, epoch_s, final_s, done) == fits


def test_freeze_auto_trains_the_last_two_stages_on_small_sets_only():
    from featx.backbones import create_backbone
    from featx.finetuning._freezing import SMALL_SET, resolve_freeze

    model, _ = create_backbone("test_efficientnet", img_size=32)
    assert resolve_freeze("auto", SMALL_SET, model) == "stages:2"
    assert resolve_freeze("auto", SMALL_SET + 1, model) == "none"
    assert resolve_freeze("stages:1", 10, model) == "stages:1" and resolve_freeze("none", 10, model) == "none"
    assert resolve_freeze("auto", 10, torch.nn.Linear(3, 2)) == "none"  # no stage grouping: everything trains
