"""Smoke test of experiments/bench_solver.py: the ``--quick`` CLI path end to end.

Runs the script in a subprocess with ``--quick --out`` and checks the markdown table and the
json: the expected rows and columns, finite positive timings and ratios, converged solves that
agree with the CPU references. ``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` only shortens the XLA
compiles (about 5 s each on 2 cores otherwise); the quick timings are not asserted.
"""

import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from ccnn_jax import bench_report, benchmark
from experiments import bench_solver

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_solver.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick"
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", f"--out={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    return res, md, proc.stdout


def _table_rows(md: str, header: list[str]) -> list[list[str]]:
    """Body rows of the first markdown table after the line equal to ``header``."""
    lines = md.splitlines()
    head = "| " + " | ".join(header) + " |"
    start = lines.index(head)
    assert set(lines[start + 1]) <= set("|-"), lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _finite_numbers(row: dict):
    for key, value in row.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert math.isfinite(value), (key, value, row)


def test_quick_rows_and_columns(quick):
    res, md, stdout = quick
    q = bench_solver.QUICK
    assert md in stdout  # printed as well as written
    want = [
        (s * s, b, m, o)
        for s, b, m, o in itertools.product(
            q["sizes"], q["batches"], ["newton", "pga"], ["sequential", "vmap"]
        )
    ]
    got = [(r["n"], r["batch"], r["method"], r["mode"]) for r in res["main"]]
    assert got == want
    body = _table_rows(md, bench_report.MAIN_COLUMNS)
    assert len(body) == len(want)
    assert all(len(r) == len(bench_report.MAIN_COLUMNS) for r in body)
    assert [(r[1], r[2], r[3]) for r in body] == [(str(b), m, o) for _, b, m, o in want]
    for r in body:  # ms/image, passes, iterations, gap, violation, converged: numbers
        for cell in r[4:]:
            assert math.isfinite(float(cell)), r
    refs = [(r["problem"], r["reference"]) for r in res["references"] + res["seed_references"]]
    assert refs == [
        ("tags K=21", "CVXPY+Clarabel"),
        ("tags K=21", "SciPy L-BFGS-B"),
        ("seed fg K=11", "CVXPY+Clarabel"),
        ("seed fg K=11", "SciPy L-BFGS-B"),
    ]
    ref_body = _table_rows(md, bench_report.REF_COLUMNS)
    assert [(r[0], r[2]) for r in ref_body] == refs
    assert "faster than CVXPY/Clarabel" in md


def test_quick_numbers(quick):
    res, _, _ = quick
    rows = res["main"] + res["seed_main"]
    assert len(res["seed_main"]) == 1 and res["seed_main"][0]["method"] == "newton"
    for r in rows:
        _finite_numbers(r)
        assert r["ms_per_image"] > 0 and r["passes"] > 0 and r["compile_s"] > 0
        assert r["iters_max"] >= r["iters_mean"] >= 1
        assert r["converged"] == 1.0 and r["worst_violation"] <= 1e-4
        assert 0.0 <= r["active"] <= 1.0
    assert res["seed_main"][0]["active"] == 1.0  # the seed's problem is never trivial
    for r in res["references"] + res["seed_references"]:
        _finite_numbers(r)
        assert r["images"] >= 1 and r["ref_ms_per_image"] > 0
        assert r["ref_over_newton"] == pytest.approx(
            r["ref_ms_per_image"] / r["newton_ms_per_image"]
        )
        assert r["max_abs_dp_newton"] < 1e-3  # same optimum as the float64 references
    h = res["headline"]
    assert h["seed_speedup_vs_cvxpy"] > 0 and h["seed_speedup_vs_scipy"] > 0


def test_problems_are_active_and_reproducible():
    """Most generated tag problems are non-trivial: Q itself violates a row, so lambda != 0.

    lambda = 0 is optimal iff every row holds at P(0) = masked softmax(log_q) (the dual's
    gradient b - s(P(0)) is <= 0 on the box's lower face), checked here in numpy.
    """
    import numpy as np

    log_q, cons = benchmark.tag_problems(np.random.default_rng(0), 16, 8, 21)
    again, _ = benchmark.tag_problems(np.random.default_rng(0), 16, 8, 21)
    np.testing.assert_array_equal(log_q, again)
    assert log_q.shape == (16, 8, 8, 21) and cons.a.shape == (16, 23, 21)
    mask = np.asarray(cons.mask)
    assert mask[:, 0].all() and ((mask[:, 1:].sum(1) >= 1) & (mask[:, 1:].sum(1) <= 3)).all()
    z = np.where(mask[:, None, None, :], log_q, -np.inf)
    p0 = np.exp(z - z.max(-1, keepdims=True))
    p0 /= p0.sum(-1, keepdims=True)
    values = np.einsum("bhwk,bck->bc", p0, np.asarray(cons.a)) / (8 * 8)
    violated = (np.asarray(cons.b) - values > 1e-6).any(-1)
    assert 0.5 <= violated.mean() < 1.0  # mostly active, and some already satisfied by Q


def test_bad_arguments():
    with pytest.raises(ValueError, match="newton"):
        bench_solver.run([8], [1], ["pga"])
    with pytest.raises(ValueError, match="sizes"):
        bench_solver.run([1], [1], ["newton"])
