"""The reference PyTorch script's recipe, for a side-by-side: PlainCNN, Adam 1e-3, batch 32, 10 epochs,
inputs normalised with mean = std = 0.5, no augmentation, no label smoothing, plain evaluation."""

from jaxnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "plain"
    c.whiten_stem = False
    c.batch_size = 32                   # images per step
    c.eval_batch_size = 500
    c.epochs = 10.0
    c.optimizer = "adam"
    c.lr = 1e-3
    c.weight_decay = 0.0
    c.lookahead_every = 0
    c.schedule = "constant"
    c.label_smoothing = 0.0
    c.mean = (0.5, 0.5, 0.5)
    c.std = (0.5, 0.5, 0.5)
    c.translate = 0
    c.flip = "none"
    c.tta_level = 0
    c.log_every = 100
    return c
