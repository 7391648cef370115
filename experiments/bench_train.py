"""CCNN train-step time / fully supervised train-step time at the default config.

    python experiments/bench_train.py [--config ccnn_jax/configs/synthetic.py] [--steps 20]

Both steps use the same UNet, batch and optimizer; the CCNN step adds the per-image constraint
solve (vmapped projected Newton on stop_gradient(log Q)) and the CE to P. Batches are read once
and kept in memory, so data loading is not timed. The two steps are timed in alternating
blocks (the median step of each) to be fair under a noisy shared CPU. Target: ratio <= 1.10.
"""

import json
import time

from absl import app, flags, logging
from ml_collections import config_flags

from ccnn_jax.configs import synthetic

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from ccnn_jax import losses, train
    from ccnn_jax.data import pipeline

    base = FLAGS.config
    pipeline.prepare(base.dataset, data_dir=base.data_dir)
    meta = pipeline.dataset_meta(base.dataset, data_dir=base.data_dir)
    loader = pipeline.make_loader(
        base.dataset,
        "train",
        data_dir=base.data_dir,
        batch_size=base.batch_size,
        image_size=tuple(base.image_size),
        train=True,
        seed=0,
    )
    it = iter(loader)
    batches_np = [next(it) for _ in range(FLAGS.block)]

    runners = {}
    for method in ("ccnn", "full"):
        config = base.copy_and_resolve_references()
        config.method = method
        graphdef, state, tx = train.create_train_state(config, meta.num_classes)
        steps = train.make_steps(graphdef, tx, losses.loss_spec(config, meta))
        batches = [steps.put_batch(b) for b in batches_np]
        state = steps.put_state(state)
        t = time.perf_counter()
        state, m = steps.train(state, batches[0])
        jax.block_until_ready(m)
        print(f"{method}: compile + first step {time.perf_counter() - t:.1f} s", flush=True)
        runners[method] = [steps, state, batches]

    times = {m: [] for m in runners}
    while min(len(v) for v in times.values()) < FLAGS.steps:
        for method, r in runners.items():
            steps, state, batches = r
            for b in batches:
                t = time.perf_counter()
                state, m = steps.train(state, b)
                jax.block_until_ready(m)
                times[method].append(time.perf_counter() - t)
            r[1] = state
    med = {m: float(np.median(v)) for m, v in times.items()}
    result = {
        "ccnn_step_s": round(med["ccnn"], 4),
        "full_step_s": round(med["full"], 4),
        "ratio_ccnn_over_full": round(med["ccnn"] / med["full"], 3),
        "steps_each": len(times["ccnn"]),
        "batch_size": base.batch_size,
        "image_size": list(base.image_size),
        "devices": jax.device_count(),
    }
    print(json.dumps(result))
    ratio = result["ratio_ccnn_over_full"]
    print(f"CCNN step / fully supervised step = {ratio:.3f} (target <= 1.10)")


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file("config", synthetic.__file__, "ml_collections config file")
    flags.DEFINE_integer("steps", 20, "timed steps per method")
    flags.DEFINE_integer("block", 5, "steps per alternating block")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
