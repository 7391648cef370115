"""CCNN and baselines on PASCAL VOC 2012 (``voc_segmentation``; 21 classes incl. background).

Needs the download (``VOCtrainval_11-May-2012.tar`` in ``manual_dir``, plus SBD's
``benchmark.tgz`` extracted there for ``sbd``; see the README's data section) and realistically
an accelerator. Variants (the config string after ``:``): the method ``ccnn`` (tags, default),
``ccnn_size``, ``mil`` or ``full``, then options:

- ``vgg16``: **the paper's recipe** (below): VGG-16 FCN-32s from ImageNet weights, SBD-augmented
  train set, the original solver and constraint values. ``ccnn_vgg16``, ``ccnn_size_vgg16``,
  ``mil_vgg16`` and ``full_vgg16`` are short for ``<method>,vgg16``.
- ``largefov``: the same with the original's other network, output stride 8 (its
  ``src/train.py`` default), and that network's solver.
- ``sbd``: the UNet from scratch on the SBD-augmented training set
  (``voc_segmentation/sbd_augmented``, 10,582 images) instead of VOC 2012 train (1,464).

The paper's recipe, ``ccnn,vgg16``, and where each value comes from (the original code,
github.com/pathak22/ccnn at aa3d3b2; the paper, arXiv 1506.03648):

- network: VGG-16 FCN-32s (``models/fcn_32s/train_32s.prototxt``: conv1-5, fc6/fc7 as 7x7 and
  1x1 convolutions, stride-32 score map, constraints on that coarse map), initialised from
  ImageNet (``download_pretrained_models.sh``); here torchvision's ImageNet VGG-16 weights in
  timm's ``vgg16.tv_in1k`` safetensors file (``config.model.pretrained``; the original used
  the Caffe VGG-16 release, with BGR 0-255 inputs).
- data: the SBD-augmented VOC 2012 train set, 10,582 images (the weakly supervised literature's
  set; the original read its own list ``train.txt`` from the author's site, not readable here),
  validation on VOC 2012 val (1,449). Image-level tags come from the masks of the crop.
- batch 1 and whole images: ``batch_size: 1`` and no ``crop_size`` in the data layer of
  ``train_32s.prototxt`` (VOC images are at most 500x500). Here fixed 512x512 inputs (a
  multiple of 32): the training transform rescales by 0.8-1.25 around the scale that covers
  512x512, crops and flips, so an image is not always seen whole.
- solver (``models/fcn_32s/solver_32s.prototxt``): SGD, momentum 0.99, weight decay 0, step
  policy (x0.1 every 10,000 iterations), 40,000 iterations, ``base_lr: 1e-8`` for the loss
  summed over the score map (its header: "Loss is NOT-NORMALIZED", ``python_layers.py``
  ``normalization=False``). Our loss is the mean over the map's N positions, so the same
  step is ``1e-8 * N``: N = 16 * 16 at 512x512 gives ``learning_rate = 2.56e-6``. The original
  doubled the biases' learning rate (``lr_mult: 2``); here all parameters share one.
- constraints (``src/python_layers.py``, ``WeakLoss.setup``; ``configs.base()`` defaults,
  ``constraints.VOC_BOUNDS``): absent labels suppressed; each present foreground label
  >= 5% of the pixels with slack penalty 2; background >= 30% (hard) and <= 70% (hard, when
  any foreground is tagged); hardness 1. ``ccnn_size`` (``apply_size_constraint``): present
  labels covering > 10% of the image >= 10% (hard), background in [20%, 70%], hardness 1000.
- ``largefov``: the original's ``src/train.py`` trains ``models/fcn_8s`` (VGG-16 with the
  "hole" algorithm, output stride 8; its fc6 is 4x4 with dilation 4 and 4096 channels, where
  our ``vgg16_largefov`` is DeepLab-LargeFOV's 3x3, dilation 12, 1024 channels) with
  ``solver_8s.prototxt``: normalised loss, ``base_lr: 1e-6``, momentum 0.99, weight decay
  5e-7, step 40,000 (never reached), 35,000 iterations.

Result to expect: the paper reports 35.3% mIoU on VOC 2012 val for CCNN from tags and 62.2%
fully supervised; not reproduced here (no VOC download or accelerator). ``mil`` and ``full``
reuse CCNN's solver, not tuned for them.

Commands. One GPU (``vgg16.tv_in1k``'s ``model.safetensors`` from the Hugging Face hub;
torchvision's ``vgg16`` state dict saved with ``safetensors.torch.save_file`` works with
``--config.model.pretrained_layout=torchvision``)::

    python experiments/train.py --config ccnn_jax/configs/voc.py:ccnn_vgg16 \\
        --workdir runs/voc_ccnn_vgg16 --config.manual_dir=/data/voc \\
        --config.model.pretrained=/data/vgg16.tv_in1k/model.safetensors

A multi-host TPU slice (e.g. v5litepod-16: 4 hosts, 16 chips; the same command on every host;
workdir and TFDS data on GCS, the weights file on every host's disk). The batch must split over
the 16 chips; with SGD on a per-image mean loss, batch B takes B times the learning rate for
the same update per image, and 40,000 / B steps for the same number of images::

    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd ccnn_jax && \\
      python experiments/train.py --multihost --config ccnn_jax/configs/voc.py:ccnn_vgg16 \\
        --workdir gs://$BUCKET/runs/voc_ccnn_vgg16 --config.data_dir=gs://$BUCKET/tfds \\
        --config.manual_dir=/data/voc --config.model.pretrained=/data/vgg16.safetensors \\
        --config.batch_size=16 --config.eval_batch_size=16 --config.learning_rate=4.1e-5 \\
        --config.num_steps=2500 --config.lr_decay_steps=625 --config.dtype=bfloat16"

(Process 0 prepares the TFDS dataset while the others wait; ``experiments/bench_train.py``
measures a step on the slice first.)

Measured here, at a reduced size (2-core shared CPU, no accelerator; ``python
experiments/bench_train.py --config ccnn_jax/configs/voc.py:ccnn_vgg16 --data=random
--config.image_size='(128, 128)' --config.batch_size=2 --steps 6 --block 3``; the full-size
VGG-16, 134 M parameters), 2026-11-28, float32, random batches, median of 6 steps:

=====  ========  ===========  ========  =========
step   step s    CPU s/step   images/s  compile s
=====  ========  ===========  ========  =========
ccnn   10.3      19.2         0.19      6.0
full   9.87      18.9         0.20      4.0
=====  ========  ===========  ========  =========

CCNN / plain step 1.045 (the solver's share 4.4%); XLA's estimate 2.6 GiB (1.0 GiB arguments,
1.6 GiB temporaries), host peak RSS 4.6 GiB. At the recipe's 500x500 crops and batch 1 the
activations grow about 15x per image: plan for a GPU (or a TPU slice, commands above).

Without ``vgg16``/``largefov`` the network is a UNet trained from scratch (the pre-backbone
configs): expect clearly lower absolute mIoU than the paper; the ordering full > ccnn_size >
ccnn > mil is what the method predicts. Outputs as for the synthetic configs (results.json,
predictions.png, curves.png, metrics.jsonl, tensorboard/).
"""

import ml_collections

from ccnn_jax import configs

OPTIONS = ("sbd", "vgg16", "largefov")
SBD = "voc_segmentation/sbd_augmented"
#: The paper's recipe at 512x512: the FCN-32s score map has 16 x 16 positions.
FCN32_MAP_POSITIONS = (512 // 32) ** 2
CAFFE_FCN32_BASE_LR = 1e-8  # solver_32s.prototxt, for the loss summed over the map


def _expand_short_names(config_string: str | None) -> str:
    """``"ccnn_size_vgg16,..."`` -> ``"ccnn_size,vgg16,..."``."""
    parts = (config_string or "ccnn").split(",")
    if parts[0].endswith("_vgg16"):
        parts[0:1] = [parts[0].removesuffix("_vgg16"), "vgg16"]
    return ",".join(parts)


def get_config(config_string: str = "ccnn") -> ml_collections.ConfigDict:
    method, options = configs.parse(_expand_short_names(config_string), OPTIONS)
    networks = options & {"vgg16", "largefov"}
    if len(networks) > 1:
        raise ValueError("config string: choose one network, vgg16 or largefov")
    c = configs.base(method, SBD if options & {"sbd", *networks} else "voc_segmentation")
    c.log_every = 100
    c.checkpoint_every = 2000
    c.worker_count = 8
    if networks:
        _paper_recipe(c, largefov="largefov" in networks)
    else:
        _unet_from_scratch(c)
    return c


def _unet_from_scratch(c: ml_collections.ConfigDict) -> None:
    c.image_size = (320, 320)
    c.model.width = 64
    c.model.depth = 5
    c.model.norm = "batch"
    c.model.output_stride = 8  # constraints on the coarse map, as the FCN-based original
    c.batch_size = 32
    c.eval_batch_size = 32
    c.num_steps = 30_000
    c.warmup_steps = 1000


def _paper_recipe(c: ml_collections.ConfigDict, *, largefov: bool) -> None:
    """The original CCNN's VOC training (see the module docstring for every value's source)."""
    c.image_size = (512, 512)
    c.model.name = "vgg16_largefov" if largefov else "vgg16_fcn32"
    c.model.pretrained_layout = "timm"  # vgg16.tv_in1k; set config.model.pretrained to the file
    c.pretrain.steps = c.pretrain.easy_steps = 0  # ImageNet weights instead
    c.batch_size = 1
    c.eval_batch_size = 8
    c.optimizer = "sgd"
    c.momentum = 0.99
    c.grad_clip_norm = 0.0
    c.lr_decay_factor = 0.1
    if largefov:  # src/train.py + models/fcn_8s/solver_8s.prototxt (normalised loss)
        c.learning_rate = 1e-6
        c.weight_decay = 5e-7
        c.lr_decay_steps = 40_000
        c.num_steps = 35_000
    else:  # models/fcn_32s/solver_32s.prototxt (summed loss: base_lr times the map size)
        c.learning_rate = CAFFE_FCN32_BASE_LR * FCN32_MAP_POSITIONS
        c.weight_decay = 0.0
        c.lr_decay_steps = 10_000
        c.num_steps = 40_000
