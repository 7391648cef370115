r"""Held-out check of issue 14's targets on problem families that neither the tests nor
``bench_solver.py`` generate (none was used to tune the solver):

- ``mlp``: logits of a random tanh network of the pixel coordinates, at a random temperature
  (scale e^-1 to e^2: from nearly flat to confident);
- ``blocky``: nearest-neighbour upsampled coarse noise (4x4 to 16x16 cells), scale 0.5-6;

with CCNN's tag rows and 1-bit size hints (``constraints.from_tags(size=...)``: 1-8 foreground
tags, up to 3 of them "large" with a hard lower bound, the others a hard upper bound, background
bounds from the hint), C = 2K + 2 rows, hardness 1.

It runs single-threaded (one core, XLA intra-op threading off, process CPU time) and reports:

1. the original CCNN solver (``--original_lib``, C++/Eigen, optional) against ``solve_batch`` on
   the same images, per image, with evaluations and ms per evaluation on both sides, and both
   answers against SciPy's float64 dual (:func:`ccnn_jax.bench_original.compare_original`);
2. ``solve_batch`` at batch 32, N = 4096 in log-softmax passes (solve time / one jitted
   ``log_softmax`` over the same batch, timed back to back;
   :func:`ccnn_jax.benchmark.bench_batches`), with the worst duality gap and hard-row violation.

Usage::

    python experiments/bench_heldout.py --original_lib=/work/ext/ccnn/build --out runs/heldout
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ccnn_jax import constraints
from ccnn_jax.bench_original import compare_original, load_original
from ccnn_jax.benchmark import CLOCKS, bench_batches

K = 21


def _logits(rng: np.random.Generator, side: int, k: int) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side] / side
    if rng.random() < 0.5:  # mlp
        feats = np.stack([yy, xx, np.sin(6 * yy), np.cos(6 * xx), yy * xx], axis=-1)
        w1 = rng.normal(size=(5, 32)) * rng.uniform(2.0, 8.0)
        hidden = np.tanh(feats @ w1 + rng.normal(size=32))
        logits = hidden @ rng.normal(size=(32, k)) / np.sqrt(32)
        return np.exp(rng.uniform(-1.0, 2.0)) * logits + rng.normal(0.0, 1.0, size=k)
    cells = int(rng.integers(4, 17))  # blocky
    coarse = rng.normal(size=(cells, cells, k)) * rng.uniform(0.5, 6.0)
    index = (np.arange(side) * cells) // side
    return coarse[index][:, index]


def heldout_problems(rng: np.random.Generator, b: int, side: int, k: int):
    """(log_q (B, side, side, K) float32, stacked constraints with size hints)."""
    log_q, sets = [], []
    for _ in range(b):
        fg = rng.choice(np.arange(1, k), size=int(rng.integers(1, 9)), replace=False)
        tags = np.zeros(k, bool)
        tags[0] = True
        tags[fg] = True
        size = np.zeros(k, bool)
        size[rng.choice(fg, size=int(rng.integers(0, min(3, len(fg)) + 1)), replace=False)] = True
        cons = constraints.from_tags(
            tags,
            fg_lower=float(rng.uniform(0.01, 0.1)),
            fg_slack=float(rng.uniform(1.0, 10.0)),
            size=size,
        )
        sets.append(cons)
        log_q.append(_logits(rng, side, k).astype(np.float32))
    return np.stack(log_q), jax.tree.map(lambda *x: jnp.stack(x), *sets)


def main(argv):
    del argv
    from experiments.bench_solver import reexec_single_threaded, threading_note

    f = flags.FLAGS
    reexec_single_threaded(f.core)
    clock = CLOCKS["cpu"]
    res = {"threads": threading_note(), "original": [], "passes": None}
    if f.original_lib:
        res["original"] = compare_original(
            load_original(f.original_lib),
            [int(s) for s in f.sizes],
            batch=f.batch,
            num_classes=K,
            repeats=f.repeats,
            seed=f.seed,
            problems=heldout_problems,
            clock=clock,
        )
    log_q, cons = heldout_problems(np.random.default_rng([f.seed, 1]), f.batch, 64, K)
    rows, _ = bench_batches(
        log_q, cons, [f.batch], ["newton"], f.repeats, ["sequential"], clock=clock
    )
    res["passes"] = rows[0]
    print(json.dumps(res, indent=1, default=float))
    if f.out:
        os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
        with open(f.out + ".json", "w") as fh:
            json.dump(res, fh, indent=1, default=float)


if __name__ == "__main__":
    flags.DEFINE_string("original_lib", None, "Built original CCNN module (see load_original).")
    flags.DEFINE_list("sizes", ["40", "64", "128"], "Image sides of the comparison.")
    flags.DEFINE_integer("batch", 32, "Images per size.")
    flags.DEFINE_integer("repeats", 5, "Timed repeats (medians reported).")
    flags.DEFINE_integer("seed", 2024, "Seed of the held-out problems.")
    flags.DEFINE_integer("core", None, "CPU to run on (default: the first allowed).")
    flags.DEFINE_string("out", None, "If set, writes <out>.json.")
    app.run(main)
