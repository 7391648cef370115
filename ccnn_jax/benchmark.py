"""The solver benchmark's problems and timing (``experiments/bench_solver.py`` drives them).

Problems: network-like smooth random logits with CCNN's tag constraints (:func:`tag_problems`)
or the seed demonstration's hard foreground rows (:func:`seed_problems`). Timing: jitted
``solve_batch`` per (batch, method, mode), each solve timed back to back with a ``log_softmax``
over the same logits (:func:`paired_ms`), and the CPU references of :mod:`ccnn_jax.reference`
on the same images (:func:`bench_reference`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccnn_jax import constraints, reference, solve_batch

# ----------------------------------------------------------------------------- problems


def smooth_logits(
    rng: np.random.Generator,
    b: int,
    side: int,
    k: int,
    *,
    scale=2.0,
    grid=5,
    label_bias_sd=2.0,
    background_bias=(0.0, 4.0),
) -> np.ndarray:
    """Network-like logits (B, side, side, K): smooth random fields plus per-image label biases.

    A (grid x grid) Gaussian field per label, bilinearly upsampled and scaled, plus a per-image
    N(0, label_bias_sd^2) bias per label (some labels tiny, some dominant) and an extra
    U(background_bias) on label 0, so that CCNN's background bounds and 5% foreground lower
    bounds are often violated by Q.
    """
    low = rng.normal(size=(b, grid, grid, k)).astype(np.float32)
    up = np.asarray(jax.image.resize(jnp.asarray(low), (b, side, side, k), "bilinear"))
    logits = scale * up + rng.normal(0.0, label_bias_sd, size=(b, 1, 1, k)).astype(np.float32)
    if background_bias is not None:
        logits[..., 0] += rng.uniform(*background_bias, size=(b, 1, 1)).astype(np.float32)
    return logits.astype(np.float32)


def random_tags(rng: np.random.Generator, b: int, k: int) -> np.ndarray:
    """(B, K) multi-hot: background (label 0) plus 1-3 distinct random foreground labels."""
    tags = np.zeros((b, k), np.float32)
    tags[:, 0] = 1.0
    for i in range(b):
        tags[i, rng.choice(np.arange(1, k), rng.integers(1, 4), replace=False)] = 1.0
    return tags


def tag_problems(rng, b: int, side: int, k: int):
    """(log_q (B, side, side, K) numpy, stacked LinearConstraints from ``from_tags``)."""
    log_q = smooth_logits(rng, b, side, k)
    cons = jax.vmap(constraints.from_tags)(jnp.asarray(random_tags(rng, b, k)))
    return log_q, cons


def seed_problems(rng, b: int, side: int, k: int, alpha: float):
    """The seed's demonstration: hard ``sum_i P_i(l) >= alpha N`` for every label."""
    log_q = smooth_logits(rng, b, side, k, background_bias=None)
    one = constraints.foreground(jnp.full((k,), alpha, jnp.float32))
    cons = jax.tree.map(lambda x: jnp.broadcast_to(x, (b, *x.shape)), one)
    return log_q, cons


def take(cons, i: int, j: int | None = None):
    """Images i (single, unbatched) or i:j (batched) of a stacked constraint set."""
    return jax.tree.map(lambda x: x[i] if j is None else x[i:j], cons)


# ----------------------------------------------------------------------------- timing


def paired_ms(
    fn: Callable[[], object], ref: Callable[[], object], repeats: int, min_ms: float = 5.0
) -> tuple[float, float, float]:
    """Median ms of ``fn`` and of ``ref``, and the median of their per-repeat ratio, timing the
    two back to back in every repeat so that both see the same load on a shared machine."""
    inner = []
    for f in (fn, ref):
        jax.block_until_ready(f())
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        inner.append(max(1, int(np.ceil(min_ms / max((time.perf_counter() - t0) * 1e3, 1e-3)))))
    times = np.zeros((repeats, 2))
    for r in range(repeats):
        for j, (f, n) in enumerate(zip((fn, ref), inner, strict=True)):
            t0 = time.perf_counter()
            for _ in range(n):
                out = f()
            jax.block_until_ready(out)
            times[r, j] = (time.perf_counter() - t0) * 1e3 / n
    med = np.median(times, axis=0)
    return float(med[0]), float(med[1]), float(np.median(times[:, 0] / times[:, 1]))


MODES = {"sequential": True, "vmap": False}
"""``solve_batch(sequential=...)``: one image after the other, or all in lockstep."""


def default_mode() -> str:
    """The mode ``solve_batch`` picks by default on this backend."""
    return "sequential" if jax.default_backend() == "cpu" else "vmap"


@functools.cache
def jitted_solver(method: str, mode: str | None = None):
    """``solve_batch`` under an outer jit, so the eager input checks are not timed."""
    return jax.jit(
        functools.partial(solve_batch, method=method, sequential=MODES[mode or default_mode()])
    )


_log_softmax = jax.jit(jax.nn.log_softmax)


def bench_batches(
    log_q,
    cons,
    batches: Sequence[int],
    methods: Sequence[str],
    repeats: int,
    modes: Sequence[str] = ("sequential", "vmap"),
):
    """Times every (batch, method, mode) on all images; returns rows and per-image batch-1 data
    (of the backend's default mode)."""
    total = log_q.shape[0]
    log_q = jnp.asarray(log_q)
    rows, per_image = [], {}
    for b in batches:
        chunks = [(i, i + b) for i in range(0, total - b + 1, b)]
        inputs = [(log_q[i:j], take(cons, i, j)) for i, j in chunks]
        for method, mode in [(m, o) for m in methods for o in modes]:
            solver = jitted_solver(method, mode)
            t0 = time.perf_counter()
            jax.block_until_ready(solver(*inputs[0]))
            compile_s = time.perf_counter() - t0
            # each chunk's solve timed back to back with log_softmax over the same logits
            paired = [
                paired_ms(lambda x=x, c=c, f=solver: f(x, c), lambda x=x: _log_softmax(x), repeats)
                for x, c in inputs
            ]
            times = [t for t, _, _ in paired]
            softmax_ms = sum(t for _, t, _ in paired)
            passes = sum(r * t for _, t, r in paired) / softmax_ms
            sols = [solver(x, c) for x, c in inputs]
            info = jax.tree.map(
                lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *[s.info for s in sols]
            )
            lam = np.concatenate([np.asarray(s.lam) for s in sols])
            n_img = len(chunks) * b
            rows.append(
                {
                    "batch": b,
                    "method": method,
                    "mode": mode,
                    "ms_per_image": sum(times) / n_img,
                    "passes": passes,
                    "softmax_ms_per_image": softmax_ms / n_img,
                    "iters_mean": float(info.iterations.mean()),
                    "iters_max": int(info.iterations.max()),
                    "worst_gap": float(np.max(np.abs(info.gap))),
                    "worst_violation": float(info.max_violation.max()),
                    "converged": float(info.converged.mean()),
                    "feasible": float(info.feasible.mean()),
                    "active": float((np.abs(lam).max(axis=-1) > 0).mean()),
                    "images": n_img,
                    "compile_s": compile_s,
                }
            )
            if b == 1 and mode == default_mode():
                per_image[method] = {
                    "ms": np.asarray(times),
                    "p": [np.asarray(s.p[0]).reshape(-1, log_q.shape[-1]) for s in sols],
                }
    return rows, per_image


# ----------------------------------------------------------------------------- references


def bench_reference(name: str, fn, log_q, cons, images: int, budget_s: float, ours: dict):
    """Runs a reference on up to ``images`` images within ``budget_s``; compares to batch-1 ours.

    ``ours[method]`` holds batch-1 per-image times ("ms") and solutions ("p") of each method.
    """
    fn(log_q[0, :2, :2], take(cons, 0))  # warm-up: imports, first-call setup (not timed)
    ref_ms, diffs, done = [], [], 0
    start = time.perf_counter()
    for i in range(min(images, log_q.shape[0])):
        if done and time.perf_counter() - start > budget_s:
            break
        c = take(cons, i)
        t0 = time.perf_counter()
        p_ref = fn(log_q[i], c)
        ref_ms.append((time.perf_counter() - t0) * 1e3)
        diffs.append(float(np.max(np.abs(ours["newton"]["p"][i] - p_ref))))
        done += 1
    row = {
        "reference": name,
        "images": done,
        "ref_ms_per_image": float(np.mean(ref_ms)),
        "max_abs_dp_newton": float(max(diffs)),
    }
    for method in ("newton", "pga"):
        if method in ours:
            mine = float(np.mean(ours[method]["ms"][:done]))
            row[f"{method}_ms_per_image"] = mine
            row[f"ref_over_{method}"] = row["ref_ms_per_image"] / mine
    return row


def cvxpy_p(log_q, cons, hardness=1.0):
    return reference.cvxpy_primal(log_q, cons, hardness)[0]


def scipy_p(log_q, cons, hardness=1.0):
    return reference.scipy_dual(log_q, cons, hardness)[1]
