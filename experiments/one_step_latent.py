r"""The seed's demonstration: one convex latent step from an under-trained network.

    python experiments/one_step_latent.py --workdir runs/one_step
    python experiments/one_step_latent.py --workdir runs/one_step_tiny \
        --config ccnn_jax/configs/one_step.py:tiny

Trains (or restores from ``<workdir>/under`` and ``<workdir>/full``) a fully supervised UNet
stopped early (Q_under) and fully trained (Q_full); for every validation image solves
``P = argmin KL(P || Q_under)`` under each constraint variant with ``solve_batch`` and reports
KL(Q_full || Q_under), KL(Q_full || P), ``reduction = 1 - KL(Q_full||P) / KL(Q_full||Q_under)``,
pixel accuracy and mIoU of the three argmax maps, solver statistics, and the time of our solver
against CVXPY/Clarabel on the same primal. Definitions: ``ccnn_jax/one_step.py``.

Writes ``results.json``, ``results.md`` and ``latent.png`` to the workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from ccnn_jax import checkpoint as checkpoint_lib
from ccnn_jax import one_step, reporting, solve, solve_batch
from ccnn_jax import run as run_lib
from ccnn_jax.configs import one_step as one_step_config
from ccnn_jax.models import upsample_logits

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- training (cached)


def _train_cached(train_config, workdir: epath.Path, stop_step: int, progress: bool):
    """``run.train`` in ``workdir`` up to ``stop_step`` (<= num_steps); a rerun restores it.

    The train config is stored next to the checkpoints; a rerun with a different config is an
    error (delete the directory to retrain) rather than silently mixing two runs.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    record = {
        "train_config": json.loads(json.dumps(train_config.to_dict())),
        "stop_step": stop_step,
    }
    record_path = workdir / "one_step_train_config.json"
    if record_path.exists():
        stored = json.loads(record_path.read_text())
        if stored != record:
            raise ValueError(
                f"{record_path} records a different training config than the current one; "
                f"remove {workdir} to retrain (or use another --workdir)"
            )
    else:
        reporting.write_json(record_path, record)
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints")
    done = max(ckpt.all_steps(), default=0)
    ckpt.close()
    if done > stop_step:
        raise ValueError(f"{workdir}/checkpoints holds step {done} > the requested {stop_step}")
    out = run_lib.train(
        train_config, workdir, max_steps_this_run=stop_step - done, progress=progress
    )
    step = int(jax.device_get(out.state.step))
    if step != stop_step:
        raise RuntimeError(f"training in {workdir} ended at step {step}, expected {stop_step}")
    return out


def _log_probs_fn(out):
    """Jitted images (B, H, W, 3) -> log Q (B, H, W, K) at input resolution, eval mode."""
    from flax import nnx

    def fn(params, batch_stats, images):
        model = nnx.merge(out.graphdef, params, batch_stats)
        logits = upsample_logits(model(images, train=False), images.shape[1:3])
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    jitted = jax.jit(fn)
    state = out.state
    return lambda images: jitted(state.params, state.batch_stats, images)


# ----------------------------------------------------------------------------- statistics

_constraints = jax.jit(
    one_step.variant_constraints,
    static_argnames=("variant", "num_classes", "background", "tags_fraction", "oracle_fraction"),
)


# ----------------------------------------------------------------------------- CVXPY reference


def _cvxpy_cached(cache_dir: epath.Path, log_q: np.ndarray, cons, hardness: float = 1.0):
    """CVXPY/Clarabel primal of one problem, cached by its inputs' hash: (P, seconds, cached)."""
    from ccnn_jax.reference import cvxpy_primal

    h = hashlib.sha256()
    for x in (log_q, cons.a, cons.b, cons.beta, cons.mask, np.float64(hardness)):
        x = np.ascontiguousarray(np.asarray(x))
        h.update(str((x.dtype, x.shape)).encode())
        h.update(x.tobytes())
    path = cache_dir / f"{h.hexdigest()[:24]}.npz"
    if path.exists():
        with np.load(os.fspath(path)) as f:
            return f["p"], float(f["seconds"]), True
    t0 = time.perf_counter()
    p, _ = cvxpy_primal(log_q, cons, hardness)
    seconds = time.perf_counter() - t0
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{path.stem}.tmp.npz"
    np.savez(os.fspath(tmp), p=p, seconds=seconds)
    os.replace(tmp, path)
    return p, seconds, False


def _compare_cvxpy(config, workdir, log_q_under_BxHxWxK, cons_B, valid_B) -> dict:
    """Our solve vs CVXPY on the first ``cvxpy_images`` valid images (top-left crops)."""
    s = int(config.cvxpy_max_side)
    index = [i for i in range(len(valid_B)) if valid_B[i] > 0][: int(config.cvxpy_images)]
    if len(index) < int(config.cvxpy_images):
        raise ValueError(
            f"config.cvxpy_images = {config.cvxpy_images} exceeds the "
            f"{len(index)} valid images of the first validation batch"
        )
    kwargs = {
        "method": config.solver.method,
        "tol": config.solver.tol,
        "max_iter": config.solver.max_iter,
    }
    ours_s, cvx_s, diffs, cached = [], [], [], []
    for i in index:
        log_q = jnp.asarray(log_q_under_BxHxWxK[i, :s, :s])
        cons = one_step.take(cons_B, i)
        jax.block_until_ready(solve(log_q, cons, **kwargs))  # compile
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            sol = jax.block_until_ready(solve(log_q, cons, **kwargs))
            times.append(time.perf_counter() - t0)
        p_cvx, seconds, was_cached = _cvxpy_cached(workdir / "cvxpy_cache", np.asarray(log_q), cons)
        k = log_q.shape[-1]
        diffs.append(float(np.abs(np.asarray(sol.p, np.float64).reshape(-1, k) - p_cvx).max()))
        ours_s.append(float(np.median(times)))
        cvx_s.append(seconds)
        cached.append(was_cached)
    h, w = log_q_under_BxHxWxK.shape[1:3]
    return {
        "variant": config.cvxpy_variant,
        "images": len(index),
        "image_size": [min(h, s), min(w, s)],
        "cvxpy_seconds_per_image": float(np.mean(cvx_s)),
        "ours_single_ms_per_image": 1e3 * float(np.mean(ours_s)),
        "speedup_single": float(np.mean(cvx_s) / np.mean(ours_s)),
        "max_abs_diff_p": float(max(diffs)),
        "cvxpy_cached": all(cached),
    }


# ----------------------------------------------------------------------------- the experiment


def _check_config(config: ml_collections.ConfigDict) -> None:
    variants = list(config.variants)
    for v in variants:
        if v not in one_step.VARIANTS:
            raise ValueError(f"config.variants: {v!r} is not one of {one_step.VARIANTS}")
    for name in ("default_variant", "cvxpy_variant"):
        if config[name] not in variants:
            raise ValueError(
                f"config.{name} = {config[name]!r} must be one of config.variants {variants}"
            )
    if not 0 < int(config.under_steps) < int(config.full_steps):
        raise ValueError(
            f"need 0 < config.under_steps ({config.under_steps}) < "
            f"config.full_steps ({config.full_steps})"
        )
    if int(config.train.num_steps) != int(config.full_steps):
        raise ValueError(
            f"config.train.num_steps ({config.train.num_steps}) must equal config.full_steps "
            f"({config.full_steps})"
        )


@dataclasses.dataclass
class _Evaluation:
    """What the pass over the validation split accumulates."""

    under: one_step.Accumulator  # Q_under segmentation
    full: one_step.Accumulator  # Q_full segmentation
    variants: dict[str, one_step.Accumulator]  # per-image KLs and solver statistics of each P
    solve_seconds: dict[str, float]
    images_solved: int = 0
    figure: dict | None = None
    cvxpy: dict | None = None
    compiled: set[str] = dataclasses.field(default_factory=set)


def _solve_variant(config, ev: _Evaluation, variant: str, batch, lq_u, lq_f, weight, meta):
    """Solves P of ``variant`` for one batch (timed after a first, compiling call) and adds its
    statistics to ``ev``; returns (P, the batch's constraints)."""
    cons = _constraints(
        variant,
        {"tags": batch["tags"], "mask": batch["mask"]},
        num_classes=meta.num_classes,
        background=meta.background,
        tags_fraction=float(config.tags_alpha),
        oracle_fraction=float(config.oracle_fraction),
    )
    solver_kwargs = {
        "method": config.solver.method,
        "tol": float(config.solver.tol),
        "max_iter": int(config.solver.max_iter),
    }
    if variant not in ev.compiled:  # compile once (same shapes for every batch), not timed
        jax.block_until_ready(solve_batch(lq_u, cons, **solver_kwargs))
        ev.compiled.add(variant)
    ts = time.perf_counter()
    sol = jax.block_until_ready(solve_batch(lq_u, cons, **solver_kwargs))
    ev.solve_seconds[variant] += time.perf_counter() - ts
    stats = jax.device_get(
        one_step.kl_stats(lq_f, lq_u, sol.p, weight, epsilon=float(config.kl_epsilon))
    )
    keep = (np.asarray(batch["valid"]) > 0) & (stats["count"] > 0)
    info = jax.device_get(sol.info)
    acc = ev.variants[variant]
    acc.add(
        keep,
        **stats,
        converged=info.converged,
        gap=info.gap,
        violation=info.max_violation,
        iterations=info.iterations,
        active=np.asarray(jax.device_get(sol.lam) > 0).any(axis=-1),
    )
    acc.add_confusion(jnp.argmax(sol.p, -1), batch["mask"], batch["valid"])
    return sol.p, cons


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
    """One pass over the validation split: Q_under, Q_full and P of every variant."""
    from ccnn_jax.data import pipeline

    tc, meta = config.train, full.meta
    k = meta.num_classes
    log_q_under_fn, log_q_full_fn = _log_probs_fn(under), _log_probs_fn(full)
    loader = pipeline.make_loader(
        tc.dataset,
        "validation",
        data_dir=tc.data_dir,
        batch_size=int(config.eval_batch_size),
        image_size=tuple(tc.image_size),
        train=False,
        seed=int(tc.seed),
        num_epochs=1,
        shard_by_process=False,
    )
    variants = list(config.variants)
    ev = _Evaluation(
        under=one_step.Accumulator(k),
        full=one_step.Accumulator(k),
        variants={v: one_step.Accumulator(k) for v in variants},
        solve_seconds={v: 0.0 for v in variants},
    )
    for batch in loader:
        images = jnp.asarray(batch["image"])
        lq_u, lq_f = log_q_under_fn(images), log_q_full_fn(images)
        weight = one_step.labelled_pixels(batch["mask"], k, batch["valid"])
        ev.under.add_confusion(jnp.argmax(lq_u, -1), batch["mask"], batch["valid"])
        ev.full.add_confusion(jnp.argmax(lq_f, -1), batch["mask"], batch["valid"])
        ev.images_solved += images.shape[0]
        latents = {}
        for v in variants:
            latents[v], cons = _solve_variant(config, ev, v, batch, lq_u, lq_f, weight, meta)
            if v == config.cvxpy_variant and ev.cvxpy is None and config.cvxpy_images > 0:
                ev.cvxpy = _compare_cvxpy(
                    config, workdir, np.asarray(lq_u), cons, np.asarray(batch["valid"])
                )
        if ev.figure is None:
            ev.figure = _figure(config, batch, lq_u, lq_f, latents)
    if ev.figure is None:
        raise ValueError(f"the validation split of {tc.dataset!r} is empty")
    return ev


def _variant_result(config, ev: _Evaluation, variant: str, kl_full_under, kl_under_full) -> dict:
    a = ev.variants[variant]
    kl_fp = a.mean_over_images("kl_full_latent")
    kl_pf = a.mean_over_images("kl_latent_full")
    return {
        "constraints": one_step.describe(
            variant,
            tags_fraction=float(config.tags_alpha),
            oracle_fraction=float(config.oracle_fraction),
        ),
        "kl_full_latent": kl_fp,
        "reduction": one_step.reduction(kl_fp, kl_full_under),
        "kl_latent_full": kl_pf,
        "reverse_reduction": one_step.reduction(kl_pf, kl_under_full),
        **a.segmentation(),
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


def run(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> dict:
    """Runs the demonstration and writes results.json, results.md and latent.png in ``workdir``."""
    t_start = time.time()
    _check_config(config)
    workdir = epath.Path(os.path.abspath(workdir))  # orbax needs absolute checkpoint paths
    workdir.mkdir(parents=True, exist_ok=True)
    tc = config.train
    t0 = time.time()
    under = _train_cached(tc, workdir / "under", int(config.under_steps), progress)
    full = _train_cached(tc, workdir / "full", int(config.full_steps), progress)
    train_seconds = time.time() - t0
    t_eval = time.time()
    ev = _evaluate(config, workdir, under, full)
    eval_seconds = time.time() - t_eval

    d = config.default_variant
    kl_full_under = ev.variants[d].mean_over_images("kl_full_under")
    kl_under_full = ev.variants[d].mean_over_images("kl_under_full")
    per_variant = {
        v: _variant_result(config, ev, v, kl_full_under, kl_under_full) for v in ev.variants
    }
    results = {
        "dataset": tc.dataset,
        "num_images": int(ev.variants[d].cat("count").size),
        "under_steps": int(config.under_steps),
        "full_steps": int(config.full_steps),
        "default_variant": d,
        "kl_full_under": kl_full_under,
        "kl_full_latent": per_variant[d]["kl_full_latent"],
        "reduction": per_variant[d]["reduction"],
        "kl_under_full": kl_under_full,
        "under": ev.under.segmentation(),
        "full": ev.full.segmentation(),
        "variants": per_variant,
        "cvxpy": ev.cvxpy,
        "seconds": {
            "train": round(train_seconds, 2),
            "evaluate_and_solve": round(eval_seconds, 2),
            "train_under_recorded": round(under.seconds, 2),
            "train_full_recorded": round(full.seconds, 2),
        },
        "images_solved_per_variant": ev.images_solved,
        "solve_batch_size": int(config.eval_batch_size),
        "devices": [str(dev) for dev in jax.devices()],
        "config": config.to_dict(),
    }
    results["seconds"]["total"] = round(time.time() - t_start, 2)
    reporting.write_json(workdir / "results.json", results)
    (workdir / "results.md").write_text(one_step.markdown(results))
    title = (
        f"{tc.dataset}: latent P ({d}) from the under-trained net, "
        f"KL reduction {results['reduction']:.1%}"
    )
    reporting.save_grid(
        workdir / "latent.png", ev.figure, class_names=full.meta.class_names, title=title
    )
    return results


# ----------------------------------------------------------------------------- CLI


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = FLAGS.config, FLAGS.workdir
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Reuse compiled programs: the two training runs, and every rerun, compile the same ones.
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    results = run(config, workdir)
    print(one_step.markdown(results))
    print(json.dumps({k: results[k] for k in ("kl_full_under", "kl_full_latent", "reduction")}))
    print(
        f"total {results['seconds']['total']:.1f} s; written to "
        f"{os.path.join(workdir, 'results.json')}"
    )


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file(
        "config", one_step_config.__file__, "ml_collections config file"
    )
    flags.DEFINE_string("workdir", None, "directory for the cached networks and results")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
