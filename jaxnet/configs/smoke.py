"""A few hundred images and a tiny FastNet: the whole experiment end to end in well under 2 minutes on a CPU."""

from jaxnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "fastnet_tiny"
    c.batch_size = 64                   # images per step
    c.eval_batch_size = 64
    c.epochs = 4.0
    c.train_subset = 512                # images before the validation split
    c.val_size = 128
    c.test_subset = 192
    c.log_every = 2
    return c
