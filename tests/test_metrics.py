"""Confusion matrix, IoU, mIoU, pixel accuracy against hand-computed values; KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccnn_jax import metrics

# 2 images of 2x3 pixels, K = 3, 255 = void
MASK = np.array([[[0, 0, 1], [1, 2, 255]], [[2, 2, 0], [255, 1, 1]]], np.int32)
PRED = np.array([[[0, 1, 1], [1, 2, 0]], [[2, 0, 0], [1, 1, 2]]], np.int32)
# counted pixels (truth, pred): img0: (0,0) (0,1) (1,1) (1,1) (2,2);
#                               img1: (2,2) (2,0) (0,0) (1,1) (1,2)
EXPECTED = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2]])


def test_confusion_matrix_by_hand():
    c = metrics.confusion_matrix(jnp.asarray(PRED), jnp.asarray(MASK), 3)
    np.testing.assert_array_equal(np.asarray(c), EXPECTED)
    assert np.asarray(c).sum() == 10  # 12 pixels, 2 void


def test_confusion_matrix_valid_mask_and_jit_and_accumulation():
    f = jax.jit(metrics.confusion_matrix, static_argnums=2)
    only_first = f(jnp.asarray(PRED), jnp.asarray(MASK), 3, jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(only_first, [[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    per_image = sum(
        np.asarray(f(jnp.asarray(PRED[i : i + 1]), jnp.asarray(MASK[i : i + 1]), 3))
        for i in range(2)
    )
    np.testing.assert_array_equal(per_image, EXPECTED)


def test_labels_outside_range_are_void():
    mask = np.array([[3, 7, 0]])
    pred = np.array([[0, 0, 0]])
    expected = [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    np.testing.assert_array_equal(metrics.confusion_matrix(pred, mask, 3), expected)


def test_iou_miou_accuracy_by_hand():
    iou = metrics.iou_per_class(EXPECTED)
    # class 0: tp 2, row 3, col 3 -> 2/4; class 1: 3/(4+4-3)=3/5; class 2: 2/(3+3-2)=2/4
    np.testing.assert_allclose(iou, [0.5, 0.6, 0.5])
    assert metrics.mean_iou(EXPECTED) == pytest.approx((0.5 + 0.6 + 0.5) / 3)
    assert metrics.pixel_accuracy(EXPECTED) == pytest.approx(7 / 10)
    s = metrics.summarize(EXPECTED, ["a", "b", "c"])
    assert s["per_class_iou"] == pytest.approx([0.5, 0.6, 0.5])


def test_absent_class_is_excluded_from_mean():
    c = np.array([[3, 1, 0], [1, 1, 0], [0, 0, 0]])  # class 2 never appears nor is predicted
    iou = metrics.iou_per_class(c)
    assert np.isnan(iou[2])
    assert metrics.mean_iou(c) == pytest.approx((3 / 5 + 1 / 3) / 2)
    assert metrics.summarize(c)["per_class_iou"][2] is None
    # a class predicted but never true counts, with IoU 0
    c2 = np.array([[3, 1], [0, 0]])
    np.testing.assert_allclose(metrics.iou_per_class(c2), [0.75, 0.0])


def test_errors():
    with pytest.raises(ValueError, match="must match"):
        metrics.confusion_matrix(np.zeros((1, 2, 2), int), np.zeros((1, 2, 3), int), 2)
    with pytest.raises(ValueError, match="square"):
        metrics.iou_per_class(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class_names"):
        metrics.summarize(EXPECTED, ["a", "b"])


def test_kl_divergence():
    p = jnp.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = jnp.array([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]])
    kl = metrics.kl_divergence(jnp.log(p), jnp.log(q))
    np.testing.assert_allclose(kl, [np.log(2.0), np.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(metrics.kl_divergence(jnp.log(q), jnp.log(q)), 0.0, atol=1e-7)
