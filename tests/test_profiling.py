"""compile_stats, mfu, HLO dumps and the offline trace summary."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from jaxnet import profiling


@pytest.fixture(scope="module")
def matmul():
    return jax.jit(lambda a, b: jnp.tanh(a @ b)), (jnp.ones((64, 128)), jnp.ones((128, 32)))


def test_compile_stats_reports_xla_costs(matmul):
    fn, args = matmul
    stats = profiling.compile_stats(fn, *args)
    assert stats["lower_s"] > 0 and stats["compile_s"] > 0
    assert stats["flops"] >= 2 * 64 * 128 * 32  # at least the matmul's multiply-adds
    assert stats["peak_memory_bytes"] >= 4 * (64 * 128 + 128 * 32 + 64 * 32)


def test_mfu():
    assert profiling.mfu(2e9, 0.5, 8e9) == pytest.approx(0.5)


def test_dump_hlo_writes_each_stage_with_an_index(tmp_path, matmul):
    fn, args = matmul
    profiling.dump_hlo(tmp_path, {"step": (fn, args)})
    index = json.loads((tmp_path / "index.json").read_text())
    files = index["step"]
    assert "stablehlo.dot_general" in (tmp_path / files["stablehlo"]).read_text()
    assert "HloModule" in (tmp_path / files["hlo_before_optimizations"]).read_text()
    assert "HloModule" in (tmp_path / files["hlo_after_optimizations"]).read_text()


def test_summarize_ranks_ops_of_a_real_trace(tmp_path, matmul, capsys):
    fn, args = matmul
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            jax.block_until_ready(fn(*args))
    rows = profiling.summarize_trace(tmp_path, top=5)
    assert rows and all(ms >= 0 and count >= 1 for _, ms, count in rows)
    assert [ms for _, ms, _ in rows] == sorted((ms for _, ms, _ in rows), reverse=True)
    assert profiling.main(["summarize", str(tmp_path), "--top", "3"]) == 0
    assert "op" in capsys.readouterr().out


def test_summarize_times_async_ops_to_their_end_event(tmp_path):
    """XLA's CPU runtime dispatches convolutions asynchronously: the op's event lasts 0.1 ms and an "end:" event
    marks completion 50 ms later. The summary counts the 50 ms, and the end events are not ops of their own."""
    thread = {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "tf_XLAEigen/1"}}
    events = [thread]
    for step in range(2):
        t = step * 100_000  # microseconds
        events += [{"ph": "X", "name": "convolution.3", "pid": 1, "tid": 2, "ts": t, "dur": 100},
                   {"ph": "X", "name": "fusion.1", "pid": 1, "tid": 2, "ts": t + 200, "dur": 10_000},
                   {"ph": "X", "name": "end: convolution.3", "pid": 1, "tid": 2, "ts": t + 50_000, "dur": 1},
                   {"ph": "X", "name": "no_timestamp", "pid": 1, "tid": 2, "dur": 5}]  # malformed: skipped
    with gzip.open(tmp_path / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    rows = profiling.summarize_trace(tmp_path)
    assert [(name, round(ms, 6), count) for name, ms, count in rows] == [("convolution.3", 100.0, 2),
                                                                        ("fusion.1", 20.0, 2)]


def test_summarize_without_a_trace_is_exit_2(tmp_path, capsys):
    assert profiling.main(["summarize", str(tmp_path)]) == 2
    assert "no *.trace.json.gz" in capsys.readouterr().err
