"""Train-step throughput of any config on any device: images/s, step time, the solver's share.

    python experiments/bench_train.py [--config ccnn_jax/configs/synthetic.py] [--steps 20] \\
        [--data dataset|random] [--out bench_train]
    python experiments/bench_train.py --config ccnn_jax/configs/voc.py:ccnn_vgg16 --data random \\
        --config.image_size='(128, 128)' --config.batch_size=2 --out runs/bench_vgg16_128

Times the CCNN step (``config.method`` if it is a CCNN method, else ``ccnn``) against the plain
fully supervised step (``full``) on the same model, batch, optimizer and device(s); the
difference is the constraint solve and the CE to P, reported as the solver's share of the CCNN
step. Batches are made once and kept in memory (data loading is not timed): the config's
dataset (``--data dataset``, must be prepared) or random images with one to three rectangles of
random classes and the tags and size bits of those masks (``--data random``, any dataset,
nothing to download: ready for a lent accelerator). Weights are random
(``config.model.pretrained`` is ignored; pretraining is skipped). The steps of the two methods
alternate in blocks, and each reports its median, to be fair under a noisy shared CPU.

``cpu_s`` is the process's CPU time per step (all threads): on a shared CPU the work, whatever
the load. Memory: XLA's estimate for the compiled CCNN step (arguments + outputs +
temporaries, the same on every backend), the device's peak bytes in use where the backend
reports it (GPU, TPU), and the host's peak resident memory. Writes ``<out>.json`` and
``<out>.md`` and prints both.

Measured: the synthetic default (UNet, 64x64, batch 16) in ``docs/results.md`` ("Train-step
time"); VGG-16 FCN-32s at a reduced size (``voc.py:ccnn_vgg16``): ``ccnn_jax/configs/voc.py``.
"""

import json
import resource
import time

from absl import app, flags, logging
from ml_collections import config_flags

from ccnn_jax import cli
from ccnn_jax.configs import synthetic

FLAGS = flags.FLAGS
PLAIN_METHOD = "full"
CCNN_METHODS = ("ccnn", "ccnn_size")
MIB = 2**20


def random_batch(rng, batch_size, image_size, num_classes, background) -> dict:
    """Random images (B, H, W, 3) in [0, 1] and masks of one to three rectangles of random
    classes on the background (or on a random class without one), with their tags and size
    bits (class covers > 10% of the image), as the pipeline computes them."""
    import numpy as np

    h, w = image_size
    masks = np.empty((batch_size, h, w), np.int32)
    for b in range(batch_size):
        masks[b] = background if background is not None else rng.integers(num_classes)
        for _ in range(rng.integers(1, 4)):
            bh, bw = rng.integers(h // 10 + 1, h // 2 + 2), rng.integers(w // 10 + 1, w // 2 + 2)
            y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            masks[b, y : y + bh, x : x + bw] = rng.integers(num_classes)
    counts = np.stack([np.bincount(m.ravel(), minlength=num_classes) for m in masks])
    return {
        "image": rng.uniform(0, 1, (batch_size, h, w, 3)).astype(np.float32),
        "mask": masks,
        "tags": (counts > 0).astype(np.float32),
        "size": (counts > 0.1 * h * w).astype(np.float32),
        "valid": np.ones(batch_size, np.float32),
        "pixels": np.ones((batch_size, h, w), np.float32),  # every pixel from the image
    }


def make_batches(config, meta, data: str, count: int) -> list[dict]:
    """``count`` process-local batches (``batch_size / process_count`` images each)."""
    import jax
    import numpy as np

    from ccnn_jax.data import pipeline

    local_batch = config.batch_size // jax.process_count()
    if data == "random":
        rng = np.random.default_rng(config.seed + jax.process_index())
        size, k, bg = tuple(config.image_size), meta.num_classes, meta.background
        return [random_batch(rng, local_batch, size, k, bg) for _ in range(count)]
    loader = pipeline.make_loader(
        config.dataset,
        config.train_split,
        data_dir=config.data_dir,
        batch_size=local_batch,
        image_size=tuple(config.image_size),
        train=True,
        seed=config.seed,
        scale_range=tuple(config.scale_range),
    )
    it = iter(loader)
    return [next(it) for _ in range(count)]


def _memory_estimate(compiled) -> dict:
    """XLA's memory estimate of a compiled step (MiB), where the backend provides it."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = ("argument", "output", "temp", "alias", "generated_code")
    sizes = {n: getattr(stats, f"{n}_size_in_bytes", 0) for n in names}
    total = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return {f"xla_{n}_mib": round(v / MIB, 1) for n, v in sizes.items()} | {
        "xla_total_mib": round(total / MIB, 1)
    }


class _Runner:
    """One method's compiled train step, its (donated) state and its step times."""

    def __init__(self, config, meta, method, state, batches_np):
        from ccnn_jax import losses, train

        config = config.copy_and_resolve_references()
        config.method = method
        graphdef, _, tx = train.create_train_state(config, meta.num_classes, abstract=True)
        steps = train.make_steps(graphdef, tx, losses.loss_spec(config, meta))
        self.method, self.times, self.cpu_times = method, [], []
        self.state = steps.put_state(state)
        self.batches = [steps.put_batch(b) for b in batches_np]
        t = time.perf_counter()
        self.step = steps.train.lower(self.state, self.batches[0]).compile()
        self.compile_s = time.perf_counter() - t
        self.memory = _memory_estimate(self.step)

    def run_block(self, record: bool) -> None:
        import jax

        for batch in self.batches:
            t, cpu = time.perf_counter(), time.process_time()
            self.state, step_metrics = self.step(self.state, batch)
            jax.block_until_ready(step_metrics)
            if record:
                self.times.append(time.perf_counter() - t)
                self.cpu_times.append(time.process_time() - cpu)


def bench(config, *, data: str, steps: int, block: int) -> dict:
    """Times the CCNN and the plain step of ``config`` (see the module docstring)."""
    import jax
    import numpy as np

    from ccnn_jax import train
    from ccnn_jax.data import pipeline

    config = config.copy_and_resolve_references()
    config.model.pretrained = None  # timing does not depend on the weights
    config.pretrain.steps = config.pretrain.easy_steps = 0
    if config.batch_size % jax.device_count():
        raise ValueError(
            f"config.batch_size = {config.batch_size} must be divisible by the "
            f"{jax.device_count()} devices"
        )
    meta = pipeline.dataset_meta(config.dataset, data_dir=config.data_dir)
    ccnn = config.method if config.method in CCNN_METHODS else "ccnn"
    batches_np = make_batches(config, meta, data, block)
    t = time.perf_counter()
    _, state, _ = train.create_train_state(config, meta.num_classes)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    runners = [
        _Runner(config, meta, m, jax.tree.map(lambda x: x.copy(), state), batches_np)
        for m in (ccnn, PLAIN_METHOD)
    ]
    del state
    for r in runners:
        r.run_block(record=False)  # warm-up
    while min(len(r.times) for r in runners) < steps:
        for r in runners:
            r.run_block(record=True)
    median = {r.method: float(np.median(r.times)) for r in runners}
    median_cpu = {r.method: float(np.median(r.cpu_times)) for r in runners}
    device = jax.devices()[0]
    device_stats = device.memory_stats() or {}
    num_params = sum(x.size for x in jax.tree.leaves(runners[0].state.params))
    return {
        "config": config.dataset,
        "model": config.model.name,
        "method": ccnn,
        "dtype": config.dtype,
        "data": data,
        "image_size": list(config.image_size),
        "batch_size": int(config.batch_size),
        "parameters_m": round(num_params / 1e6, 2),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "ccnn_step_s": round(median[ccnn], 4),
        "plain_step_s": round(median[PLAIN_METHOD], 4),
        "ccnn_images_per_s": round(config.batch_size / median[ccnn], 2),
        "plain_images_per_s": round(config.batch_size / median[PLAIN_METHOD], 2),
        "ratio_ccnn_over_plain": round(median[ccnn] / median[PLAIN_METHOD], 3),
        # CPU seconds of this process per step (all threads): the work, whatever the machine's
        # load; on an accelerator mostly the host's dispatch.
        "ccnn_step_cpu_s": round(median_cpu[ccnn], 4),
        "plain_step_cpu_s": round(median_cpu[PLAIN_METHOD], 4),
        "solver_share": round(1 - median[PLAIN_METHOD] / median[ccnn], 3),
        "steps_each": min(len(r.times) for r in runners),
        "init_s": round(init_s, 1),
        "compile_s": {r.method: round(r.compile_s, 1) for r in runners},
        **runners[0].memory,
        "device_peak_mib": round(device_stats.get("peak_bytes_in_use", 0) / MIB, 1) or None,
        "host_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "date": time.strftime("%Y-%m-%d"),
    }


def to_markdown(result: dict) -> str:
    """A two-row table (CCNN step, plain step) and the setup and memory lines."""
    from ccnn_jax import reporting

    ccnn, plain = result["method"], PLAIN_METHOD
    rows = [
        {
            "step": m,
            "step_s": result[f"{key}_step_s"],
            "cpu_s": result[f"{key}_step_cpu_s"],
            "images_per_s": result[f"{key}_images_per_s"],
            "compile_s": result["compile_s"][m],
        }
        for m, key in ((ccnn, "ccnn"), (plain, "plain"))
    ]
    columns = ["step", "step_s", "cpu_s", "images_per_s", "compile_s"]
    memory = ", ".join(
        f"{k.removesuffix('_mib')} {v} MiB" for k, v in result.items() if k.endswith("_mib") and v
    )
    return (
        f"{result['model']} on {result['config']} ({result['data']} data), "
        f"{result['image_size'][0]}x{result['image_size'][1]}, batch {result['batch_size']}, "
        f"{result['dtype']}, {result['parameters_m']} M parameters; {result['devices']} x "
        f"{result['device_kind']} ({result['platform']}), {result['processes']} process(es), "
        f"median of {result['steps_each']} steps each, {result['date']}.\n\n"
        + reporting.markdown_table(rows, columns)
        + f"\nCCNN / plain step = {result['ratio_ccnn_over_plain']}; the solver's share of the "
        f"CCNN step = {result['solver_share']:.1%}.\n\nMemory: {memory}.\n"
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from ccnn_jax.data import pipeline

    config = FLAGS.config
    if FLAGS.data == "dataset":
        pipeline.prepare(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir)
    result = bench(config, data=FLAGS.data, steps=FLAGS.steps, block=FLAGS.block)
    markdown = to_markdown(result)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(markdown)
    print(json.dumps(result))
    print(markdown)
    print(f"[bench] wrote {FLAGS.out}.json and {FLAGS.out}.md")


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module defines none)."""
    config_flags.DEFINE_config_file("config", synthetic.__file__, "ml_collections config file")
    flags.DEFINE_integer("steps", 20, "timed steps per method")
    flags.DEFINE_integer("block", 5, "steps per alternating block (and distinct batches)")
    flags.DEFINE_enum("data", "dataset", ["dataset", "random"], "the config's data or random")
    flags.DEFINE_string("out", "bench_train", "writes <out>.json and <out>.md")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
