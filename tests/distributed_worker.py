"""One process of a multi-process test run (tests/test_parallel.py starts two of these on 127.0.0.1).

Trains a tiny model for 3 data-parallel steps on a fixed global batch over every device of every process,
then process 0 writes the parameters to OUT.npz and all processes save a checkpoint under OUT-ckpt.
"""

import argparse
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="same", help="a config value; differing tags must be detected")
    p.add_argument("--timeout", type=int, default=60)
    args = p.parse_args()

    from jaxnet import parallel

    try:
        parallel.init_distributed(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
        parallel.assert_same_across_processes({"tag": args.tag})
    except parallel.ParallelError as e:
        print(f"error: {e}", file=sys.stderr)
        return parallel.exit_after_error(2)  # as the entry point does

    import jax
    import numpy as np

    from jaxnet import checkpoint
    from parallel_case import global_batch, initial_state, params_to_npz

    mesh = parallel.make_mesh()
    state = parallel.put_replicated(initial_state(), mesh)
    step = parallel.jit_train_step(mesh=mesh)
    for _ in range(3):
        state, metrics = step(state, global_batch())
    ckpt = checkpoint.Checkpointer(args.out + "-ckpt")
    ckpt.save(state, {"epoch": 0, "step_in_epoch": 3, "best": None, "bad_epochs": 0})
    ckpt.close()
    if jax.process_index() == 0:
        params_to_npz(state, args.out + ".npz")
        print(f"devices {jax.device_count()} loss {float(np.asarray(metrics['loss'].addressable_data(0))):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
