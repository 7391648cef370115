"""The dual objective, latent distribution and certificate against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest

from ccnn_jax import certificate, constraints, dual, dual_objective, latent_distribution, solve


@pytest.mark.parametrize("family", problems.FAMILIES)
def test_gradient_is_b_minus_constraint_values(family):
    f, cons = problems.make(family, 3, 1.0)
    lam = jnp.asarray(np.random.default_rng(0).uniform(0, 1, cons.a.shape[0]), jnp.float32)
    prob = dual.make_problem(jnp.asarray(f), cons)
    ev = jax.jit(dual.evaluate)(lam, prob)
    autodiff = jax.jit(jax.grad(dual_objective))(lam, jnp.asarray(f), cons)
    np.testing.assert_allclose(np.asarray(ev.grad_C), np.asarray(autodiff), atol=1e-5)
    hess = jax.jit(jax.hessian(dual_objective))(lam, jnp.asarray(f), cons)
    np.testing.assert_allclose(np.asarray(ev.neg_hess_CxC), -np.asarray(hess), atol=1e-5)
    assert np.linalg.eigvalsh(np.asarray(ev.neg_hess_CxC, np.float64)).min() >= -1e-6


def test_finite_difference_gradient():
    f, cons = problems.make("general", 5, 2.0)
    lam = jnp.asarray([0.3, 0.1, 0.7, 0.2], jnp.float32)
    g = lambda x: float(dual_objective(jnp.asarray(x, jnp.float32), jnp.asarray(f), cons))
    grad = np.asarray(jax.grad(dual_objective)(lam, jnp.asarray(f), cons))
    eps = 1e-2
    for c in range(4):
        e = np.eye(4)[c] * eps
        fd = (g(np.asarray(lam) + e) - g(np.asarray(lam) - e)) / (2 * eps)
        assert fd == pytest.approx(grad[c], abs=2e-3)


def test_latent_distribution_masks_and_normalises():
    f = np.random.default_rng(0).normal(size=(6, 7, problems.K)).astype(np.float32)
    f[..., 1] = -np.inf
    cons = constraints.from_tags(np.array([1, 1, 0, 1, 0, 0], bool))
    p = np.asarray(latent_distribution(jnp.ones(cons.a.shape[0]), jnp.asarray(f), cons))
    assert p.shape == f.shape and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert np.all(p[..., [1, 2, 4, 5]] == 0.0)


def test_weak_duality_and_closed_form_gap():
    """g(lam) <= optimum <= primal(P(lam*)) for any lam in the box; gap formula = primal - dual."""
    rng = np.random.default_rng(1)
    for family in ("tags", "foreground_slack", "general", "box"):
        f, cons = problems.make(family, 11, 3.0)
        sol = solve(jnp.asarray(f), cons)
        optimum = float(certificate(sol.lam, f, cons).primal)
        upper = np.minimum(np.asarray(cons.beta), 10.0)
        for _ in range(10):
            lam = jnp.asarray(rng.uniform(0, 1, upper.shape) * upper, jnp.float32)
            cert = certificate(lam, jnp.asarray(f), cons)
            assert float(cert.dual) <= optimum + 1e-5 * (1 + abs(optimum))
            np.testing.assert_allclose(
                float(cert.primal - cert.dual),
                float(cert.gap),
                atol=1e-4 * (1 + abs(float(cert.primal))),
            )


def test_dual_at_zero_is_the_cost_of_the_mask():
    f = np.random.default_rng(2).normal(size=(10, problems.K)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    cons = constraints.foreground(np.zeros(problems.K), mask=mask)
    q = np.asarray(jax.nn.softmax(f))
    expected = -np.log(q[:, mask].sum(-1)).mean()  # KL(P || Q) of Q renormalised on the mask
    assert float(dual_objective(jnp.zeros(problems.K), jnp.asarray(f), cons)) == pytest.approx(
        expected, rel=1e-5
    )


def test_hardness_sharpens_p():
    f, cons = problems.make("tags", 4, 1.0)
    p1 = np.asarray(latent_distribution(jnp.zeros(cons.a.shape[0]), jnp.asarray(f), cons))
    p2 = np.asarray(
        latent_distribution(jnp.zeros(cons.a.shape[0]), jnp.asarray(f), cons, hardness=1000.0)
    )
    assert p2.max(-1).mean() > p1.max(-1).mean()
    np.testing.assert_array_equal(p2.argmax(-1), p1.argmax(-1))


@pytest.mark.parametrize("family", ["tags", "tags_size", "foreground_hard", "general"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0, 1000.0])
@pytest.mark.parametrize("lam_scale", [0.0, 1.0, 20.0, 55.0, 1e4])
def test_factorised_evaluation_equals_exact(family, scale, lam_scale):
    """g, s(P), -Hessian and P from E = exp(h) (two matrix-vector products and a Gram product)
    match the direct exponential, whichever branch the span test takes (lam_scale 1e4 spans far
    beyond FACTOR_SPAN: the exact one), and so do they on the allowed labels alone."""
    f, cons = problems.make(family, 7, scale)
    f[0, 0, 1] = -np.inf  # q = 0 somewhere
    rng = np.random.default_rng(int(scale * 10 + lam_scale))
    lam = jnp.asarray(rng.uniform(0, lam_scale, cons.a.shape[0]), jnp.float32)
    keep = int(np.asarray(cons.mask).sum())
    for hardness in (1.0, 1000.0):
        exact = dual.make_problem(jnp.asarray(f), cons, hardness)
        ev_exact = jax.jit(dual.evaluate)(lam, exact)
        p_exact = np.asarray(jax.jit(dual.latent)(lam, exact))
        for kwargs in ({"factorise": True}, {"factorise": True, "keep": keep}, {"keep": keep}):
            fast = dual.make_problem(jnp.asarray(f), cons, hardness, **kwargs)
            assert (fast.e0_NxK is not None) == kwargs.get("factorise", False)
            ev = jax.jit(dual.evaluate)(lam, fast)
            p = np.asarray(jax.jit(dual.latent)(lam, fast))
            assert np.all(np.isfinite(p)), kwargs
            kept = np.arange(problems.K) if fast.labels_K is None else np.asarray(fast.labels_K)
            np.testing.assert_allclose(p, p_exact[:, kept], atol=2e-6)
            assert sorted(kept[np.asarray(fast.mask_K)]) == list(np.flatnonzero(cons.mask))
            np.testing.assert_allclose(
                np.asarray(ev.value_C), np.asarray(ev_exact.value_C), atol=2e-6
            )
            np.testing.assert_allclose(float(ev.g), float(ev_exact.g), rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(
                np.asarray(ev.neg_hess_CxC), np.asarray(ev_exact.neg_hess_CxC), atol=2e-5 * hardness
            )
            np.testing.assert_allclose(
                np.asarray(ev.logz_N), np.asarray(ev_exact.logz_N), rtol=1e-6, atol=1e-5
            )
