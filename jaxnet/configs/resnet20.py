"""CIFAR ResNet-20 (He et al. 2015): SGD-Nesterov, cosine LR with warmup."""

from jaxnet.configs import resnet18


def get_config():
    c = resnet18.get_config()
    c.model = "resnet20"
    c.batch_size = 128                  # images per step
    c.epochs = 40.0
    c.lr = 0.1                          # peak lr
    c.weight_decay = 1e-4 / 0.1         # decoupled (1e-4 at peak lr)
    c.schedule = "cosine"
    c.warmup_fraction = 0.05            # of all steps
    c.cutout = 0
    return c
