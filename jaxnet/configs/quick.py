"""`make run`'s recipe: the record's (`muon`) on a FastNet of half the width, for 5 epochs.

Half the channels (32, 128, 128) is about a quarter of the FLOPs: on 2 CPU cores the whole run — data,
compilation, training and the TTA test — took 8 min on a Xeon and 9 to 13 min on AMD EPYCs (Zen 3)
(benchmarks/RESULTS.md, "make run's recipe"). TTA's views go to the least confident half of the test images:
the same accuracy as all of them, for 65 % of the time (benchmarks/RESULTS.md, "Test-time augmentation").
"""

from jaxnet.configs import muon


def get_config():
    c = muon.get_config()
    c.widths = (32, 128, 128)           # channels of FastNet's three blocks (the record's: 64, 256, 256)
    c.epochs = 5.0                      # epochs of the 50 000 train images (125 steps of 2000)
    c.tta_fraction = 0.5                # test images given TTA's views: the least confident half
    return c
