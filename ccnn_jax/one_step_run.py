r"""The one-step demonstration on disk: both networks (trained once, cached), P, the outputs.

:func:`run` is the library entry point of ``experiments/one_step_latent.py``. It trains (or
restores from ``<workdir>/under`` and ``<workdir>/full``) a fully supervised network stopped by
an accuracy rule (Q_under: the first check at which the pixel accuracy on the first
``under_check_images`` validation images reaches ``under_accuracy``) and trained for
``full_steps`` (Q_full), from the same seed and data order; for every validation image it
solves ``P = argmin KL(P || Q_under)`` under each constraint variant and for every alpha of the
sweep, and compares with CVXPY/Clarabel. The statistics are defined in :mod:`ccnn_jax.one_step`.

Writes ``results.json``, ``results.md`` and ``latent.png`` to the workdir.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ccnn_jax import one_step, one_step_report, one_step_train, reference, reporting, solve_batch

# ----------------------------------------------------------------------------- evaluation

_constraints = jax.jit(
    one_step.variant_constraints,
    static_argnames=(
        "variant",
        "num_classes",
        "background",
        "alpha",
        "tags_fraction",
        "oracle_fraction",
    ),
)


@dataclasses.dataclass
class _Evaluation:
    """What the pass over the validation split accumulates."""

    under: one_step.Accumulator  # Q_under segmentation
    full: one_step.Accumulator  # Q_full segmentation
    variants: dict[str, one_step.Accumulator]  # per-image KLs and solver statistics of each P
    sweep: dict[float, one_step.Accumulator]  # all_labels for each alpha of the sweep
    solve_seconds: dict[str, float]
    images_solved: int = 0
    figure: dict | None = None
    cvxpy: dict | None = None
    compiled: set = dataclasses.field(default_factory=set)


def _solve(config, ev: _Evaluation, acc, variant: str, alpha: float, batch, maps, meta):
    """Solves P of ``variant`` (with ``alpha`` for ``all_labels``) for one batch, adds its
    statistics to ``acc``; returns (P, constraints, solve seconds after a compiling call)."""
    lq_u, lq_f, weight = maps
    cons = _constraints(
        variant,
        {"tags": batch["tags"], "mask": batch["mask"]},
        num_classes=meta.num_classes,
        background=meta.background,
        alpha=float(alpha),
        tags_fraction=float(config.tags_alpha),
        oracle_fraction=float(config.oracle_fraction),
    )
    kwargs = {
        "method": config.solver.method,
        "tol": float(config.solver.tol),
        "max_iter": int(config.solver.max_iter),
    }
    if variant not in ev.compiled:  # compile once (same shapes for every batch), not timed
        jax.block_until_ready(solve_batch(lq_u, cons, **kwargs))
        ev.compiled.add(variant)
    ts = time.perf_counter()
    sol = jax.block_until_ready(solve_batch(lq_u, cons, **kwargs))
    seconds = time.perf_counter() - ts
    stats = jax.device_get(
        one_step.kl_stats(
            lq_f,
            lq_u,
            sol.p,
            weight,
            batch["mask"],
            epsilon=float(config.kl_epsilon),
            num_classes=meta.num_classes,
        )
    )
    keep = (np.asarray(batch["valid"]) > 0) & (stats["count"] > 0)
    info = jax.device_get(sol.info)
    acc.add(
        keep,
        **stats,
        converged=info.converged,
        gap=info.gap,
        violation=info.max_violation,
        iterations=info.iterations,
        active=np.asarray(jax.device_get(sol.lam) > 0).any(axis=-1),
    )
    pred = jnp.argmax(sol.p, -1)
    acc.add_confusion(pred, batch["mask"], batch["valid"], jnp.argmax(lq_f, -1))
    return sol.p, cons, seconds


def _add_ceiling(config, acc, batch, maps) -> None:
    """Adds KL(Q_full || best label shift of Q_under) per image (``one_step.best_label_shift``)."""
    lq_u, lq_f, weight = maps
    shifted = one_step.best_label_shift(lq_f, lq_u, weight)
    smoothed = one_step.smoothed_log(jnp.exp(shifted), float(config.kl_epsilon))
    kl, count = jax.device_get(one_step.kl_per_image(lq_f, smoothed, weight))
    keep = (np.asarray(batch["valid"]) > 0) & (count > 0)
    acc.add(keep, kl_full_shift=kl, count=count)


def _figure(config, batch, lq_u, lq_f, latents: dict) -> dict:
    """The first images: input, ground truth, Q_under, each P and Q_full (argmax maps)."""
    n = min(int(config.num_figure_images), int(np.sum(batch["valid"])))
    figure = {
        "input": batch["image"][:n],
        "ground truth": batch["mask"][:n],
        "under-trained": np.asarray(jnp.argmax(lq_u, -1))[:n],
    }
    for v, p in latents.items():
        figure[f"latent P ({v})"] = np.asarray(jnp.argmax(p, -1))[:n]
    figure["fully trained"] = np.asarray(jnp.argmax(lq_f, -1))[:n]
    return figure


def _evaluate(config, workdir: epath.Path, under, full) -> _Evaluation:
    """One pass over the validation split: Q_under, Q_full, P of every variant and alpha."""
    tc, meta = config.train, full.meta
    k = meta.num_classes
    log_q_under_fn, log_q_full_fn = (
        one_step_train.log_probs_fn(under),
        one_step_train.log_probs_fn(full),
    )
    loader = one_step_train.eval_loader(tc, "validation", batch_size=int(config.eval_batch_size))
    variants = list(config.variants)
    ev = _Evaluation(
        under=one_step.Accumulator(k),
        full=one_step.Accumulator(k),
        variants={v: one_step.Accumulator(k) for v in variants},
        sweep={float(a): one_step.Accumulator(k) for a in config.alpha_sweep},
        solve_seconds={v: 0.0 for v in variants},
    )
    for batch in loader:
        images = jnp.asarray(batch["image"])
        lq_u, lq_f = log_q_under_fn(images), log_q_full_fn(images)
        maps = (lq_u, lq_f, one_step.labelled_pixels(batch["mask"], k, batch["valid"]))
        full_pred = jnp.argmax(lq_f, -1)
        ev.under.add_confusion(jnp.argmax(lq_u, -1), batch["mask"], batch["valid"], full_pred)
        ev.full.add_confusion(full_pred, batch["mask"], batch["valid"], full_pred)
        _add_ceiling(config, ev.under, batch, maps)
        ev.images_solved += images.shape[0]
        latents = {}
        for v in variants:
            p, cons, seconds = _solve(
                config, ev, ev.variants[v], v, config.alpha, batch, maps, meta
            )
            latents[v], ev.solve_seconds[v] = p, ev.solve_seconds[v] + seconds
            if v == config.cvxpy_variant and ev.cvxpy is None and config.cvxpy_images > 0:
                ev.cvxpy = _compare_cvxpy(config, workdir, lq_u, cons, batch["valid"])
        for alpha, acc in ev.sweep.items():
            _solve(config, ev, acc, "all_labels", alpha, batch, maps, meta)
        if ev.figure is None:
            ev.figure = _figure(config, batch, lq_u, lq_f, latents)
    if ev.figure is None:
        raise ValueError(f"the validation split of {tc.dataset!r} is empty")
    return ev


def _compare_cvxpy(config, workdir: epath.Path, lq_u, cons, valid) -> dict:
    """Our solver against CVXPY/Clarabel on the first ``cvxpy_images`` images of a batch."""
    solver_kwargs = {
        "method": config.solver.method,
        "tol": float(config.solver.tol),
        "max_iter": int(config.solver.max_iter),
    }
    result = reference.compare_with_cvxpy(
        np.asarray(lq_u),
        cons,
        np.asarray(valid),
        images=int(config.cvxpy_images),
        max_side=int(config.cvxpy_max_side),
        solver_kwargs=solver_kwargs,
        cache_dir=os.fspath(workdir / "cvxpy_cache"),
    )
    return {"variant": config.cvxpy_variant, **result}


# ----------------------------------------------------------------------------- results


def _variant_result(config, ev, variant: str, kl_full_under, kl_under_full) -> dict:
    a = ev.variants[variant]
    kl_fp = a.mean_over_images("kl_full_latent")
    kl_pf = a.mean_over_images("kl_latent_full")
    return {
        "constraints": one_step.describe(
            variant,
            alpha=float(config.alpha),
            tags_fraction=float(config.tags_alpha),
            oracle_fraction=float(config.oracle_fraction),
        ),
        "kl_full_latent": kl_fp,
        "reduction": one_step.reduction(kl_fp, kl_full_under),
        "kl_latent_full": kl_pf,
        "reverse_reduction": one_step.reduction(kl_pf, kl_under_full),
        **a.segmentation(),
        "per_class": a.per_class_kl(),
        "solver": {
            "converged_fraction": float(a.cat("converged").mean()),
            "active_fraction": float(a.cat("active").mean()),  # images with some lambda > 0
            "max_gap": float(a.cat("gap").max()),
            "max_violation": float(a.cat("violation").max()),
            "mean_iterations": float(a.cat("iterations").mean()),
            "max_iterations": int(a.cat("iterations").max()),
            "batched_ms_per_image": 1e3 * ev.solve_seconds[variant] / ev.images_solved,
        },
    }


def _sweep_result(ev: _Evaluation, kl_full_under: float) -> list[dict]:
    rows = []
    for alpha, acc in ev.sweep.items():
        kl_fp = acc.mean_over_images("kl_full_latent")
        seg = acc.segmentation()
        rows.append(
            {
                "alpha": alpha,
                "kl_full_latent": kl_fp,
                "reduction": one_step.reduction(kl_fp, kl_full_under),
                "pixel_accuracy": seg["pixel_accuracy"],
                "miou": seg["miou"],
                "active_fraction": float(acc.cat("active").mean()),
            }
        )
    return rows


def check_config(config: ml_collections.ConfigDict, num_classes: int | None = None) -> None:
    """Raises ValueError naming the field when the one-step config is inconsistent."""
    variants = list(config.variants)
    for v in variants:
        if v not in one_step.VARIANTS:
            raise ValueError(f"config.variants: {v!r} is not one of {one_step.VARIANTS}")
    for name in ("default_variant", "cvxpy_variant"):
        if config[name] not in variants:
            raise ValueError(
                f"config.{name} = {config[name]!r} must be one of config.variants {variants}"
            )
    if not 0.0 < float(config.under_accuracy) < 1.0:
        raise ValueError(f"config.under_accuracy must be in (0, 1), got {config.under_accuracy}")
    for name in ("under_check_every", "under_check_images", "full_steps"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    if int(config.train.num_steps) != int(config.full_steps):
        raise ValueError(
            f"config.train.num_steps ({config.train.num_steps}) must equal config.full_steps "
            f"({config.full_steps})"
        )
    if num_classes is not None:
        for alpha in (float(config.alpha), *map(float, config.alpha_sweep)):
            if not 0.0 <= alpha * num_classes < 1.0:
                raise ValueError(
                    f"config.alpha / alpha_sweep: every label >= {alpha} of the image is "
                    f"infeasible for {num_classes} labels (need alpha < 1/{num_classes})"
                )


def run(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> dict:
    """Runs the demonstration and writes results.json, results.md and latent.png in ``workdir``."""
    from ccnn_jax.data import pipeline

    t_start = time.time()
    check_config(config)
    workdir = epath.Path(os.path.abspath(workdir))  # orbax needs absolute checkpoint paths
    workdir.mkdir(parents=True, exist_ok=True)
    tc = config.train
    pipeline.prepare(tc.dataset, data_dir=tc.data_dir, manual_dir=tc.manual_dir)
    check_config(config, pipeline.dataset_meta(tc.dataset, data_dir=tc.data_dir).num_classes)
    t0 = time.time()
    under, checks = one_step_train.train_until_accuracy(
        tc,
        workdir / "under",
        target=float(config.under_accuracy),
        check_every=int(config.under_check_every),
        check_images=int(config.under_check_images),
        progress=progress,
    )
    if checks[-1][1] < float(config.under_accuracy):
        raise ValueError(
            f"the network never reached config.under_accuracy = {config.under_accuracy} within "
            f"{config.full_steps} steps (last check: {checks[-1]}): no under-trained network"
        )
    t_full = time.time()
    full = one_step_train.train_full(tc, workdir / "full", progress=progress)
    t_eval = time.time()
    ev = _evaluate(config, workdir, under, full)
    eval_seconds = time.time() - t_eval
    results = _results(config, ev, under, full, checks)
    results["seconds"].update(
        train_under=round(t_full - t0, 2),
        train_full=round(t_eval - t_full, 2),
        evaluate_and_solve=round(eval_seconds, 2),
        total=round(time.time() - t_start, 2),
    )
    reporting.write_json(workdir / "results.json", results)
    (workdir / "results.md").write_text(one_step_report.markdown(results))
    d = config.default_variant
    title = (
        f"{tc.dataset}: latent P ({d}) from the under-trained net, "
        f"KL reduction {results['reduction']:.1%}"
    )
    reporting.save_grid(
        workdir / "latent.png", ev.figure, class_names=full.meta.class_names, title=title
    )
    return results


def _results(config, ev: _Evaluation, under, full, checks) -> dict:
    d = config.default_variant
    kl_full_under = ev.variants[d].mean_over_images("kl_full_under")
    kl_under_full = ev.variants[d].mean_over_images("kl_under_full")
    per_variant = {
        v: _variant_result(config, ev, v, kl_full_under, kl_under_full) for v in ev.variants
    }
    return {
        "dataset": config.train.dataset,
        "class_names": list(full.meta.class_names),
        "seed": int(config.train.seed),
        "num_images": int(ev.variants[d].cat("count").size),
        "under_steps": int(jax.device_get(under.state.step)),
        "under_accuracy_target": float(config.under_accuracy),
        "under_checks": checks,  # [step, accuracy on the check images] at every check
        "full_steps": int(config.full_steps),
        "default_variant": d,
        "alpha": float(config.alpha),
        "kl_full_under": kl_full_under,
        "kl_full_latent": per_variant[d]["kl_full_latent"],
        "reduction": per_variant[d]["reduction"],
        "kl_under_full": kl_under_full,
        # the ceiling of every P whose rows weigh all pixels alike: the best label shift of Q_under
        "kl_full_best_shift": ev.under.mean_over_images("kl_full_shift"),
        "ceiling_reduction": one_step.reduction(
            ev.under.mean_over_images("kl_full_shift"), kl_full_under
        ),
        "under": ev.under.segmentation(),
        "full": ev.full.segmentation(),
        "variants": per_variant,
        "alpha_sweep": _sweep_result(ev, kl_full_under),
        "cvxpy": ev.cvxpy,
        "seconds": {
            "train_under_recorded": round(under.seconds, 2),
            "train_full_recorded": round(full.seconds, 2),
        },
        "images_solved_per_variant": ev.images_solved,
        "solve_batch_size": int(config.eval_batch_size),
        "devices": [str(dev) for dev in jax.devices()],
        "config": config.to_dict(),
    }
