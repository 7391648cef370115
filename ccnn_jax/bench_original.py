"""The original CCNN solver (C++/Eigen, built from its published source; optional, never
required) against ours: :func:`load_original` imports a built copy, :func:`compare_original`
times it against ``solve_batch`` on the same problems, one image after the other, with
evaluation counts on both sides and both answers checked against SciPy's float64 dual."""

from __future__ import annotations

import functools
import glob
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccnn_jax import reference
from ccnn_jax.benchmark import jitted_solver, paired_ms, take, unseen_problems


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
