r"""The seed's demonstration: one convex latent step from an under-trained network.

    python experiments/one_step_latent.py --workdir runs/one_step
    python experiments/one_step_latent.py --workdir runs/one_step_tiny \
        --config experiments/configs/one_step.py:tiny

Trains (or restores from ``<workdir>/under`` and ``<workdir>/full``) a fully supervised UNet
stopped early (Q_under) and fully trained (Q_full); for every validation image solves
``P = argmin KL(P || Q_under)`` under each constraint variant with ``solve_batch`` and reports
KL(Q_full || Q_under), KL(Q_full || P), ``reduction = 1 - KL(Q_full||P) / KL(Q_full||Q_under)``,
pixel accuracy and mIoU of the three argmax maps, solver statistics, and the time of our solver
against CVXPY/Clarabel on the same primal. Definitions: ``ccnn_jax/one_step.py``.

Writes ``results.json``, ``results.md`` and ``latent.png`` to the workdir.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ccnn_jax import checkpoint as checkpoint_lib  # noqa: E402
from ccnn_jax import metrics, one_step, reporting, solve, solve_batch  # noqa: E402
from ccnn_jax.models import upsample_logits  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "one_step.py")


# ----------------------------------------------------------------------------- training (cached)


def _train_cached(train_config, workdir: epath.Path, stop_step: int, progress: bool):
    """``train.train`` in ``workdir`` up to ``stop_step`` (<= num_steps); a rerun restores it.

    The train config is stored next to the checkpoints; a rerun with a different config is an
    error (delete the directory to retrain) rather than silently mixing two runs.
    """
    from ccnn_jax import train as train_lib

    workdir.mkdir(parents=True, exist_ok=True)
    record = {"train_config": json.loads(json.dumps(train_config.to_dict())),
              "stop_step": stop_step}  # fmt: skip
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
    out = train_lib.train(train_config, workdir, max_steps_this_run=stop_step - done,
                          progress=progress)  # fmt: skip
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


@functools.partial(jax.jit, static_argnames=("epsilon",))
def _kl_stats(log_full, log_under, p, weight, *, epsilon):
    """Per-image KLs (B,) of one batch (see ``ccnn_jax.one_step`` for the definition)."""
    q_full, q_under = jnp.exp(log_full), jnp.exp(log_under)
    log_p = jnp.log(p)
    kl_fu, count = one_step.kl_per_image(log_full, one_step.smoothed_log(q_under, epsilon), weight)
    kl_fp, _ = one_step.kl_per_image(log_full, one_step.smoothed_log(p, epsilon), weight)
    kl_pf, _ = one_step.kl_per_image(log_p, one_step.smoothed_log(q_full, epsilon), weight)
    kl_uf, _ = one_step.kl_per_image(log_under, one_step.smoothed_log(q_full, epsilon), weight)
    return {"kl_full_under": kl_fu, "kl_full_latent": kl_fp, "kl_latent_full": kl_pf,
            "kl_under_full": kl_uf, "count": count}  # fmt: skip


class _Accumulator:
    """Per-image values (valid images only) and a confusion matrix, summed over batches."""

    def __init__(self, num_classes: int):
        self.k = num_classes
        self.values: dict[str, list[np.ndarray]] = {}
        self.confusion = np.zeros((num_classes, num_classes), np.int64)

    def add(self, keep: np.ndarray, **per_image):
        for name, v in per_image.items():
            self.values.setdefault(name, []).append(np.asarray(v)[keep])

    def add_confusion(self, pred, mask, valid):
        c = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(mask), self.k,
                                     jnp.asarray(valid))  # fmt: skip
        self.confusion += np.asarray(c, np.int64)

    def cat(self, name) -> np.ndarray:
        return np.concatenate(self.values[name])

    def segmentation(self) -> dict:
        return {"pixel_accuracy": metrics.pixel_accuracy(self.confusion),
                "miou": metrics.mean_iou(self.confusion)}  # fmt: skip


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
        raise ValueError(f"config.cvxpy_images = {config.cvxpy_images} exceeds the "
                         f"{len(index)} valid images of the first validation batch")  # fmt: skip
    kwargs = {"method": config.solver.method, "tol": config.solver.tol,
              "max_iter": config.solver.max_iter}  # fmt: skip
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


def run(config: ml_collections.ConfigDict, workdir, *, progress: bool = True) -> dict:
    """Runs the demonstration and writes results.json, results.md and latent.png in ``workdir``."""
    from ccnn_jax.data import pipeline

    t_start = time.time()
    workdir = epath.Path(os.path.abspath(workdir))  # orbax needs absolute checkpoint paths
    workdir.mkdir(parents=True, exist_ok=True)
    variants = list(config.variants)
    for v in variants:
        if v not in one_step.VARIANTS:
            raise ValueError(f"config.variants: {v!r} is not one of {one_step.VARIANTS}")
    for name in ("default_variant", "cvxpy_variant"):
        if config[name] not in variants:
            raise ValueError(f"config.{name} = {config[name]!r} must be one of config.variants "
                             f"{variants}")  # fmt: skip
    if not 0 < int(config.under_steps) < int(config.full_steps):
        raise ValueError(f"need 0 < config.under_steps ({config.under_steps}) < "
                         f"config.full_steps ({config.full_steps})")  # fmt: skip
    tc = config.train
    if int(tc.num_steps) != int(config.full_steps):
        raise ValueError(f"config.train.num_steps ({tc.num_steps}) must equal config.full_steps "
                         f"({config.full_steps})")  # fmt: skip

    t0 = time.time()
    under = _train_cached(tc, workdir / "under", int(config.under_steps), progress)
    full = _train_cached(tc, workdir / "full", int(config.full_steps), progress)
    train_seconds = time.time() - t0
    meta = full.meta
    k = meta.num_classes
    log_q_under_fn, log_q_full_fn = _log_probs_fn(under), _log_probs_fn(full)

    loader = pipeline.make_loader(
        tc.dataset, "validation", data_dir=tc.get("data_dir"),
        batch_size=int(config.eval_batch_size), image_size=tuple(tc.image_size), train=False,
        seed=int(tc.seed), num_epochs=1, shard_by_process=False,
    )  # fmt: skip
    solver_kwargs = {"method": config.solver.method, "tol": float(config.solver.tol),
                     "max_iter": int(config.solver.max_iter)}  # fmt: skip
    base = _Accumulator(k)  # KL(full || under), Q_under / Q_full segmentation
    base_full = _Accumulator(k)
    acc = {v: _Accumulator(k) for v in variants}
    solve_seconds = {v: 0.0 for v in variants}
    compiled: set[str] = set()
    figure, cvxpy_result, images_solved, num_batches = None, None, 0, 0
    t_eval = time.time()
    for batch in loader:
        num_batches += 1
        images = jnp.asarray(batch["image"])
        lq_u, lq_f = log_q_under_fn(images), log_q_full_fn(images)
        weight = one_step.labelled_pixels(batch["mask"], k, batch["valid"])
        base.add_confusion(jnp.argmax(lq_u, -1), batch["mask"], batch["valid"])
        base_full.add_confusion(jnp.argmax(lq_f, -1), batch["mask"], batch["valid"])
        images_solved += images.shape[0]
        latents = {}
        for v in variants:
            cons = _constraints(
                v, {"tags": batch["tags"], "mask": batch["mask"]}, num_classes=k,
                background=meta.background,
                tags_fraction=float(config.tags_alpha),
                oracle_fraction=float(config.oracle_fraction),
            )  # fmt: skip
            if v not in compiled:  # compile once (same shapes for every batch), not timed
                jax.block_until_ready(solve_batch(lq_u, cons, **solver_kwargs))
                compiled.add(v)
            ts = time.perf_counter()
            sol = jax.block_until_ready(solve_batch(lq_u, cons, **solver_kwargs))
            solve_seconds[v] += time.perf_counter() - ts
            stats = jax.device_get(_kl_stats(lq_f, lq_u, sol.p, weight,
                                             epsilon=float(config.kl_epsilon)))  # fmt: skip
            keep = (np.asarray(batch["valid"]) > 0) & (stats["count"] > 0)
            info = jax.device_get(sol.info)
            active = np.asarray(jax.device_get(sol.lam) > 0).any(axis=-1)
            acc[v].add(keep, **stats, converged=info.converged, gap=info.gap,
                       violation=info.max_violation, iterations=info.iterations,
                       active=active)  # fmt: skip
            acc[v].add_confusion(jnp.argmax(sol.p, -1), batch["mask"], batch["valid"])
            latents[v] = sol.p
            if v == config.cvxpy_variant and cvxpy_result is None and config.cvxpy_images > 0:
                cvxpy_result = _compare_cvxpy(config, workdir, np.asarray(lq_u), cons,
                                              np.asarray(batch["valid"]))  # fmt: skip
        if figure is None:
            n = min(int(config.num_figure_images), int(np.sum(batch["valid"])))
            figure = {"input": batch["image"][:n], "ground truth": batch["mask"][:n],
                      "under-trained": np.asarray(jnp.argmax(lq_u, -1))[:n]}  # fmt: skip
            for v in variants:
                figure[f"latent P ({v})"] = np.asarray(jnp.argmax(latents[v], -1))[:n]
            figure["fully trained"] = np.asarray(jnp.argmax(lq_f, -1))[:n]
    if figure is None:
        raise ValueError(f"the validation split of {tc.dataset!r} is empty")
    eval_seconds = time.time() - t_eval

    d = config.default_variant
    kl_full_under = one_step.mean_over_images(acc[d].cat("kl_full_under"), acc[d].cat("count"))
    kl_under_full = one_step.mean_over_images(acc[d].cat("kl_under_full"), acc[d].cat("count"))
    per_variant = {}
    for v in variants:
        a, count = acc[v], acc[v].cat("count")
        kl_fp = one_step.mean_over_images(a.cat("kl_full_latent"), count)
        kl_pf = one_step.mean_over_images(a.cat("kl_latent_full"), count)
        per_variant[v] = {
            "constraints": one_step.describe(v, tags_fraction=float(config.tags_alpha),
                                             oracle_fraction=float(config.oracle_fraction)),
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
                "batched_ms_per_image": 1e3 * solve_seconds[v] / images_solved,
            },
        }  # fmt: skip
    results = {
        "dataset": tc.dataset,
        "num_images": int(acc[d].cat("count").size),
        "under_steps": int(config.under_steps),
        "full_steps": int(config.full_steps),
        "default_variant": d,
        "kl_full_under": kl_full_under,
        "kl_full_latent": per_variant[d]["kl_full_latent"],
        "reduction": per_variant[d]["reduction"],
        "kl_under_full": kl_under_full,
        "under": base.segmentation(),
        "full": base_full.segmentation(),
        "variants": per_variant,
        "cvxpy": cvxpy_result,
        "seconds": {
            "train": round(train_seconds, 2),
            "evaluate_and_solve": round(eval_seconds, 2),
            "train_under_recorded": round(under.seconds, 2),
            "train_full_recorded": round(full.seconds, 2),
        },  # fmt: skip
        "images_solved_per_variant": images_solved,
        "solve_batch_size": int(config.eval_batch_size),
        "devices": [str(dev) for dev in jax.devices()],
        "config": config.to_dict(),
    }
    results["seconds"]["total"] = round(time.time() - t_start, 2)
    reporting.write_json(workdir / "results.json", results)
    (workdir / "results.md").write_text(markdown(results))
    title = (f"{tc.dataset}: latent P ({d}) from the under-trained net, "
             f"KL reduction {results['reduction']:.1%}")  # fmt: skip
    reporting.save_grid(workdir / "latent.png", figure, class_names=meta.class_names, title=title)
    return results


def table_rows(results: dict) -> list[dict]:
    """One row per map: Q_under, P of each variant, Q_full."""
    rows = [{"map": f"Q_under (step {results['under_steps']})",
             "KL(Q_full‖·)": results["kl_full_under"], "reduction": 0.0,
             "KL(·‖Q_full)": results["kl_under_full"], **results["under"]}]  # fmt: skip
    for v, r in results["variants"].items():
        rows.append({"map": f"P `{v}`", "KL(Q_full‖·)": r["kl_full_latent"],
                     "reduction": r["reduction"], "KL(·‖Q_full)": r["kl_latent_full"],
                     "pixel_accuracy": r["pixel_accuracy"], "miou": r["miou"],
                     "converged": r["solver"]["converged_fraction"],
                     "active": r["solver"]["active_fraction"],
                     "max gap": f"{r['solver']['max_gap']:.1e}",
                     "ms/image": r["solver"]["batched_ms_per_image"]})  # fmt: skip
    rows.append({"map": f"Q_full (step {results['full_steps']})", "KL(Q_full‖·)": 0.0,
                 "KL(·‖Q_full)": 0.0, **results["full"]})  # fmt: skip
    return rows


def markdown(results: dict) -> str:
    columns = ["map", "KL(Q_full‖·)", "reduction", "KL(·‖Q_full)", "pixel_accuracy", "miou",
               "active", "converged", "max gap", "ms/image"]  # fmt: skip
    text = reporting.markdown_table(table_rows(results), columns)
    c = results.get("cvxpy")
    if c:
        text += (
            f"\nCVXPY/Clarabel on {c['images']} image(s) of {c['image_size'][0]}x"
            f"{c['image_size'][1]} (`{c['variant']}`): {c['cvxpy_seconds_per_image']:.2f} s/image"
            f" vs {c['ours_single_ms_per_image']:.2f} ms/image for our single-image solve "
            f"({c['speedup_single']:.0f}x); max |P_ours - P_cvxpy| = {c['max_abs_diff_p']:.1e}.\n"
        )
    return text


# ----------------------------------------------------------------------------- CLI


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Reuse compiled programs: the two training runs, and every rerun, compile the same ones.
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    results = run(config, workdir)
    print(markdown(results))
    print(json.dumps({k: results[k] for k in ("kl_full_under", "kl_full_latent", "reduction")}))
    print(f"total {results['seconds']['total']:.1f} s; written to "
          f"{os.path.join(workdir, 'results.json')}")  # fmt: skip


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "ml_collections config file")
    flags.DEFINE_string("workdir", None, "directory for the cached networks and results")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
