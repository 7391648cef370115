"""The solver benchmark's problems and timing (``experiments/bench_solver.py`` drives them).

Problems: network-like smooth random logits with CCNN's tag constraints (:func:`tag_problems`)
or the seed demonstration's hard foreground rows (:func:`seed_problems`). Timing: jitted
``solve_batch`` per (batch, method, mode), each solve timed back to back with a ``log_softmax``
over the same logits (:func:`paired_ms`), and the CPU references of :mod:`ccnn_jax.reference`
on the same images (:func:`bench_reference`). :func:`unseen_problems` draws problem families
that the tests and :func:`tag_problems` do not produce, and :data:`CLOCKS` offers process CPU
time (for single-threaded comparisons on a shared machine).

With a built copy of the original CCNN solver (C++/Eigen, :func:`load_original`; optional, never
required): :func:`compare_original` times it against ours on the same problems, one image after
the other, with evaluation counts on both sides.
"""

from __future__ import annotations

import functools
import os
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


# ----------------------------------------------------------------------------- original CCNN


def load_original(path: str):
    """Imports the original CCNN solver's Python module ``ccnn`` from ``path`` (the directory
    holding the built ``ccnn*.so``, or the file itself).

    The module is expected to expose the original's binding (``lib/python`` of
    github.com/pathak22/ccnn): ``ccnn.constraintloss.ConstraintSoftmax(scale)`` with
    ``addZeroConstraint``, ``addLinearConstraint(a, b, slack)`` and ``compute(f)``. If it also
    has ``constraintloss.evaluations()`` (objective evaluations since
    ``reset_evaluations()``), evaluations per image are reported. Build it outside this
    repository; nothing here depends on it.
    """
    import glob
    import importlib.util

    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "ccnn*.so")))
    if not files:
        raise FileNotFoundError(f"--original_lib: no ccnn*.so in {path!r}")
    spec = importlib.util.spec_from_file_location("ccnn", files[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(getattr(module, "constraintloss", None), "ConstraintSoftmax"):
        raise ValueError(f"--original_lib: {files[0]} has no constraintloss.ConstraintSoftmax")
    return module


def original_solve(module, f_NxK: np.ndarray, cons, hardness: float = 1.0) -> np.ndarray:
    """P (N, K) from the original solver for one image, with the rows of ``cons`` as the
    original's Python layer adds them: masked labels as a zero constraint, each non-inert row
    with its slack (``inf`` -> the original's "no slack" 1e10)."""
    csm = module.constraintloss.ConstraintSoftmax(float(hardness))
    mask = np.asarray(cons.mask, bool)
    if not mask.all():
        csm.addZeroConstraint((~mask).astype(np.float32))
    for a, b, beta in zip(
        np.asarray(cons.a, np.float32), np.asarray(cons.b), np.asarray(cons.beta), strict=True
    ):
        if a.any():
            csm.addLinearConstraint(a, float(b), float(min(beta, 1e10)))
    return csm.compute(f_NxK)


def _original_batch(module, flat, images) -> list[np.ndarray]:
    """The original solver on each image in turn."""
    return [original_solve(module, f, c) for f, c in zip(flat, images, strict=True)]


def _hard_violation(p_NxK: np.ndarray, cons) -> float:
    values = np.asarray(cons.a, np.float64) @ p_NxK.mean(axis=0)
    short = np.maximum(np.asarray(cons.b, np.float64) - values, 0.0)
    return float(np.max(np.where(np.isinf(np.asarray(cons.beta)), short, 0.0)))


def compare_original(
    module,
    sizes: Sequence[int],
    *,
    batch: int = 32,
    num_classes: int = 21,
    repeats: int = 3,
    seed: int = 0,
    rows: int = 32,
    problems: Callable | None = None,
    clock: Callable[[], float] = time.perf_counter,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Ours (``solve_batch`` of ``batch`` images) against the original (one image after the
    other) on the same unseen problems, timed back to back per repeat; both answers checked
    against SciPy's float64 dual (:func:`ccnn_jax.reference.scipy_dual`).

    ``problems(rng, batch, side, num_classes) -> (log_q, stacked cons)`` replaces the default
    generator (:func:`unseen_problems` with ``rows`` rows); rows without pixel weights only
    (the original has none) and hardness 1."""
    out = []
    counter = getattr(module.constraintloss, "evaluations", None)
    solver = jitted_solver("newton")
    for side in sizes:
        n = side * side
        log(f"[bench] original CCNN vs ours, N={n}, {batch} images")
        rng = np.random.default_rng([seed, side])
        if problems is None:
            log_q, cons, _ = unseen_problems(rng, batch, side, num_classes, rows=rows)
        else:
            log_q, cons = problems(rng, batch, side, num_classes)
        x = jnp.asarray(log_q)
        flat = [np.ascontiguousarray(log_q[i].reshape(n, num_classes)) for i in range(batch)]
        images = [jax.tree.map(np.asarray, take(cons, i)) for i in range(batch)]
        theirs = functools.partial(_original_batch, module, flat, images)
        ours = functools.partial(solver, x, cons)
        if counter is not None:
            module.constraintloss.reset_evaluations()
        p_orig = theirs()
        evals_orig = counter()[0] / batch if counter is not None else None
        sol = ours()
        t_orig, t_ours, speedup = paired_ms(theirs, ours, repeats, clock=clock)
        dp_ours, dp_orig = [], []
        for i in range(batch):
            _, p_ref = reference.scipy_dual(log_q[i], images[i])
            dp_ours.append(np.max(np.abs(np.asarray(sol.p[i]).reshape(n, -1) - p_ref)))
            dp_orig.append(np.max(np.abs(p_orig[i] - p_ref)))
        info = jax.tree.map(np.asarray, sol.info)
        evals_ours = float(info.iterations.mean())
        out.append(
            {
                "n": n,
                "side": side,
                "images": batch,
                "orig_ms_per_image": t_orig / batch,
                "orig_evals": evals_orig,
                "orig_ms_per_eval": None if evals_orig is None else t_orig / batch / evals_orig,
                "ours_ms_per_image": t_ours / batch,
                "ours_evals": evals_ours,
                "ours_ms_per_eval": t_ours / batch / evals_ours,
                "speedup": speedup,
                "max_abs_dp_ours": float(max(dp_ours)),
                "max_abs_dp_orig": float(max(dp_orig)),
                "ours_worst_gap": float(np.max(np.abs(info.gap))),
                "ours_worst_violation": float(info.max_violation.max()),
                "orig_worst_violation": max(
                    _hard_violation(p, c) for p, c in zip(p_orig, images, strict=True)
                ),
                "ours_converged": float(info.converged.mean()),
            }
        )
    return out
