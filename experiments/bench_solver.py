r"""Benchmark of the constrained latent solver against a softmax pass and CPU references.

Measures, in one run on this machine, for CCNN's tag constraints (K = 21: background plus
1-3 random foreground labels, ``constraints.from_tags``) on smooth network-like logits whose
constraints are active (P != Q; the fraction with lambda != 0 is reported), or with
``--problems=unseen`` on problem families the project's tests do not generate
(:func:`unseen_problems`):

- ms per image of ``solve_batch`` (jitted, compile excluded, ``block_until_ready``, median of
  repeats) for ``newton`` and ``pga`` at each image size and batch size, mean / max iterations,
  worst duality gap, worst hard-row violation, converged fraction, and "passes": solve time
  divided by the time of one jitted ``jax.nn.log_softmax`` over the same batch of logits (the
  median of per-repeat ratios, the two timed back to back, so a shared machine's load changes
  affect both), for both ``solve_batch`` modes (sequential, the CPU default, and vmap);
- the CPU float64 references of :mod:`ccnn_jax.reference` on the same problems: CVXPY +
  Clarabel on the primal (small N only, under a time budget) and SciPy L-BFGS-B on the dual,
  as reference-time / our-time ratios per image and max |P_ours - P_ref|;
- the seed demonstration's problem (K = 11, 32 x 32, ``constraints.foreground(0.05)`` hard,
  batch 1): newton vs CVXPY/Clarabel and vs SciPy;
- with ``--original_lib``: the original CCNN solver (C++/Eigen projected gradient, built
  separately, :func:`load_original`) against ours on the same unseen problems (batch 32 at
  N = 1600, 4096, 16384), ms per image, evaluations per image and ms per evaluation on both
  sides, and both answers against SciPy's float64 dual.

``--single_thread`` restarts the program on one core with XLA's intra-op threading off
(``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``) and times
with process CPU time, so that per-image ratios against single-threaded references are fair
and a shared machine's load does not enter the times.

Also reported: the first call's time per (batch, method), i.e. the XLA compile, which is
excluded from every other time.

Usage::

    python experiments/bench_solver.py                      # full run, a few minutes on 2 cores
    python experiments/bench_solver.py --quick              # smoke run, seconds
    python experiments/bench_solver.py --out runs/bench     # also writes runs/bench.{json,md}
    # issue 14: unseen problems, one core, and the original CCNN solver built elsewhere
    python experiments/bench_solver.py --problems=unseen --single_thread \
        --original_lib=/work/ext/ccnn/build --out runs/bench_unseen
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ccnn_jax import constraints, reference, solve_batch

flags.DEFINE_list("sizes", ["40", "64", "128"], "Image side lengths H = W (N = side^2).")
flags.DEFINE_list("batches", ["1", "32"], "Batch sizes; the largest is the number of problems.")
flags.DEFINE_list("methods", ["newton", "pga"], "Solver methods to time.")
flags.DEFINE_list(
    "modes",
    ["sequential", "vmap"],
    "solve_batch modes to time: 'sequential' "
    "(lax.map, the CPU default) and/or 'vmap' (the accelerator default).",
)
flags.DEFINE_integer("num_classes", 21, "K for the tag-constraint problems (VOC: 21).")
flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (the median is reported).")
flags.DEFINE_integer("seed", 0, "Seed of the random problems.")
flags.DEFINE_integer("cvxpy_max_n", 1600, "Largest N on which CVXPY/Clarabel is run.")
flags.DEFINE_integer("cvxpy_images", 2, "Images per size solved with CVXPY/Clarabel.")
flags.DEFINE_integer("scipy_images", 4, "Images per size solved with SciPy L-BFGS-B.")
flags.DEFINE_float(
    "ref_budget_s",
    60.0,
    "Time budget per reference and size; no new image "
    "is started once it is spent (at least one image always runs).",
)
flags.DEFINE_integer("seed_side", 32, "Side of the seed's foreground problem (N = side^2).")
flags.DEFINE_integer("seed_classes", 11, "K of the seed's foreground problem.")
flags.DEFINE_float("seed_alpha", 0.05, "Hard lower bound per label of the seed's problem.")
flags.DEFINE_integer("seed_images", 3, "Images of the seed's problem (each solved at batch 1).")
flags.DEFINE_bool("quick", False, "Smoke run: tiny sizes and repeats (overrides the sizes).")
flags.DEFINE_string("out", None, "If set, writes <out>.json and <out>.md.")
flags.DEFINE_enum(
    "problems",
    "tags",
    ["tags", "unseen"],
    "Problems of the main table: the "
    "project's tag problems, or families it has not seen (`unseen_problems`).",
)
flags.DEFINE_bool(
    "single_thread",
    False,
    "Restart on one core (--core) with XLA's intra-op "
    "threading off, and time with process CPU time, for per-image comparisons "
    "with single-threaded references.",
)
flags.DEFINE_integer("core", None, "CPU for --single_thread (default: the first allowed).")
flags.DEFINE_string(
    "original_lib",
    None,
    "Directory (or file) of the original CCNN solver's "
    "built Python module `ccnn` (see load_original); adds the comparison with "
    "it. Skipped when absent.",
)
flags.DEFINE_list("original_sizes", ["40", "64", "128"], "Image sides of that comparison.")
flags.DEFINE_integer("original_batch", 32, "Images per size of that comparison.")

#: ``--quick``: one tiny size at batch 1 (each shape costs a compile of several seconds).
QUICK = dict(
    sizes=[8],
    batches=[1],
    repeats=2,
    cvxpy_max_n=64,
    cvxpy_images=1,
    scipy_images=1,
    seed_side=8,
    seed_images=1,
    ref_budget_s=20.0,
)

MAIN_COLUMNS = [
    "N (HxW)",
    "batch",
    "method",
    "mode",
    "ms/image",
    "ms/eval",
    "passes",
    "iters mean",
    "iters max",
    "worst gap",
    "worst viol",
    "converged",
    "active",
    "compile s",
]
REF_COLUMNS = [
    "problem",
    "N",
    "reference",
    "images",
    "ref ms/image",
    "newton ms/image",
    "ref/newton",
    "pga ms/image",
    "ref/pga",
    "max|P_newton-P_ref|",
]


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
    clock: Callable[[], float] = time.perf_counter,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Ours (``solve_batch`` of ``batch`` images) against the original (one image after the
    other) on the same unseen problems, timed back to back per repeat; both answers checked
    against SciPy's float64 dual (:func:`ccnn_jax.reference.scipy_dual`)."""
    out = []
    counter = getattr(module.constraintloss, "evaluations", None)
    solver = jitted_solver("newton")
    for side in sizes:
        n = side * side
        log(f"[bench] original CCNN vs ours, unseen problems, N={n}, {batch} images")
        log_q, cons, _ = unseen_problems(
            np.random.default_rng([seed, side]), batch, side, num_classes, rows=rows
        )
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


ORIGINAL_COLUMNS = [
    "N",
    "images",
    "original ms/image",
    "original evals",
    "original ms/eval",
    "ours ms/image",
    "ours evals",
    "ours ms/eval",
    "speedup",
    "max|P_orig-P_ref|",
    "max|P_ours-P_ref|",
    "ours worst gap",
    "worst hard viol orig / ours",
    "ours converged",
]


def _original_cells(r) -> list[str]:
    def opt(key):
        return "-" if r[key] is None else _g(r[key])

    return [
        str(r["n"]),
        str(r["images"]),
        _g(r["orig_ms_per_image"]),
        opt("orig_evals"),
        opt("orig_ms_per_eval"),
        _g(r["ours_ms_per_image"]),
        _g(r["ours_evals"]),
        _g(r["ours_ms_per_eval"]),
        f"{r['speedup']:.1f}x",
        _g(r["max_abs_dp_orig"]),
        _g(r["max_abs_dp_ours"]),
        _g(r["ours_worst_gap"]),
        f"{_g(r['orig_worst_violation'])} / {_g(r['ours_worst_violation'])}",
        f"{r['ours_converged']:.2f}",
    ]


# ----------------------------------------------------------------------------- driver


def run(
    sizes: Sequence[int],
    batches: Sequence[int],
    methods: Sequence[str],
    *,
    modes: Sequence[str] = ("sequential", "vmap"),
    num_classes=21,
    repeats=5,
    seed=0,
    cvxpy_max_n=1600,
    cvxpy_images=2,
    scipy_images=4,
    ref_budget_s=60.0,
    seed_side=32,
    seed_classes=11,
    seed_alpha=0.05,
    seed_images=3,
    problems: str = "tags",
    clock: str = "wall",
    original=None,
    original_sizes: Sequence[int] = (40, 64, 128),
    original_batch: int = 32,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the whole benchmark and returns a json-able dict of rows and settings.

    ``problems`` picks the main table's generator (:data:`PROBLEMS`), ``clock`` the timer
    (:data:`CLOCKS`); ``original`` (a module from :func:`load_original`) adds the comparison
    with the original CCNN solver at ``original_sizes``.
    """
    if problems not in PROBLEMS:
        raise ValueError(f"problems must be one of {list(PROBLEMS)}, got {problems!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {list(CLOCKS)}, got {clock!r}")
    timer = CLOCKS[clock]
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"modes must be among {list(MODES)}, got {list(modes)}")
    if default_mode() not in modes:
        modes = [default_mode(), *modes]  # the reference comparison uses the default mode
    if "newton" not in methods:
        raise ValueError(
            f"methods must include 'newton' (the reference ratios use it), got {list(methods)}"
        )
    bad = [b for b in batches if b < 1]
    if bad or not batches or not sizes or min(sizes) < 2:
        raise ValueError(
            f"sizes must be >= 2 and batches >= 1, got sizes={list(sizes)}, batches={list(batches)}"
        )
    batches = sorted(set(batches))
    if 1 not in batches:
        batches = [1, *batches]  # the reference comparison is per image at batch 1
    rng = np.random.default_rng(seed)
    main_rows, ref_rows = [], []
    for side in sizes:
        n = side * side
        log(f"[bench] {problems} K={num_classes}, N={n} ({side}x{side}), {max(batches)} images")
        log_q, cons = PROBLEMS[problems](rng, max(batches), side, num_classes)
        rows, ours = bench_batches(log_q, cons, batches, methods, repeats, modes, clock=timer)
        for r in rows:
            main_rows.append({"n": n, "side": side, **r})
        problem = f"{problems} K={num_classes}"
        if n <= cvxpy_max_n and cvxpy_images > 0:
            log(f"[bench]   CVXPY/Clarabel on {cvxpy_images} image(s)")
            ref_rows.append(
                {
                    "problem": problem,
                    "n": n,
                    **bench_reference(
                        "CVXPY+Clarabel",
                        cvxpy_p,
                        log_q,
                        cons,
                        cvxpy_images,
                        ref_budget_s,
                        ours,
                        clock=timer,
                    ),
                }
            )
        if scipy_images > 0:
            log(f"[bench]   SciPy L-BFGS-B on {scipy_images} image(s)")
            ref_rows.append(
                {
                    "problem": problem,
                    "n": n,
                    **bench_reference(
                        "SciPy L-BFGS-B",
                        scipy_p,
                        log_q,
                        cons,
                        scipy_images,
                        ref_budget_s,
                        ours,
                        clock=timer,
                    ),
                }
            )

    n = seed_side * seed_side
    log(f"[bench] seed foreground K={seed_classes}, N={n}, alpha={seed_alpha}, batch 1")
    log_q, cons = seed_problems(rng, seed_images, seed_side, seed_classes, seed_alpha)
    rows, ours = bench_batches(log_q, cons, [1], ["newton"], repeats, [default_mode()], clock=timer)
    seed_main = [{"n": n, "side": seed_side, **r} for r in rows]
    problem = f"seed fg K={seed_classes}"
    seed_refs = [
        {
            "problem": problem,
            "n": n,
            **bench_reference(
                "CVXPY+Clarabel", cvxpy_p, log_q, cons, seed_images, ref_budget_s, ours, clock=timer
            ),
        },
        {
            "problem": problem,
            "n": n,
            **bench_reference(
                "SciPy L-BFGS-B", scipy_p, log_q, cons, seed_images, ref_budget_s, ours, clock=timer
            ),
        },
    ]
    original_rows = []
    if original is not None:
        original_rows = compare_original(
            original,
            original_sizes,
            batch=original_batch,
            num_classes=num_classes,
            repeats=max(1, repeats // 2),
            seed=seed,
            clock=timer,
            log=log,
        )
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]) if sys.argv else "",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"on {jax.default_backend()}",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": threading_note(),
        "settings": dict(
            sizes=list(sizes),
            batches=list(batches),
            methods=list(methods),
            modes=list(modes),
            problems=problems,
            clock=clock,
            num_classes=num_classes,
            repeats=repeats,
            seed=seed,
            cvxpy_max_n=cvxpy_max_n,
            seed_side=seed_side,
            seed_classes=seed_classes,
            seed_alpha=seed_alpha,
        ),
        "main": main_rows,
        "references": ref_rows,
        "seed_main": seed_main,
        "seed_references": seed_refs,
        "original": original_rows,
        "headline": headline(main_rows, seed_refs, original_rows),
    }


SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
_SINGLE_THREAD_ENV = "CCNN_BENCH_SINGLE_THREAD"


def threading_note() -> str:
    """What this process runs on: its CPU affinity and XLA's thread flags."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    single = os.environ.get(_SINGLE_THREAD_ENV) == "1"
    return (
        f"{'single-threaded' if single else 'default threads'}, CPUs {cpus}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )


def reexec_single_threaded(core: int | None) -> None:
    """Restarts this program on one core with XLA's intra-op threading off (XLA reads its
    flags once, when the backend starts, so they cannot be changed in a running process)."""
    if os.environ.get(_SINGLE_THREAD_ENV) == "1":
        return
    core = min(os.sched_getaffinity(0)) if core is None else core
    os.sched_setaffinity(0, {core})
    env = {
        **os.environ,
        _SINGLE_THREAD_ENV: "1",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}".strip(),
    }
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def headline(main_rows, seed_refs, original_rows=()) -> dict:
    """The issues' targets, as measured."""
    out = {}
    if original_rows:
        out["speedup_vs_original"] = {str(r["n"]): r["speedup"] for r in original_rows}
    big = [r for r in main_rows if r["method"] == "newton" and r["n"] == 4096]
    if big:
        top = max(r["batch"] for r in big)
        out["newton_passes_n4096"] = {
            "batch": top,
            "target": 10.0,
            "passes": {r["mode"]: r["passes"] for r in big if r["batch"] == top},
            "default_mode": default_mode(),
        }
    for ref in seed_refs:
        key = "cvxpy" if ref["reference"].startswith("CVXPY") else "scipy"
        out[f"seed_speedup_vs_{key}"] = ref["ref_over_newton"]
    return out


# ----------------------------------------------------------------------------- formatting


def _g(x: float, digits=3) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.1e}"
    return f"{x:.{digits}g}"


def _table(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _main_cells(r) -> list[str]:
    return [
        f"{r['n']} ({r['side']}x{r['side']})",
        str(r["batch"]),
        r["method"],
        r["mode"],
        _g(r["ms_per_image"]),
        _g(r["ms_per_eval"]),
        _g(r["passes"]),
        f"{r['iters_mean']:.1f}",
        str(r["iters_max"]),
        _g(r["worst_gap"]),
        _g(r["worst_violation"]),
        f"{r['converged']:.2f}",
        f"{r['active']:.2f}",
        f"{r['compile_s']:.1f}",
    ]


def _ref_cells(r) -> list[str]:
    def opt(key):
        return _g(r[key]) if key in r else "-"

    ratio = lambda key: (
        (f"{r[key]:.0f}x" if r[key] >= 10 else f"{r[key]:.2g}x") if key in r else "-"
    )  # noqa: E731
    return [
        r["problem"],
        str(r["n"]),
        r["reference"],
        str(r["images"]),
        _g(r["ref_ms_per_image"]),
        opt("newton_ms_per_image"),
        ratio("ref_over_newton"),
        opt("pga_ms_per_image"),
        ratio("ref_over_pga"),
        _g(r["max_abs_dp_newton"]),
    ]


def to_markdown(res: dict) -> str:
    """The results as markdown: main table, references table, the seed problem, headline."""
    s = res["settings"]
    problems = {
        "tags": "Tag constraints (`constraints.from_tags`",
        "unseen": "Unseen problem families (`unseen_problems`: fields, mixtures, "
        "segments; 0-5 tags; rows padded to 32",
    }[s.get("problems", "tags")]
    clock = {"wall": "wall time", "cpu": "process CPU time"}[s.get("clock", "wall")]
    lines = [
        f"Solver benchmark, {res['date']}, {res['machine']}, load average at end "
        f"{', '.join(f'{x:.2f}' for x in res['load_average'] or [])}; "
        f"{res.get('threads', '')}.",
        "",
        f"{problems}, K={s['num_classes']}), jitted "
        f"`solve_batch`, median of {s['repeats']} repeats, {clock}, compile excluded; "
        "ms/eval = ms/image / evaluations of the dual per image; passes = solve "
        "time / one jitted `log_softmax` over the same batch (median of per-repeat ratios, "
        "timed back to back); active = fraction of images "
        "with lambda != 0 (P != Q).",
        "",
    ]
    lines += _table(MAIN_COLUMNS, [_main_cells(r) for r in res["main"]])
    lines += [
        "",
        f"Seed's foreground problem (K={s['seed_classes']}, "
        f"alpha={s['seed_alpha']} hard, batch 1):",
        "",
    ]
    lines += _table(MAIN_COLUMNS, [_main_cells(r) for r in res["seed_main"]])
    lines += [
        "",
        "References (CPU, float64) on the same problems; ours at batch 1 on the same images:",
        "",
    ]
    lines += _table(
        REF_COLUMNS, [_ref_cells(r) for r in res["references"] + res["seed_references"]]
    )
    if res.get("original"):
        lines += [
            "",
            "The original CCNN solver (C++/Eigen, one image after the other) against "
            "ours (`solve_batch`, batch of the same images) on unseen problems, timed back "
            "to back; speedup = median per-repeat ratio; P checked against SciPy's float64 "
            "dual:",
            "",
        ]
        lines += _table(ORIGINAL_COLUMNS, [_original_cells(r) for r in res["original"]])
    h = res["headline"]
    lines += [""]
    if "speedup_vs_original" in h:
        lines.append(
            "- ours vs the original CCNN solver per image: "
            + ", ".join(f"{v:.1f}x at N={n}" for n, v in h["speedup_vs_original"].items())
            + " (target >= 10x)."
        )
    if "newton_passes_n4096" in h:
        p = h["newton_passes_n4096"]
        modes = ", ".join(
            f"{v:.1f} {k}" + (" (default here)" if k == p["default_mode"] else "")
            for k, v in p["passes"].items()
        )
        lines.append(
            f"- newton, batch {p['batch']}, N=4096, K={s['num_classes']}: passes "
            f"{modes} (target <= {p['target']:.0f})."
        )
    lines.append(
        f"- seed problem: newton {h['seed_speedup_vs_cvxpy']:.0f}x faster than "
        f"CVXPY/Clarabel (target >= 1000x), {h['seed_speedup_vs_scipy']:.0f}x faster "
        "than SciPy L-BFGS-B."
    )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    f = flags.FLAGS
    if f.single_thread:
        reexec_single_threaded(f.core)
    original = None
    if f.original_lib:
        original = load_original(f.original_lib)
    kw = dict(
        repeats=f.repeats,
        cvxpy_max_n=f.cvxpy_max_n,
        cvxpy_images=f.cvxpy_images,
        scipy_images=f.scipy_images,
        ref_budget_s=f.ref_budget_s,
        seed_side=f.seed_side,
        seed_images=f.seed_images,
    )
    sizes = [int(x) for x in f.sizes]
    batches = [int(x) for x in f.batches]
    if f.quick:
        kw.update({k: v for k, v in QUICK.items() if k not in ("sizes", "batches")})
        sizes, batches = QUICK["sizes"], QUICK["batches"]
    res = run(
        sizes,
        batches,
        f.methods,
        modes=f.modes,
        num_classes=f.num_classes,
        seed=f.seed,
        seed_classes=f.seed_classes,
        seed_alpha=f.seed_alpha,
        problems=f.problems,
        clock="cpu" if f.single_thread else "wall",
        original=original,
        original_sizes=[int(x) for x in f.original_sizes],
        original_batch=f.original_batch,
        **kw,
    )
    md = to_markdown(res)
    print(md)
    if f.out:
        os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
        with open(f.out + ".json", "w") as fh:
            json.dump(res, fh, indent=1)
        with open(f.out + ".md", "w") as fh:
            fh.write(md)
        print(f"[bench] wrote {f.out}.json and {f.out}.md")


if __name__ == "__main__":
    app.run(main)
