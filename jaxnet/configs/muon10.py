"""The `muon` recipe for 10 epochs instead of the record's 8 (250 steps of 2000 images, the schedule stretched).

jaxnet's recipe for the PyTorch record script's accuracy in half its time (issue 19): on a 2-core Xeon with AMX,
`muon10 conv_impl=onednn dtype=bfloat16` against the record script (8 epochs, float32) in
`python -m benchmarks.time_to_accuracy --peer torch_record` (benchmarks/RESULTS.md). Seed 0 on the JPEG copy:
91.05 % with TTA at 10 epochs, 90.80 % at 8.
"""

from jaxnet.configs import muon


def get_config():
    c = muon.get_config()
    c.epochs = 10.0                     # epochs of the 50 000 train images (250 steps of 2000)
    return c
