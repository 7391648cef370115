"""The solver benchmark's problems and timing (``experiments/bench_solver.py`` drives them).

Problems: network-like smooth random logits with CCNN's tag constraints (:func:`tag_problems`)
or the seed demonstration's hard foreground rows (:func:`seed_problems`). Timing: jitted
``solve_batch`` per (batch, method, mode), each solve timed back to back with a ``log_softmax``
over the same logits (:func:`paired_ms`), and the CPU references of :mod:`ccnn_jax.reference`
on the same images (:func:`bench_reference`). :func:`unseen_problems` draws problem families
that the tests and :func:`tag_problems` do not produce, and :data:`CLOCKS` offers process CPU
time (for single-threaded comparisons on a shared machine).

The comparison with the original CCNN solver (C++/Eigen) is in :mod:`ccnn_jax.bench_original`.
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


UNSEEN_FAMILIES = ("field", "mixture", "segments")
"""Problem families that the project's tests and the ``tags`` generator do not produce."""


def gaussian_field(rng: np.random.Generator, side: int, channels: int, length: float):
    """(side, side, channels) smooth random field of unit variance: white noise low-passed with
    a Gaussian of ``length`` pixels in the Fourier domain (periodic)."""
    noise = rng.normal(size=(channels, side, side))
    fy, fx = np.fft.fftfreq(side)[:, None], np.fft.rfftfreq(side)[None, :]
    gain = np.exp(-2.0 * (np.pi * length) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * gain, s=(side, side))
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-12
    return field.transpose(1, 2, 0)


def _unseen_logits(rng: np.random.Generator, family: str, side: int, k: int, present):
    """Logits (side, side, K) of one image of ``family``."""
    bias = rng.normal(0.0, 1.5, size=k)
    bias[rng.choice(present)] += rng.uniform(0.0, 3.0)  # sometimes a tagged label dominates
    if family == "field":  # one smooth field per label, random correlation length and scale
        length = rng.uniform(side / 16, side / 3)
        return rng.uniform(1.0, 4.0) * gaussian_field(rng, side, k, length) + bias
    if family == "mixture":  # peaked where a smooth confidence map is high, flat elsewhere
        confidence = np.exp(rng.uniform(-1.5, 2.0) + 1.5 * gaussian_field(rng, side, 1, side / 6))
        return np.clip(confidence, 0.02, 50.0) * (gaussian_field(rng, side, k, side / 10) + bias)
    if family == "segments":  # a confident piecewise-constant label map (some labels untagged)
        centres = rng.uniform(0, side, size=(rng.integers(2, 7), 2))
        labels = rng.choice(np.concatenate([present, rng.integers(0, k, size=2)]), len(centres))
        yy, xx = np.mgrid[:side, :side]
        nearest = np.argmin(
            (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1
        )
        margin = rng.uniform(2.0, 8.0)
        return margin * np.eye(k)[labels[nearest]] + rng.normal(0, 0.7, size=(side, side, k))
    raise ValueError(f"unknown family {family!r}; expected one of {UNSEEN_FAMILIES}")


def unseen_problems(
    rng: np.random.Generator,
    b: int,
    side: int,
    k: int,
    *,
    rows: int = 32,
    families: Sequence[str] = UNSEEN_FAMILIES,
):
    """Problems the project has not seen: (log_q (B, side, side, K), stacked constraints,
    family per image).

    Each image draws a family (:func:`_unseen_logits`: Fourier-filtered random fields, peaked/
    flat mixtures, or confident segment maps), 0-5 foreground tags beside background, and
    CCNN's tag rows with random bounds (``fg_lower`` 0.02-0.15, slack 0.5-5, background
    0.1-0.4 to 0.6-0.9). The rows are padded to ``rows`` with a redundant looser copy of a
    foreground row (two identical ``a``) and inert rows (``a = 0, b = 0``), as a batch with a
    fixed row count has.
    """
    if rows < k + 3:
        raise ValueError(f"rows must be >= K + 3 = {k + 3}, got {rows}")
    log_q, sets, names = [], [], []
    for _ in range(b):
        family = str(rng.choice(list(families)))
        fg = rng.choice(np.arange(1, k), size=rng.integers(0, 6), replace=False)
        tags = np.zeros(k, bool)
        tags[0] = True
        tags[fg] = True
        logits = _unseen_logits(rng, family, side, k, np.flatnonzero(tags))
        cons = constraints.from_tags(
            tags,
            fg_lower=float(rng.uniform(0.02, 0.15)),
            fg_slack=float(rng.uniform(0.5, 5.0)),
            bg_lower=float(rng.uniform(0.1, 0.4)),
            bg_upper=float(rng.uniform(0.6, 0.9)),
        )
        a, bb, beta = (np.asarray(x) for x in (cons.a, cons.b, cons.beta))
        pad = rows - a.shape[0]
        extra_a, extra_b = np.zeros((pad, k), np.float32), np.zeros(pad, np.float32)
        extra_beta = np.where(rng.random(pad) < 0.5, np.inf, 1.0).astype(np.float32)
        if len(fg):  # the looser twin of a foreground row
            extra_a[0], extra_b[0], extra_beta[0] = a[fg[0]], bb[fg[0]] - 0.01, beta[fg[0]]
        sets.append(
            constraints.LinearConstraints(
                a=jnp.asarray(np.concatenate([a, extra_a])),
                b=jnp.asarray(np.concatenate([bb, extra_b])),
                beta=jnp.asarray(np.concatenate([beta, extra_beta])),
                mask=cons.mask,
            )
        )
        log_q.append(logits.astype(np.float32))
        names.append(family)
    return np.stack(log_q), jax.tree.map(lambda *x: jnp.stack(x), *sets), names


PROBLEMS = {
    "tags": tag_problems,
    "unseen": lambda rng, b, side, k: unseen_problems(rng, b, side, k)[:2],
}
"""Problem generators of the main table: ``(rng, B, side, K) -> (log_q, stacked cons)``."""


def take(cons, i: int, j: int | None = None):
    """Images i (single, unbatched) or i:j (batched) of a stacked constraint set."""
    return jax.tree.map(lambda x: x[i] if j is None else x[i:j], cons)


# ----------------------------------------------------------------------------- timing


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""Wall time, or this process's CPU time (all threads; with one thread on one core it is the
compute time, unaffected by other processes waiting for the core on a shared machine)."""


def paired_ms(
    fn: Callable[[], object],
    ref: Callable[[], object],
    repeats: int,
    min_ms: float = 5.0,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float, float]:
    """Median ms of ``fn`` and of ``ref``, and the median of their per-repeat ratio, timing the
    two back to back in every repeat so that both see the same load on a shared machine."""
    inner = []
    for f in (fn, ref):
        jax.block_until_ready(f())
        t0 = clock()
        jax.block_until_ready(f())
        inner.append(max(1, int(np.ceil(min_ms / max((clock() - t0) * 1e3, 1e-3)))))
    times = np.zeros((repeats, 2))
    for r in range(repeats):
        for j, (f, n) in enumerate(zip((fn, ref), inner, strict=True)):
            t0 = clock()
            for _ in range(n):
                out = f()
            jax.block_until_ready(out)
            times[r, j] = (clock() - t0) * 1e3 / n
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
    clock: Callable[[], float] = time.perf_counter,
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
                paired_ms(
                    lambda x=x, c=c, f=solver: f(x, c),
                    lambda x=x: _log_softmax(x),
                    repeats,
                    clock=clock,
                )
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
                    "ms_per_eval": sum(times) / float(info.iterations.sum()),
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


def bench_reference(
    name: str,
    fn,
    log_q,
    cons,
    images: int,
    budget_s: float,
    ours: dict,
    clock: Callable[[], float] = time.perf_counter,
):
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
        t0 = clock()
        p_ref = fn(log_q[i], c)
        ref_ms.append((clock() - t0) * 1e3)
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
