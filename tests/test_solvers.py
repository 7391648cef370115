"""Property-based tests of the solvers on invariants that can fail (fixed shapes: no recompiles)."""

import jax
import jax.numpy as jnp
import numpy as np
import problems
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccnn_jax import certificate, constraints, reference, solve, solve_batch, solver_core

SCALES = (0.1, 1.0, 5.0, 30.0, 1000.0)
seeds = st.integers(0, 2**31 - 1)
families = st.sampled_from(problems.FAMILIES)
scales = st.sampled_from(SCALES)
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def _check_certificate(f, cons, sol, hardness=1.0):
    cert = certificate(sol.lam, f, cons, hardness=hardness)
    primal = float(cert.primal)
    assert np.isfinite(primal) and np.isfinite(float(cert.dual))
    assert float(sol.info.gap) <= 1e-5 * (1 + abs(primal)), (sol.info, primal)
    assert float(sol.info.max_violation) <= 1e-4, sol.info
    # The closed-form gap equals primal - dual computed from their definitions.
    assert abs(float(cert.primal - cert.dual) - float(sol.info.gap)) <= 1e-4 * (1 + abs(primal))
    assert bool(sol.info.feasible)


@PROPERTY
@given(family=families, seed=seeds, scale=scales, method=st.sampled_from(["newton", "pga"]))
def test_gap_and_violation_at_solution(family, seed, scale, method):
    if method == "pga":  # first-order ascent is too slow on near-linear duals (logits ~1e3)
        scale = min(scale, 30.0)
    f, cons = problems.make(family, seed, scale)
    sol = solve(jnp.asarray(f), cons, method=method)
    assert sol.p.dtype == jnp.float32 and sol.lam.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(sol.p))) and np.all(np.isfinite(np.asarray(sol.lam)))
    if scale <= 30:  # beyond, float32 cannot resolve a residual of tol = 1e-6 on 144 pixels
        assert bool(sol.info.converged), sol.info
    _check_certificate(f, cons, sol)
    p = np.asarray(sol.p)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert np.all(p[..., ~np.asarray(cons.mask)] == 0.0)
    lam, beta = np.asarray(sol.lam), np.asarray(cons.beta)
    assert np.all(lam >= 0) and np.all(lam <= beta)


@PROPERTY
@given(seed=seeds, scale=scales)
def test_satisfied_problems_return_q(seed, scale):
    f, cons = problems.make("satisfied", seed, scale)
    sol = solve(jnp.asarray(f), cons)
    np.testing.assert_array_equal(np.asarray(sol.lam), 0.0)
    np.testing.assert_allclose(np.asarray(sol.p), np.asarray(jax.nn.softmax(f)), atol=1e-6)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(family=families, seed=seeds, scale=st.sampled_from((0.3, 1.0, 5.0)))
def test_agrees_with_cvxpy_clarabel(family, seed, scale):
    f, cons = problems.make(family, seed, scale)
    sol = solve(jnp.asarray(f), cons)
    p_ref, value_ref = reference.cvxpy_primal(f, cons)
    primal = float(certificate(sol.lam, f, cons).primal)
    assert abs(primal - value_ref) <= 1e-4 * (1 + abs(value_ref)), (primal, value_ref)
    np.testing.assert_allclose(np.asarray(sol.p).reshape(p_ref.shape), p_ref, atol=2e-3)


@PROPERTY
@given(family=families, seed=seeds, scale=st.sampled_from((0.3, 1.0, 5.0, 30.0)))
def test_newton_and_pga_agree(family, seed, scale):
    f, cons = problems.make(family, seed, scale)
    newton = solve(jnp.asarray(f), cons, method="newton")
    pga = solve(jnp.asarray(f), cons, method="pga")
    assert bool(newton.info.converged) and bool(pga.info.converged)
    np.testing.assert_allclose(np.asarray(newton.p), np.asarray(pga.p), atol=2e-3)
    np.testing.assert_allclose(
        float(newton.info.primal), float(pga.info.primal), rtol=1e-4, atol=1e-5
    )


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=seeds, scale=st.sampled_from((0.3, 1.0, 5.0)))
def test_agrees_with_scipy_dual(seed, scale):
    f, cons = problems.make("general", seed, scale)
    sol = solve(jnp.asarray(f), cons)
    _, p_ref = reference.scipy_dual(f, cons)
    np.testing.assert_allclose(np.asarray(sol.p).reshape(p_ref.shape), p_ref, atol=2e-3)


@pytest.mark.parametrize("sequential", [False, True])
@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=seeds, scale=scales)
def test_vmap_equals_loop(sequential, seed, scale):
    """solve_batch, vmapped (exact latent) or sequential (factorised latent), equals solve."""
    batch = [problems.make("tags", seed + i, scale) for i in range(4)]
    f_b = jnp.stack([jnp.asarray(f) for f, _ in batch])
    cons_b = jax.tree.map(lambda *x: jnp.stack(x), *[c for _, c in batch])
    sol_b = solve_batch(f_b, cons_b, sequential=sequential)
    for i, (f, cons) in enumerate(batch):
        sol = solve(jnp.asarray(f), cons)
        np.testing.assert_allclose(np.asarray(sol_b.p[i]), np.asarray(sol.p), atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(sol_b.lam[i]), np.asarray(sol.lam), rtol=1e-4, atol=1e-5
        )


@settings(max_examples=15, deadline=None, derandomize=True)
@given(family=families, seed=seeds, scale=st.sampled_from((0.3, 1.0, 5.0, 30.0)))
def test_invariant_to_pixel_permutation_and_per_pixel_constant(family, seed, scale):
    f, cons = problems.make(family, seed, scale)
    sol = solve(jnp.asarray(f), cons)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(problems.N)
    f_perm = f.reshape(problems.N, -1)[perm].reshape(f.shape)
    w = cons.weights
    w_perm = None if w is None else w.reshape(w.shape[0], -1)[:, perm].reshape(w.shape)
    sol_perm = solve(
        jnp.asarray(f_perm),
        constraints.LinearConstraints(cons.a, cons.b, cons.beta, cons.mask, w_perm),
    )
    p_perm = np.asarray(sol.p).reshape(problems.N, -1)[perm].reshape(f.shape)
    np.testing.assert_allclose(np.asarray(sol_perm.p), p_perm, atol=1e-4)
    shift = rng.normal(size=f.shape[:-1] + (1,)).astype(np.float32) * 10
    sol_shift = solve(jnp.asarray(f + shift), cons)
    np.testing.assert_allclose(np.asarray(sol_shift.p), np.asarray(sol.p), atol=1e-4)


def test_size_mode_with_ccnn_hardness():
    for seed in range(5):
        f, cons = problems.make("tags_size", seed, 1.0)
        sol = solve(jnp.asarray(f), cons, hardness=constraints.SIZE_HARDNESS)
        _check_certificate(f, cons, sol, hardness=constraints.SIZE_HARDNESS)


def test_infeasible_hard_rows_are_reported_finite():
    rng = np.random.default_rng(0)
    f = jnp.asarray(problems.logits(rng, 1.0))
    over_one = constraints.foreground(np.full(problems.K, 0.3))  # lower bounds sum to 1.8
    masked = constraints.foreground(np.full(problems.K, 0.1), mask=np.arange(problems.K) != 2)
    for cons in (over_one, masked):
        for method in ("newton", "pga"):
            sol = solve(f, cons, method=method)
            assert not bool(sol.info.feasible)
            assert not bool(sol.info.converged)
            assert np.all(np.isfinite(np.asarray(sol.p)))
            assert np.all(np.isfinite(np.asarray(sol.lam)))
            assert np.isfinite(float(sol.info.gap))


def test_extreme_and_minus_inf_log_probabilities():
    rng = np.random.default_rng(1)
    f = rng.uniform(-1e3, 1e3, size=(problems.H, problems.W, problems.K)).astype(np.float32)
    f[..., 3] = -np.inf  # q = 0 for a label that stays allowed
    tags = np.array([1, 1, 0, 1, 1, 0], bool)
    sol = solve(jnp.asarray(f), constraints.from_tags(tags))
    p = np.asarray(sol.p)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(np.asarray(sol.lam)))
    assert bool(sol.info.converged), sol.info
    assert np.all(p[..., 2] == 0) and np.all(p[..., 5] == 0)


def test_no_recompilation_for_same_shapes():
    f, cons = problems.make("tags", 0, 1.0)
    solve(jnp.asarray(f), cons)
    size = solver_core._solve_jit._cache_size()
    for seed in range(1, 4):
        f, cons = problems.make("tags", seed, 1.0)
        solve(jnp.asarray(f), cons, tol=1e-6)
    assert solver_core._solve_jit._cache_size() == size


def test_solve_under_jit_and_vmap_of_builders():
    tags = jnp.asarray(np.random.default_rng(0).random((3, problems.K)) < 0.5).at[:, 0].set(True)
    f = jnp.asarray(problems.logits(np.random.default_rng(1), 2.0)[None].repeat(3, 0))

    @jax.jit
    def step(f, tags):
        cons = jax.vmap(constraints.from_tags)(tags)
        return solve_batch(f, cons)

    sol = step(f, tags)
    assert sol.p.shape == f.shape and bool(sol.info.converged.all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_q": np.full((4, 4, problems.K), np.nan, np.float32)}, "log_q contains NaN"),
        ({"log_q": np.zeros((4, 4, problems.K + 1), np.float32)}, r"log_q must have shape"),
        ({"method": "bfgs"}, "method must be"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    f, cons = problems.make("tags", 0, 1.0)
    args = {"log_q": f, "method": "newton", **kwargs}
    with pytest.raises(ValueError, match=match):
        solve(jnp.asarray(args["log_q"]), cons, method=args["method"])


@pytest.mark.parametrize("crowded", [False, True])
def test_rows_dropped_with_their_labels(crowded):
    """A branch on few label columns solves on the live rows only (size hints: C = 2K + 2, most
    rows inert); an image with more live rows than that branch holds takes a wider one. Either
    way lambda of a dead row is 0 and the answer is SciPy's, sequential or vmapped, warm or
    cold."""
    k, n = 21, 300
    rng = np.random.default_rng(3)
    tags = np.zeros(k, bool)
    tags[[0, 4, 9]] = True
    size = np.zeros(k, bool)
    size[4] = True
    cons = constraints.from_tags(tags, size=size)
    if crowded:  # 13 live rows on 3 labels: more than the 4-column branch's 10
        extra = np.zeros((8, k), np.float32)
        extra[:, 9] = 1.0
        cons = constraints.LinearConstraints(
            a=jnp.concatenate([cons.a, jnp.asarray(extra)]),
            b=jnp.concatenate([cons.b, jnp.asarray(np.linspace(0.01, 0.05, 8), jnp.float32)]),
            beta=jnp.concatenate([cons.beta, jnp.full(8, 2.0)]),
            mask=cons.mask,
        )
    f = rng.normal(size=(2, n, k)).astype(np.float32) * 2.0
    f[1, :, 9] -= 3.0  # label 9 rare: its rows bind
    cons_b = jax.tree.map(lambda x: jnp.stack([x, x]), cons)
    live = np.asarray(solver_core._live_rows(cons))
    assert live.sum() == (13 if crowded else 5)
    for sequential in (True, False):
        for lam0 in (None, jnp.ones((2, cons.a.shape[0]))):
            sol = solve_batch(jnp.asarray(f), cons_b, sequential=sequential, lam0=lam0)
            assert np.all(np.asarray(sol.info.converged))
            for i in range(2):
                lam_ref, p_ref = reference.scipy_dual(f[i], cons)
                np.testing.assert_allclose(np.asarray(sol.p[i]), p_ref, atol=2e-4)
                assert np.all(np.asarray(sol.lam[i])[~live] == 0.0)
                np.testing.assert_allclose(np.asarray(sol.lam[i]), lam_ref, atol=2e-3)
                _check_certificate(jnp.asarray(f[i]), cons, take_one(sol, i))


def take_one(sol, i):
    return jax.tree.map(lambda x: x[i], sol)
