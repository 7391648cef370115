r"""Benchmark of the constrained latent solver against a softmax pass and CPU references.

Measures, in one run on this machine, for CCNN's tag constraints (K = 21: background plus
1-3 random foreground labels, ``constraints.from_tags``) on smooth network-like logits whose
constraints are active (P != Q; the fraction with lambda != 0 is reported):

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
- with ``--problems=unseen``, the main table on problem families the project's tests do not
  generate (:func:`ccnn_jax.benchmark.unseen_problems`);
- with ``--original_lib``: the original CCNN solver (C++/Eigen projected gradient, built
  separately, :func:`ccnn_jax.bench_original.load_original`) against ours on the same unseen
  problems (batch 32 at N = 1600, 4096, 16384), ms per image, evaluations per image and ms
  per evaluation on both sides, and both answers against SciPy's float64 dual.

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
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import flags

from ccnn_jax import cli
from ccnn_jax.bench_original import compare_original, load_original
from ccnn_jax.bench_report import headline, to_markdown
from ccnn_jax.benchmark import (
    CLOCKS,
    MODES,
    PROBLEMS,
    bench_batches,
    bench_reference,
    cvxpy_p,
    default_mode,
    scipy_p,
    seed_problems,
)
from ccnn_jax.configs import ConfigError

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

# ----------------------------------------------------------------------------- driver


def _checked(sizes, batches, methods, modes) -> tuple[list[int], list[str]]:
    """Validates the arguments of :func:`run`; returns the batches and modes to time."""
    if not modes or set(modes) - set(MODES):
        raise ConfigError(f"modes must be among {list(MODES)}, got {list(modes)}")
    if default_mode() not in modes:
        modes = [default_mode(), *modes]  # the reference comparison uses the default mode
    if "newton" not in methods:
        raise ConfigError(
            f"methods must include 'newton' (the reference ratios use it), got {list(methods)}"
        )
    bad = [b for b in batches if b < 1]
    if bad or not batches or not sizes or min(sizes) < 2:
        raise ConfigError(
            f"sizes must be >= 2 and batches >= 1, got sizes={list(sizes)}, batches={list(batches)}"
        )
    batches = sorted(set(batches))
    if 1 not in batches:
        batches = [1, *batches]  # the reference comparison is per image at batch 1
    return batches, list(modes)


_REFERENCES = {"CVXPY+Clarabel": cvxpy_p, "SciPy L-BFGS-B": scipy_p}


def _reference_rows(problem, n, images: dict[str, int], log_q, cons, budget_s, ours, log, clock):
    """One row per reference in ``images`` (name -> number of images; 0 skips it)."""
    rows = []
    for name, count in images.items():
        if count > 0:
            log(f"[bench]   {name} on {count} image(s)")
            row = bench_reference(
                name, _REFERENCES[name], log_q, cons, count, budget_s, ours, clock=clock
            )
            rows.append({"problem": problem, "n": n, **row})
    return rows


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

    ``problems`` picks the main table's generator (:data:`ccnn_jax.benchmark.PROBLEMS`),
    ``clock`` the timer (:data:`ccnn_jax.benchmark.CLOCKS`); ``original`` (a module from
    :func:`ccnn_jax.bench_original.load_original`) adds the comparison with the original CCNN
    solver at ``original_sizes``.
    """
    if problems not in PROBLEMS:
        raise ValueError(f"problems must be one of {list(PROBLEMS)}, got {problems!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {list(CLOCKS)}, got {clock!r}")
    timer = CLOCKS[clock]
    batches, modes = _checked(sizes, batches, methods, modes)
    rng = np.random.default_rng(seed)
    main_rows, ref_rows = [], []
    for side in sizes:
        n = side * side
        log(f"[bench] {problems} K={num_classes}, N={n} ({side}x{side}), {max(batches)} images")
        log_q, cons = PROBLEMS[problems](rng, max(batches), side, num_classes)
        rows, ours = bench_batches(log_q, cons, batches, methods, repeats, modes, clock=timer)
        main_rows += [{"n": n, "side": side, **r} for r in rows]
        images = {
            "CVXPY+Clarabel": cvxpy_images if n <= cvxpy_max_n else 0,
            "SciPy L-BFGS-B": scipy_images,
        }
        ref_rows += _reference_rows(
            f"{problems} K={num_classes}", n, images, log_q, cons, ref_budget_s, ours, log, timer
        )

    n = seed_side * seed_side
    log(f"[bench] seed foreground K={seed_classes}, N={n}, alpha={seed_alpha}, batch 1")
    log_q, cons = seed_problems(rng, seed_images, seed_side, seed_classes, seed_alpha)
    rows, ours = bench_batches(log_q, cons, [1], ["newton"], repeats, [default_mode()], clock=timer)
    seed_main = [{"n": n, "side": seed_side, **r} for r in rows]
    images = dict.fromkeys(_REFERENCES, seed_images)
    seed_refs = _reference_rows(
        f"seed fg K={seed_classes}", n, images, log_q, cons, ref_budget_s, ours, log, timer
    )
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
    settings = dict(
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
    )
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]) if sys.argv else "",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"on {jax.default_backend()}",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": threading_note(),
        "settings": settings,
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
    xla = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}".strip()
    env = {**os.environ, _SINGLE_THREAD_ENV: "1", "XLA_FLAGS": xla}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


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


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
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


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
