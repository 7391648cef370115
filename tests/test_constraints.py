"""Constraint builders: CCNN's rows from tags and sizes, the seed's rows, boxes, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccnn_jax import LinearConstraints, constraints

K = 5


def _tags(*labels):
    t = np.zeros(K, bool)
    t[list(labels)] = True
    return t


def test_from_tags_rows_follow_ccnn_defaults():
    cons = constraints.from_tags(_tags(0, 2, 3))
    a, b, beta = (np.asarray(x) for x in (cons.a, cons.b, cons.beta))
    assert a.shape == (K + 2, K) and b.shape == beta.shape == (K + 2,)
    np.testing.assert_array_equal(np.asarray(cons.mask), [1, 0, 1, 1, 0])
    for label in (2, 3):  # present foreground: >= 5% with slack penalty 2
        np.testing.assert_array_equal(a[label], np.eye(K)[label])
        assert b[label] == pytest.approx(0.05) and beta[label] == 2.0
    for inert in (0, 1, 4):  # background and absent labels: a = 0, b = 0
        assert not a[inert].any() and b[inert] == 0
    np.testing.assert_array_equal(a[K], np.eye(K)[0])  # background >= 0.3, hard
    np.testing.assert_array_equal(a[K + 1], -np.eye(K)[0])  # background <= 0.7, hard
    np.testing.assert_allclose(b[K:], [0.3, -0.7])
    assert np.isinf(beta[K:]).all()


def test_from_tags_background_only_has_no_active_rows():
    cons = constraints.from_tags(_tags(0))
    assert not np.asarray(cons.a).any() and not np.asarray(cons.b).any()
    np.testing.assert_array_equal(np.asarray(cons.mask), [1, 0, 0, 0, 0])


def test_from_tags_size_mode():
    size = _tags(3)
    cons = constraints.from_tags(_tags(0, 2, 3), size=size)
    b, beta = np.asarray(cons.b), np.asarray(cons.beta)
    assert b[3] == pytest.approx(0.1) and np.isinf(beta[3])  # large: hard >= 10%
    assert b[2] == pytest.approx(0.05) and beta[2] == 2.0  # small: default lower row
    np.testing.assert_allclose(b[K : K + 2], [0.2, -0.7])
    a, upper = np.asarray(cons.a), slice(K + 2, 2 * K + 2)
    assert b[upper][2] == pytest.approx(-0.1) and a[upper][2, 2] == -1  # small: <= 10%, hard
    assert not a[upper][[0, 1, 3, 4]].any() and np.isinf(beta[upper]).all()


def test_from_tags_size_mode_with_only_small_objects_drops_the_background_upper_bound():
    cons = constraints.from_tags(_tags(0, 2), size=_tags())
    b = np.asarray(cons.b)
    np.testing.assert_allclose(b[K : K + 2], [0.3, -1.0])  # 1 small object: bg >= 90% possible


def test_from_tags_without_background_gives_foreground_rows_only():
    cons = constraints.from_tags(_tags(1, 4), background=None)
    a, b = np.asarray(cons.a), np.asarray(cons.b)
    np.testing.assert_allclose(b[[1, 4]], 0.05)
    assert not a[K:].any() and not b[K:].any()
    np.testing.assert_array_equal(np.asarray(cons.mask), [0, 1, 0, 0, 1])
    # no tag at all and no background: nothing is known, every label stays allowed
    empty = jax.jit(lambda t: constraints.from_tags(t, background=None))(jnp.zeros(K, bool))
    assert np.asarray(empty.mask).all()


def test_from_tags_traces_and_vmaps_to_the_same_rows():
    tags = np.array([_tags(0, 1), _tags(0, 2, 4), _tags(0)])
    batched = jax.jit(jax.vmap(constraints.from_tags))(jnp.asarray(tags))
    for i, t in enumerate(tags):
        single = constraints.from_tags(t)
        for field in ("a", "b", "beta", "mask"):
            np.testing.assert_array_equal(
                np.asarray(getattr(batched, field)[i]), np.asarray(getattr(single, field))
            )


def test_foreground_and_box_rows():
    cons = constraints.foreground(np.full(K, 0.1), beta=3.0)
    np.testing.assert_array_equal(np.asarray(cons.a), np.eye(K))
    np.testing.assert_allclose(np.asarray(cons.beta), 3.0)
    box_mask = np.zeros((8, 8))
    box_mask[2:6, 1:5] = 1
    box = constraints.box(box_mask, label=2, num_labels=K, fraction=0.75)
    assert np.asarray(box.b)[0] == pytest.approx(0.75 * 16 / 64)
    assert box.weights.shape == (1, 8, 8)
    both = constraints.concatenate([constraints.from_tags(_tags(0, 2)), box])
    assert both.a.shape == (K + 3, K) and both.weights.shape == (K + 3, 8, 8)
    np.testing.assert_array_equal(np.asarray(both.weights[0]), 1.0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"b": np.zeros(3)}, r"LinearConstraints\.b must have shape"),
        ({"beta": -np.ones(2)}, r"LinearConstraints\.beta must be >= 0"),
        ({"a": np.full((2, K), np.nan)}, r"LinearConstraints\.a must be finite"),
        ({"b": np.array([0.1, np.inf])}, r"LinearConstraints\.b must be finite"),
        ({"mask": np.zeros(K, bool)}, r"LinearConstraints\.mask allows no label"),
        ({"mask": np.ones(K + 1, bool)}, r"LinearConstraints\.mask must have shape"),
        ({"weights": np.ones((3, 4, 4))}, r"LinearConstraints\.weights must have shape"),
    ],
)
def test_validation_names_the_field(fields, match):
    base = {"a": np.eye(K)[:2], "b": np.zeros(2), "beta": np.ones(2), "mask": np.ones(K, bool)}
    base.update(fields)
    with pytest.raises(ValueError, match=match):
        LinearConstraints(**{k: np.asarray(v) for k, v in base.items()})
