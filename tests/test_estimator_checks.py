"""scikit-learn's own estimator checks on every head featx exports, with its default parameters.

The default suite runs the checks that fit little or nothing (parameters, cloning, validation of the input, errors,
fitted attributes) on every head; the checks that train on their data sets are marked slow (``-m slow``). Where
scikit-learn's rule does not fit a head, the exemption and its reason are listed in ``EXPECTED_FAILURES``, and the
check runs as an expected failure (strict: it is reported when it starts to pass).
"""

from __future__ import annotations

import pytest
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import estimator_checks_generator

from featx.heads import KNNClassifier, LogisticRegressionClassifier, MLPClassifier, RidgeClassifier, SweptHead, TorchLinearClassifier
from featx.heads._taps import TapNormalizer

pytestmark = pytest.mark.usefixtures("one_thread")

ESTIMATORS = [
    LogisticRegressionClassifier(),
    RidgeClassifier(),
    KNNClassifier(),
    TorchLinearClassifier(),
    MLPClassifier(),
    SweptHead(Pipeline([("head", RidgeClassifier())]), [{"alpha": 0.1}, {"alpha": 10.0}]),  # pipeline and grid have no default
    TapNormalizer(),
]

EXPECTED_FAILURES = {
    "TorchLinearClassifier": {
        "check_class_weight_classifiers": "the default schedule (lr 0.01, at most 100 epochs of one step on 50 rows) is sized for "
                                          "standardised embeddings, which featx always gives this head; on make_blobs' unscaled "
                                          "features (std 20) it underfits (0.82 of predictions in the heavily weighted class, the "
                                          "check wants 0.87; 1.00 once standardised)",
    },
}

# Checks that fit little or nothing: run by default on every head; the others train on their data sets (slow).
QUICK = {
    "check_estimator_cloneable", "check_estimator_repr", "check_no_attributes_set_in_init", "check_parameters_default_constructible",
    "check_get_params_invariance", "check_set_params", "check_do_not_raise_errors_in_init_or_set_params", "check_mixin_order",
    "check_valid_tag_types", "check_estimator_tags_renamed", "check_estimators_unfitted", "check_transformers_unfitted",
    "check_requires_y_none", "check_classifiers_regression_target", "check_classifiers_one_label", "check_supervised_y_no_nan",
    "check_fit1d", "check_fit2d_1sample", "check_estimators_empty_data_messages", "check_complex_data", "check_estimator_sparse_array",
    "check_estimator_sparse_matrix", "check_estimator_sparse_tag", "check_n_features_in_after_fitting", "check_fit2d_predict1d",
    "check_transformer_general", "check_transformer_preserve_dtypes",
}


def _name(check) -> str:
    return getattr(check, "func", check).__name__


def _cases():
    for estimator in ESTIMATORS:
        expected = EXPECTED_FAILURES.get(type(estimator).__name__, {})
        for case in estimator_checks_generator(estimator, legacy=True, expected_failed_checks=expected, mark="xfail", xfail_strict=True):
            est, check = case.values if hasattr(case, "values") else case
            marks = list(getattr(case, "marks", ()))
            if _name(check) not in QUICK:
                marks.append(pytest.mark.slow)
            yield pytest.param(est, check, marks=marks, id=f"{type(est).__name__}-{_name(check)}")


@pytest.mark.parametrize("estimator, check", list(_cases()))
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_every_exported_head_is_checked_and_each_has_quick_checks():
    import featx.heads as heads

    exported = {n for n in heads.__all__ if n.endswith("Classifier") or n == "SweptHead"} | {"TapNormalizer"}
    assert exported == {type(e).__name__ for e in ESTIMATORS}
    quick = {type(e).__name__ for e in ESTIMATORS for c in estimator_checks_generator(e, legacy=True) if _name(c[1]) in QUICK}
    assert quick == exported
