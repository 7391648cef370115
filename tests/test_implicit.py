"""Implicit differentiation through ``solve``: central finite differences in float64 on problems
with free, zero and at-the-bound multipliers; jvp == vjp == jacfwd/jacrev; solve_batch; and a
jitted training step that differentiates through P (fixed shapes: no recompiles)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from ccnn_jax import LinearConstraints, dual, solve, solve_batch

H, W, K, C = 4, 5, 5, 4
TOL = 1e-12
MARGIN = 1e-4  # strict complementarity margin: multipliers and gradients away from 0


def _problem(seed: int, weighted: bool):
    """float64 problem whose rows are meant to be inactive (b below s(Q)), active inside the box
    (hard, or a large slack penalty) or at the upper bound (a small penalty, a large shortfall)."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(H, W, K)) * rng.uniform(0.5, 3.0) + rng.normal(size=K)
    q = np.exp(f - f.max(-1, keepdims=True))
    q = (q / q.sum(-1, keepdims=True)).reshape(-1, K)
    a = rng.uniform(-1, 1, size=(C, K))
    w = rng.uniform(0.2, 1.0, size=(C, H, W)) if weighted else np.ones((C, H, W))
    s_q = np.einsum("ck,nk,cn->c", a, q, w.reshape(C, -1)) / (H * W)
    kind = rng.permutation([0, 1, 1, 2])
    b = s_q + np.select(
        [kind == 0, kind == 1],
        [-rng.uniform(0.05, 0.2, C), rng.uniform(0.01, 0.06, C)],
        rng.uniform(0.1, 0.2, C),
    )
    beta = np.select(
        [kind == 2, rng.random(C) < 0.5],
        [rng.uniform(0.05, 0.3, C), np.inf],
        rng.uniform(5.0, 20.0, C),
    )
    return {
        "log_q": f,
        "a": a,
        "b": b,
        "beta": beta,
        "weights": w if weighted else None,
        "hardness": np.float64(rng.uniform(0.7, 1.5)),
    }


def _cons(theta):
    return LinearConstraints(
        a=theta["a"],
        b=theta["b"],
        beta=theta["beta"],
        mask=jnp.ones(K, bool),
        weights=theta["weights"],
    )


def _objective(theta, probe):
    """A scalar of everything solve returns that carries a derivative."""
    sol = solve(theta["log_q"], _cons(theta), hardness=theta["hardness"], tol=TOL)
    return (
        jnp.sum(sol.p * probe["p"])
        + sol.lam @ probe["lam"]
        + probe["value"] * (sol.info.dual + 0.5 * sol.info.primal)
    )


@jax.jit
def _value(theta, probe):
    return _objective(theta, probe)


@jax.jit
def _jvp_and_grad(theta, probe, direction):
    _, jvp = jax.jvp(lambda t: _objective(t, probe), (theta,), (direction,))
    return jvp, jax.grad(_objective)(theta, probe)


@jax.jit
def _solution(theta):
    sol = solve(theta["log_q"], _cons(theta), hardness=theta["hardness"], tol=TOL)
    prob = dual.make_problem(theta["log_q"], _cons(theta), theta["hardness"])
    return sol, dual.evaluate(sol.lam, prob, with_hessian=False).grad_C


def _kinds(lam, grad, beta):
    """0: at zero, 1: free, 2: at the upper bound; None if strict complementarity is too thin."""
    kinds = []
    for lm, g, bt in zip(lam, grad, beta, strict=True):
        if lm == 0.0 and g < -MARGIN:
            kinds.append(0)
        elif lm == bt and g > MARGIN:
            kinds.append(2)
        elif MARGIN < lm < bt - MARGIN and abs(g) < 1e-9:
            kinds.append(1)
        else:
            return None
    return kinds


def _check_against_finite_differences(seed, weighted):
    """Compares the JVP and the VJP with central differences; returns the multipliers' kinds,
    or None (nothing checked) when the problem is not converged or too close to degenerate."""
    rng = np.random.default_rng(seed + 1)
    theta = jax.tree.map(jnp.asarray, _problem(seed, weighted))
    sol, grad = _solution(theta)
    kinds = _kinds(np.asarray(sol.lam), np.asarray(grad), np.asarray(theta["beta"]))
    if not bool(sol.info.converged) or kinds is None or 1 not in kinds:
        return None
    probe = {
        "p": jnp.asarray(rng.normal(size=(H, W, K))),
        "lam": jnp.asarray(rng.normal(size=C)),
        "value": jnp.asarray(1.0),
    }
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x))), theta)
    direction["beta"] = jnp.where(jnp.isinf(theta["beta"]), 0.0, direction["beta"])
    jvp, vjp = _jvp_and_grad(theta, probe, direction)
    eps = 1e-6
    step = lambda sign: jax.tree.map(lambda x, d: x + sign * eps * d, theta, direction)  # noqa: E731
    fd = (float(_value(step(1), probe)) - float(_value(step(-1), probe))) / (2 * eps)
    vjp_dot = sum(
        float(jnp.sum(g * d))
        for g, d in zip(jax.tree.leaves(vjp), jax.tree.leaves(direction), strict=True)
    )
    assert abs(float(jvp) - fd) <= 1e-5 * (1 + abs(fd)), (float(jvp), fd, kinds)
    assert abs(vjp_dot - float(jvp)) <= 1e-9 * (1 + abs(fd)), (vjp_dot, float(jvp))
    return kinds


@pytest.mark.parametrize("weighted", [False, True])
@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1))
def test_gradients_match_central_differences_in_float64(weighted, seed):
    """d/d(log_q, a, b, beta, weights, hardness) of P, lam, dual and primal, in one random
    direction: the implicit JVP and VJP agree with central differences to 1e-5."""
    with jax.enable_x64(True):
        kinds = _check_against_finite_differences(seed, weighted)
    assume(kinds is not None)
    for k, name in enumerate(("zero", "free", "upper")):
        if k in kinds:
            event(f"multiplier {name}")


def test_fixed_problem_has_all_three_kinds_of_multipliers():
    """The generator does produce zero, free and at-the-bound multipliers (seed 3)."""
    with jax.enable_x64(True):
        theta = jax.tree.map(jnp.asarray, _problem(3, False))
        sol, grad = _solution(theta)
        kinds = _kinds(np.asarray(sol.lam), np.asarray(grad), np.asarray(theta["beta"]))
        assert kinds is not None and set(kinds) == {0, 1, 2}, (sol.lam, grad)
        assert _check_against_finite_differences(3, False) == kinds


def test_forward_and_reverse_jacobians_agree_and_bound_rows_hold_still():
    """d lam / d b column by column (JVPs) equals it row by row (VJPs); rows at a bound do not
    move with b, free rows do."""
    with jax.enable_x64(True):
        theta = jax.tree.map(jnp.asarray, _problem(3, False))
        sol, grad = _solution(theta)
        kinds = np.asarray(_kinds(np.asarray(sol.lam), np.asarray(grad), np.asarray(theta["beta"])))
        zeros = jax.tree.map(jnp.zeros_like, theta)
        fwd, rev = np.zeros((C, C)), np.zeros((C, C))
        for c in range(C):
            probe = {"p": jnp.zeros((H, W, K)), "lam": jnp.eye(C)[c], "value": jnp.asarray(0.0)}
            for j in range(C):
                jvp, vjp = _jvp_and_grad(theta, probe, {**zeros, "b": jnp.eye(C)[j]})
                fwd[c, j] = float(jvp)
            rev[c] = np.asarray(vjp["b"])
        np.testing.assert_allclose(fwd, rev, atol=1e-10)
        np.testing.assert_array_equal(fwd[kinds != 1], 0.0)
        assert np.abs(fwd[kinds == 1]).max() > 0


@pytest.mark.parametrize("sequential", [False, True])
def test_solve_batch_gradients_equal_per_image(sequential):
    problems = [jax.tree.map(jnp.asarray, _problem(seed, False)) for seed in (3, 4, 5)]
    log_q = jnp.stack([p["log_q"] for p in problems]).astype(jnp.float32)
    cons = jax.tree.map(
        lambda *x: jnp.stack(x).astype(x[0].dtype if x[0].dtype == bool else jnp.float32),
        *[_cons(p) for p in problems],
    )
    probe = jnp.asarray(np.random.default_rng(0).normal(size=log_q.shape), jnp.float32)

    @jax.jit
    def batched(log_q):
        return jnp.sum(solve_batch(log_q, cons, sequential=sequential).p * probe)

    @jax.jit
    def single(log_q, cons, probe):
        return jnp.sum(solve(log_q, cons).p * probe)

    got = jax.grad(batched)(log_q)
    for i in range(len(problems)):
        want = jax.grad(single)(log_q[i], jax.tree.map(lambda x: x[i], cons), probe[i])
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), atol=1e-5, rtol=1e-4)


def test_training_step_differentiates_through_p_under_jit():
    """A jitted step of a per-pixel linear model whose loss is a function of P itself (not of a
    stop-gradient P): finite gradients that match central differences in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        feats = jnp.asarray(rng.normal(size=(2, H, W, 3)))
        tags = np.zeros((2, K), bool)
        tags[:, 0] = True
        tags[0, 2] = tags[1, [1, 3]] = True
        cons = jax.vmap(lambda t: _tag_rows(t))(jnp.asarray(tags))
        target = jax.nn.one_hot(rng.integers(0, K, size=(2, H, W)), K, dtype=jnp.float64)

        def loss(params):
            log_q = jax.nn.log_softmax(feats @ params["w"] + params["b"])
            p = solve_batch(log_q, cons, tol=TOL).p
            return -jnp.mean(jnp.sum(target * jnp.log(p + 1e-9), axis=-1))

        @functools.partial(jax.jit, donate_argnums=())
        def step(params):
            value, grads = jax.value_and_grad(loss)(params)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value, grads

        params = {"w": jnp.asarray(rng.normal(size=(3, K)) * 0.3), "b": jnp.zeros(K)}
        new_params, value, grads = step(params)
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
        direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
        eps = 1e-6
        jitted = jax.jit(loss)
        moved = lambda sign: jax.tree.map(lambda x, d: x + sign * eps * d, params, direction)  # noqa: E731
        fd = (float(jitted(moved(1))) - float(jitted(moved(-1)))) / (2 * eps)
        analytic = sum(
            float(jnp.sum(g * d))
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        assert abs(analytic - fd) <= 1e-5 * (1 + abs(fd)), (analytic, fd)
        assert float(jitted(new_params)) < float(value)  # the step descends


def _tag_rows(tags):
    from ccnn_jax import constraints

    c = constraints.from_tags(tags, fg_lower=0.2, bg_lower=0.2, bg_upper=0.6)
    return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype != bool else x, c)


def test_infeasible_and_invalid_problems_get_zero_finite_gradients():
    f = jnp.asarray(np.random.default_rng(0).normal(size=(H, W, K)), jnp.float32)
    over = LinearConstraints(
        a=jnp.eye(K)[:C], b=jnp.full(C, 0.4), beta=jnp.full(C, jnp.inf), mask=jnp.ones(K, bool)
    )  # lower bounds summing to 1.6 > 1

    @jax.jit
    def grad(f, beta):
        cons = LinearConstraints(over.a, over.b, beta, over.mask)
        return jax.grad(lambda f: jnp.sum(solve(f, cons).p ** 2))(f)

    for beta in (over.beta, -jnp.ones(C)):  # infeasible; invalid (beta < 0)
        g = np.asarray(grad(f, beta))
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g, 0.0)
