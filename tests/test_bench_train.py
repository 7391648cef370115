"""experiments/bench_train.py: random batches that carry their own weak labels, and one bench
of the tiny config on random data (timings not asserted; XLA optimisations off for speed)."""

import jax
import numpy as np
import pytest

from ccnn_jax.configs import synthetic, voc
from experiments import bench_train


@pytest.mark.parametrize("background", [0, None])
def test_random_batches_tags_and_sizes_come_from_their_masks(background):
    rng = np.random.default_rng(0)
    batch = bench_train.random_batch(rng, 6, (40, 48), 5, background)
    assert batch["image"].shape == (6, 40, 48, 3) and batch["mask"].shape == (6, 40, 48)
    assert batch["pixels"].shape == (6, 40, 48) and batch["pixels"].min() == 1
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    for mask, tags, size in zip(batch["mask"], batch["tags"], batch["size"], strict=True):
        present = np.zeros(5, bool)
        present[np.unique(mask)] = True
        np.testing.assert_array_equal(tags, present)
        fraction = np.bincount(mask.ravel(), minlength=5) / mask.size
        np.testing.assert_array_equal(size, fraction > 0.1)
        if background is not None:
            assert tags[background] == 1


@pytest.fixture
def fast_compiles():
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def test_bench_reports_both_steps_and_the_solver_share(fast_compiles):
    config = synthetic.get_config("ccnn_size,tiny")
    result = bench_train.bench(config, data="random", steps=2, block=1)
    assert (result["method"], result["model"], result["data"]) == ("ccnn_size", "unet", "random")
    assert result["steps_each"] >= 2 and result["batch_size"] == 8
    for key in (
        "ccnn_step_s",
        "plain_step_s",
        "ccnn_step_cpu_s",
        "ccnn_images_per_s",
        "xla_total_mib",
    ):
        assert result[key] > 0, key
    assert result["ccnn_images_per_s"] == pytest.approx(8 / result["ccnn_step_s"], rel=0.01)
    assert result["solver_share"] == pytest.approx(
        1 - result["plain_step_s"] / result["ccnn_step_s"], abs=2e-3
    )
    markdown = bench_train.to_markdown(result)
    assert "| ccnn_size |" in markdown and "| full |" in markdown
    assert "solver's share" in markdown and "MiB" in markdown


def test_backbone_configs_need_no_dataset_for_random_batches():
    """The VOC recipe's meta (21 classes) comes from the builder alone: no download needed."""
    from ccnn_jax.data import pipeline

    config = voc.get_config("ccnn_vgg16")
    meta = pipeline.dataset_meta(config.dataset, data_dir=config.data_dir)
    config.image_size, config.batch_size = (64, 64), 2
    batches = bench_train.make_batches(config, meta, "random", 2)
    assert batches[0]["tags"].shape == (2, 21) and batches[0]["image"].shape == (2, 64, 64, 3)
