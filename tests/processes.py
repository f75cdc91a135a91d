"""For tests that start processes of one multi-process run: a free port for the coordinator, and waiting for all."""

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(procs, timeout: float = 300) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, all within `timeout` seconds together. Their pipes are read
    while they run, so none blocks on a full one. Processes still running at the deadline are killed and the
    AssertionError names them, with every process's exit code and the end of its stderr: where a hang stopped."""
    outputs = [None] * len(procs)

    def read(i):
        outputs[i] = procs[i].communicate()

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        p.kill()
    for reader in readers:
        reader.join()
    results = [(p.returncode, *out) for p, out in zip(procs, outputs)]
    if hung:
        raise AssertionError(f"processes {hung} still ran after {timeout} s; killed. " + " | ".join(
            f"process {i}: exit {code}, stderr ends: {err[-800:]!r}" for i, (code, _, err) in enumerate(results)))
    return results
