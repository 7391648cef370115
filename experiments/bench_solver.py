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
  batch 1): newton vs CVXPY/Clarabel and vs SciPy.

Also reported: the first call's time per (batch, method), i.e. the XLA compile, which is
excluded from every other time.

Usage::

    python experiments/bench_solver.py                      # full run, a few minutes on 2 cores
    python experiments/bench_solver.py --quick              # smoke run, seconds
    python experiments/bench_solver.py --out runs/bench     # also writes runs/bench.{json,md}
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

from ccnn_jax import cli, reporting
from ccnn_jax.benchmark import (
    MODES,
    bench_batches,
    bench_reference,
    cvxpy_p,
    default_mode,
    scipy_p,
    seed_problems,
    tag_problems,
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

MAIN_COLUMNS = [
    "N (HxW)",
    "batch",
    "method",
    "mode",
    "ms/image",
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


def _reference_rows(problem, n, images: dict[str, int], log_q, cons, budget_s, ours, log):
    """One row per reference in ``images`` (name -> number of images; 0 skips it)."""
    rows = []
    for name, count in images.items():
        if count > 0:
            log(f"[bench]   {name} on {count} image(s)")
            row = bench_reference(name, _REFERENCES[name], log_q, cons, count, budget_s, ours)
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
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the whole benchmark and returns a json-able dict of rows and settings."""
    batches, modes = _checked(sizes, batches, methods, modes)
    rng = np.random.default_rng(seed)
    main_rows, ref_rows = [], []
    for side in sizes:
        n = side * side
        log(f"[bench] tags K={num_classes}, N={n} ({side}x{side}), {max(batches)} images")
        log_q, cons = tag_problems(rng, max(batches), side, num_classes)
        rows, ours = bench_batches(log_q, cons, batches, methods, repeats, modes)
        main_rows += [{"n": n, "side": side, **r} for r in rows]
        images = {
            "CVXPY+Clarabel": cvxpy_images if n <= cvxpy_max_n else 0,
            "SciPy L-BFGS-B": scipy_images,
        }
        ref_rows += _reference_rows(
            f"tags K={num_classes}", n, images, log_q, cons, ref_budget_s, ours, log
        )

    n = seed_side * seed_side
    log(f"[bench] seed foreground K={seed_classes}, N={n}, alpha={seed_alpha}, batch 1")
    log_q, cons = seed_problems(rng, seed_images, seed_side, seed_classes, seed_alpha)
    rows, ours = bench_batches(log_q, cons, [1], ["newton"], repeats, [default_mode()])
    seed_main = [{"n": n, "side": seed_side, **r} for r in rows]
    images = dict.fromkeys(_REFERENCES, seed_images)
    seed_refs = _reference_rows(
        f"seed fg K={seed_classes}", n, images, log_q, cons, ref_budget_s, ours, log
    )
    settings = dict(
        sizes=list(sizes),
        batches=list(batches),
        methods=list(methods),
        modes=list(modes),
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
        "settings": settings,
        "main": main_rows,
        "references": ref_rows,
        "seed_main": seed_main,
        "seed_references": seed_refs,
        "headline": headline(main_rows, seed_refs),
    }


def headline(main_rows, seed_refs) -> dict:
    """The issue's three targets, as measured."""
    out = {}
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
    """Markdown table lines of rows of formatted cells."""
    table = reporting.markdown_table([dict(zip(columns, r, strict=True)) for r in rows], columns)
    return table.splitlines()


def _main_cells(r) -> list[str]:
    return [
        f"{r['n']} ({r['side']}x{r['side']})",
        str(r["batch"]),
        r["method"],
        r["mode"],
        _g(r["ms_per_image"]),
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
    lines = [
        f"Solver benchmark, {res['date']}, {res['machine']}, load average at end "
        f"{', '.join(f'{x:.2f}' for x in res['load_average'] or [])}.",
        "",
        f"Tag constraints (`constraints.from_tags`, K={s['num_classes']}), jitted "
        f"`solve_batch`, median of {s['repeats']} repeats, compile excluded; passes = solve "
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
    h = res["headline"]
    lines += [""]
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


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
