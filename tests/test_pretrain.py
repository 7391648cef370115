"""Pretraining: stage configs shared by every method, the cached curriculum, and the warm start
of a run from the pretrained classifier (the FCN conversion happens in the model itself)."""

import json

import jax
import numpy as np
import pytest

from ccnn_jax import pretrain, run
from ccnn_jax.configs import synthetic


def _config(method="ccnn", **pretrain_fields):
    c = synthetic.get_config(f"{method},tiny")
    for k, v in pretrain_fields.items():
        c.pretrain[k] = v
    return c


def test_stages_are_the_curriculum_and_do_not_depend_on_the_method():
    config = _config(easy_steps=2, steps=3)
    stages = pretrain.stage_configs(config)
    assert [name for name, _ in stages] == ["easy", "objects"]
    (_, easy), (_, objects) = stages
    assert easy.dataset == config.pretrain.easy_dataset and easy.num_steps == 2
    assert objects.dataset == config.pretrain.dataset and objects.num_steps == 3
    for _, stage in stages:
        assert stage.method == "pretrain"
        assert stage.model.to_dict() == config.model.to_dict() and stage.seed == config.seed
        assert tuple(stage.image_size) == tuple(config.pretrain.image_size)
    cache = {
        pretrain.pretrain_workdir(_config(m, easy_steps=2, steps=3))
        for m in ("ccnn", "ccnn_size", "mil", "full")
    }
    assert len(cache) == 1  # one pretrained run serves every method
    reseeded = _config(easy_steps=2, steps=3)
    reseeded.seed = 1
    assert pretrain.pretrain_workdir(reseeded) not in cache
    assert [n for n, _ in pretrain.stage_configs(_config(easy_steps=0, steps=3))] == ["objects"]
    named = _config(workdir="/tmp/somewhere")
    assert str(pretrain.pretrain_workdir(named)) == "/tmp/somewhere"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_run_starts_from_the_cached_pretrained_network(data_dir, tmp_path, monkeypatch):
    config = _config(easy_steps=2, steps=3, workdir=str(tmp_path / "pre"))
    config.data_dir = data_dir
    root = pretrain.ensure_pretrained(config, progress=False)
    assert root == tmp_path / "pre" / "objects"
    for stage in ("easy", "objects"):
        results = json.loads((tmp_path / "pre" / stage / "results.json").read_text())
        assert results["finished"] and results["method"] == "pretrain"
        assert 0.0 <= results["accuracy"] <= 1.0
    # the objects stage continued from the easy stage's weights
    objects_config = dict(pretrain.stage_configs(config))["objects"]
    assert objects_config.init_from is None  # set by ensure_pretrained, not stored
    pretrained = run.train(
        dict(pretrain.stage_configs(config))["objects"], root, progress=False
    ).state.params

    # a finished pretraining is reused, not retrained
    def no_training(*args, **kwargs):
        raise AssertionError("pretraining ran again")

    monkeypatch.setattr(run, "train_and_evaluate", no_training)
    assert pretrain.ensure_pretrained(config, progress=False) == root
    monkeypatch.undo()

    # a fresh run's initial parameters are the pretrained ones (every leaf)
    out = run.train(config, tmp_path / "ccnn", max_steps_this_run=0, progress=False)
    for a, b in zip(jax.tree.leaves(out.state.params), jax.tree.leaves(pretrained), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
