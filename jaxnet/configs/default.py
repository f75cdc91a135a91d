"""The default recipe: FastNet with airbench94's training recipe (Jordan 2024), on CIFAR-10.

airbench94 trains 9.9 epochs of the full 50 000 images at batch 1024 (476 steps). Here 5 000 images are
held out for validation; to make up for them the recipe trains 12 epochs of the 45 000 (516 steps, 8 % more
than airbench's): on the JPEG copy, 473 steps gave 90.48 % with TTA and 516 steps 90.63 % (one run each,
benchmarks/RESULTS.md).
"""

import ml_collections

# Progressive resizing's default share of the steps at low resolution: a run that sets another share without
# `low_res` is refused (experiment.validate_config), as it would change nothing.
LOW_RES_FRACTION = 0.5
PROXY_EVERY = 4  # airbench96_faster's: its proxy trains on every 4th batch


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "fastnet"                 # fastnet | fastnet_tiny | resnet18 | resnet20 | resnet56 | plain | plain_tiny | resnet_tiny
    c.widths = ()                       # FastNet models: channels of the three blocks, e.g. (32, 128, 128); () = the model's own
    c.depth = 2                         # FastNet models: convs per block: 2 (airbench94's) | 3 (airbench96's, a residual)
    c.activation = "gelu"               # FastNet models: gelu (exact) | silu | relu
    c.dtype = "auto"                    # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16; params stay float32
    c.conv_impl = "auto"                # jaxnet.ops.conv impl: auto (measured winner per platform and shape; on CPU oneDNN's where installed) | xla | im2col | pallas | onednn (CPU, extra onednn)
    c.whiten_stem = True                # FastNet stem kernel from the patch covariance of 5 000 train images, frozen
    c.batch_size = 1024                 # images per step
    c.eval_batch_size = 1000            # images per eval step (a smaller split: one batch of its own size)
    c.epochs = 12.0                     # epochs of the 45 000-image train split (516 steps of 1024)
    c.optimizer = "airbench"            # airbench | sgd | adam
    c.lr = 11.5                         # airbench: per 1024 examples, for a summed loss (see make_optimizer)
    c.momentum = 0.85                   # Nesterov momentum
    c.weight_decay = 0.0153             # airbench: per 1024 examples, decoupled from lr
    c.bias_lr_mult = 64.0               # lr multiplier of BatchNorm biases (not their weight decay)
    c.whiten_bias_epochs = 3.0          # epochs in which the whitening stem's bias trains, then frozen
    c.lookahead_every = 5               # steps between lookahead-EMA syncs; 0 turns it off
    c.schedule = "piecewise"            # piecewise | cosine | constant
    c.schedule_points = ((0.0, 0.2), (0.23, 1.0), (1.0, 0.07))  # (fraction of steps, lr multiplier)
    c.warmup_fraction = 0.0             # cosine only: fraction of steps of linear warmup
    c.label_smoothing = 0.2
    c.hard_fraction = 1.0               # fraction of each batch trained on: its highest-loss images under the current model; 1 = all
    c.hard_score_size = 0               # side (pixels) of the images the hard_fraction scoring pass sees; 0 = as trained
    c.proxy_widths = ()                 # FastNet models, hard_fraction < 1: a proxy FastNet of these widths scores instead, e.g. (32, 64, 64)
    c.proxy_every = PROXY_EVERY         # steps between the proxy's own training steps (on the images it picked)
    c.mean = (0.4914, 0.4822, 0.4465)  # per-channel input normalisation, [0, 1] units
    c.std = (0.2470, 0.2435, 0.2616)
    c.translate = 2                     # pixels of random translation (reflect padding)
    c.flip = "alternate"                # alternate (airbench: each image mirrored every other epoch) | random | none
    c.cutout = 0                        # side of the zeroed square, pixels; 0 = off
    c.low_res = 0                       # progressive resizing: side (pixels) of the train images in the first steps; 0 = off
    c.low_res_fraction = LOW_RES_FRACTION  # fraction of the steps, from the first, trained at low_res × low_res
    c.jitter = 0.0                      # brightness and contrast factors drawn from [1 - jitter, 1 + jitter]; 0 = off
    c.tta_level = 2                     # test-time augmentation: 0 none, 1 mirror, 2 mirror + translate
    c.tta_fraction = 1.0                # fraction of test images, least confident first, given the TTA views
    c.val_size = 5000                   # images carved from train for validation / early stopping
    c.train_subset = 0                  # use only this many train images (0 = all)
    c.test_subset = 0                   # use only this many test images (0 = all)
    c.patience = 0                      # epochs without val gain before stopping; 0 = never stop early
    c.min_delta = 0.0                   # val accuracy gain (fraction) that counts as a gain
    c.time_budget = 0.0                 # minutes of wall time for the run: fewer epochs if they do not fit (timed before training, planned again after the first epoch); 0 = off
    c.keep_checkpoints = 2              # newest checkpoints kept (the best is kept besides)
    c.checkpoint_minutes = 0.0          # minutes from one epoch-end checkpoint to the next; 0 = every epoch (the last epoch, a new best and a stop are always saved)
    c.log_every = 10                    # steps between metric fetches (host syncs)
    c.xla_cpu_conv = "eigen"            # CPU convolutions: eigen | ynnpack (XLA's default); set before JAX starts
    c.host_memory = "keep"              # malloc: keep (XLA's step buffers stay mapped) | system; set before JAX starts
    return c
