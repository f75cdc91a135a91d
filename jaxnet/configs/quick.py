"""`make run`'s recipe: the record's (`muon`) on a FastNet of half the width, for 4.67 epochs of 1536.

Half the channels (32, 128, 128) is about a quarter of the FLOPs: on 2 CPU cores the whole run — data,
compilation, training and the TTA test — took 8 min on a Xeon and 9 to 13 min on AMD EPYCs (Zen 3) at 5 epochs
of 2000 (benchmarks/RESULTS.md, "make run's recipe"). hiverge's batch of 1536 for 4.67 epochs (8 % fewer images)
gave +0.49, +0.63 and +0.98 points with TTA in 0.89-0.93× the time, three seeds on two machines, interleaved with
5 epochs of 2000 (RESULTS.md, "ablation of b1536"). TTA's views go to the least confident half of the test
images: the same accuracy as all of them, for 65 % of the time (RESULTS.md, "Test-time augmentation"). The first half
of the steps train on 24 × 24 images (progressive resizing): −0.13 and −0.06 points with TTA in 0.81× the time, two
seeds (RESULTS.md, "ablation of res24"). hiverge's label smoothing of 0.09 (the record's: 0.2) and brightness/contrast
jitter of 0.1 (the record's: none): +0.29 points with TTA at the same time, two seeds on a Zen 4, interleaved
(RESULTS.md, "ablation of ls009jit01"); each alone gained less than the seeds' spread. On a CPU where the run
would take longer than 9.5 minutes (the slowest seen here: 13), `time_budget` times the steps before training
and trains fewer epochs, planned again after the first epoch from the run's own pace, so that `make run` ends
within 10 minutes anywhere.
"""

from jaxnet.configs import muon


def get_config():
    c = muon.get_config()
    c.widths = (32, 128, 128)           # channels of FastNet's three blocks (the record's: 64, 256, 256)
    c.batch_size = 1536                 # hiverge's (the record's: 2000)
    c.epochs = 4.67                     # epochs of the 50 000 train images (149 steps of 1536)
    c.tta_fraction = 0.5                # test images given TTA's views: the least confident half
    c.low_res = 24                      # the first half of the steps on 24 × 24 images (low_res_fraction 0.5)
    c.label_smoothing = 0.09            # hiverge's (the record's: 0.2)
    c.jitter = 0.1                      # brightness and contrast factors from [0.9, 1.1] (the record's: 0, off)
    c.time_budget = 9.5                 # minutes: on a CPU too slow for all 4.67 epochs in them, fewer epochs
    return c
