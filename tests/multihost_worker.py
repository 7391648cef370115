"""One process of the two-process run of ``test_multihost.py`` (not a test module).

    python tests/multihost_worker.py --process_id 0 --num_processes 2 --port 12345 \
        --workdir W --data_dir D --out O [--fail_after_first_run]

Joins the run through ``ccnn_jax.distributed.initialize`` (gloo, short timeouts), trains the
tiny ``ccnn`` config in ``W`` for 3 steps (a checkpoint, then the run ends as if preempted),
trains again in the same workdir (every process restores that checkpoint and continues to step
6), evaluates on 9 validation images (uneven shards: ``distributed.lockstep``) and writes
``O/process_<i>.npz``: the final parameters, ``resumed_from``, the confusion matrix. With
``--fail_after_first_run`` this process raises instead of the second run (inside
``distributed.exit_on_error``, as ``experiments/train.py`` runs).
"""

import argparse
import os
import sys

import numpy as np

HEARTBEAT_TIMEOUT_S = 10
INITIALIZATION_TIMEOUT_S = 120
FIRST_RUN_STEPS = 3
EVAL_SPLIT = "validation[:9]"


def config_for_test(data_dir):
    """The tiny ccnn config without pretraining, 6 steps of global batch 8, checkpoint at 3."""
    from ccnn_jax.configs import synthetic

    config = synthetic.get_config("ccnn,tiny")
    config.data_dir = data_dir
    config.pretrain.steps = config.pretrain.easy_steps = 0
    config.num_steps, config.checkpoint_every = 6, FIRST_RUN_STEPS
    return config


def main():
    parser = argparse.ArgumentParser()
    for name in ("process_id", "num_processes", "port"):
        parser.add_argument(f"--{name}", type=int, required=True)
    for name in ("workdir", "data_dir", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--fail_after_first_run", action="store_true")
    args = parser.parse_args()

    from ccnn_jax import distributed

    distributed.initialize(
        f"127.0.0.1:{args.port}",
        args.num_processes,
        args.process_id,
        initialization_timeout_s=INITIALIZATION_TIMEOUT_S,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_s=60,
    )
    import jax

    from ccnn_jax import run

    print(f"process {jax.process_index()}: {jax.devices()}", flush=True)
    config = config_for_test(args.data_dir)
    with distributed.exit_on_error():
        run.train(config, args.workdir, max_steps_this_run=FIRST_RUN_STEPS, progress=False)
        print(f"process {args.process_id}: first run done", flush=True)
        if args.fail_after_first_run:
            raise RuntimeError(f"injected failure in process {args.process_id}")
        out = run.train(config, args.workdir, progress=False)
        confusion, _ = run.evaluate(out, config, split=EVAL_SPLIT)
    params = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(out.state.params))]
    os.makedirs(args.out, exist_ok=True)
    np.savez(
        os.path.join(args.out, f"process_{args.process_id}.npz"),
        *params,
        resumed_from=np.int64(out.resumed_from),
        confusion=confusion,
    )
    print(f"process {args.process_id}: done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
