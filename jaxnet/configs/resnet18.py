"""ResNet-18 (CIFAR stem) with SGD-Nesterov, one-cycle LR, label smoothing and cutout."""

from jaxnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet18"
    c.whiten_stem = False
    c.batch_size = 512                  # images per step
    c.epochs = 30.0
    c.optimizer = "sgd"
    c.lr = 0.4                          # peak lr, per step of the mean loss
    c.momentum = 0.9
    c.weight_decay = 5e-4 / 0.4         # decoupled: multiplied by lr in the update (5e-4 at peak lr)
    c.lookahead_every = 0
    c.schedule_points = ((0.0, 0.1), (0.25, 1.0), (1.0, 0.0))
    c.label_smoothing = 0.1
    c.translate = 4
    c.cutout = 8
    c.tta_level = 1
    return c
