"""The solver benchmark's tables: the columns, the cells of each row, the headline figures and
the markdown report of ``experiments/bench_solver.py`` (its ``run`` gives the results dict)."""

from __future__ import annotations

from ccnn_jax import reporting
from ccnn_jax.benchmark import default_mode

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
