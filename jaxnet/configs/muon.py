"""The CIFAR-10 speed record's recipe: airbench94_muon (Jordan 2024; 94.01 % on the original CIFAR-10).

Muon (orthogonalised momentum, 3 Newton–Schulz steps in bf16) on the conv filters, renormalised every
step; Nesterov SGD for biases and the head; batch 2000, 8 epochs of all 50 000 training images (200 steps),
lr decaying linearly to 0; no lookahead EMA, no validation split (test accuracy at the end, as the record).
"""

from jaxnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "fastnet_muon"            # FastNet with the record's head: unit-std weights, logits / 256
    c.batch_size = 2000                 # images per step
    c.eval_batch_size = 2000
    c.epochs = 8.0                      # epochs of the 50 000 train images (200 steps of 2000)
    c.optimizer = "muon"
    c.lr = 0.24                         # Muon step of the conv filters (their norm is √(output channels))
    c.filter_momentum = 0.6             # Muon's Nesterov momentum
    c.renorm_every = 1                  # steps between filter renormalisations
    c.ns_steps = 3                      # Newton–Schulz iterations (bf16)
    c.bias_lr = 0.053                   # SGD step of biases and BatchNorm shifts, per example of the summed loss
    c.head_lr = 0.67                    # SGD step of the head, per example of the summed loss
    c.momentum = 0.85                   # Nesterov momentum of the SGD groups
    c.weight_decay = 2e-6               # per example (× batch size), coupled: divided by each SGD group's rate
    c.whiten_bias_epochs = 3.0          # epochs in which the whitening stem's bias trains, its rate falling to 0
    c.lookahead_every = 0               # no lookahead EMA
    c.schedule_points = ((0.0, 1.0), (1.0, 0.0))  # (fraction of steps, lr multiplier): linear decay to 0
    c.val_size = 0                      # train on all 50 000; no per-epoch evaluation
    c.checkpoint_minutes = 1.0          # an epoch is seconds on a GPU, minutes on 2 CPU cores: save at most once a minute
    return c
