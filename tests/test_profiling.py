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


@pytest.mark.parametrize("argv,message", [
    (["summarize", ".", "--top", "-1"], "error: argument --top: must be > 0, got -1 (see --help)"),  # was taken
    (["summarize"], "error: the following arguments are required: directory (see --help)"),
], ids=["top_negative", "no_directory"])
def test_summarize_with_bad_arguments_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profiling.main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err == message + "\n"


def test_exclusive_ms_shares_each_moment_among_the_ops_running_then():
    """Two ops overlapping for 10 ms of their 20 and 30: each gets half of the overlap, and the shares add up to
    the 40 ms in which any op ran (their own durations add up to 50)."""
    intervals = [("conv.1", 0, 20_000), ("conv.2", 10_000, 40_000), ("fusion", 50_000, 50_000)]
    ms = profiling.exclusive_ms(intervals)
    assert ms == pytest.approx({"conv.1": 15.0, "conv.2": 25.0})
    assert sum(ms.values()) == pytest.approx(40.0)
    # the same name twice at once (two steps' events, say) counts twice its share
    assert profiling.exclusive_ms([("a", 0, 10_000), ("a", 0, 10_000), ("b", 0, 10_000)]) == pytest.approx(
        {"a": 20 / 3, "b": 10 / 3})


def test_hlo_instructions_name_each_op_with_its_opcode_shape_and_source_path():
    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y ** 2)

    w, x = jnp.ones((3, 3, 4, 8)), jnp.ones((2, 6, 6, 4))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x).compile().as_text()
    convs = {op["shape"].split("{")[0]: op for op in profiling.hlo_instructions(text).values()
             if op["opcode"] == "convolution"}
    # the forward conv, the input gradient (x's shape) and the weight gradient (w's dims, in XLA's order)
    assert len(convs) == 3
    assert convs.pop("f32[2,6,6,8]")["op_name"].endswith("/jvp()/conv_general_dilated")
    assert convs.pop("f32[2,6,6,4]")["op_name"].endswith("/transpose(jvp())/conv_general_dilated")
    (weight_grad,) = convs
    assert sorted(map(int, weight_grad[4:-1].split(","))) == [3, 3, 4, 8]
    text = ('%fused_computation.2 (param_0: f32[8]) -> f32[8] {\n'
            '  %param_0 = f32[8]{0} parameter(0)\n'
            '  ROOT %erf.1 = f32[8]{0} erf(f32[8]{0} %param_0), metadata={op_name="jit(f)/jvp(Net)/erf"}\n'
            '}\n\n'
            'ENTRY %main.9 (p: f32[2,6,6,4], w: f32[3,3,4,8]) -> f32[2,6,6,8] {\n'
            '  %custom-call.3 = f32[2,6,6,8]{3,2,1,0} custom-call(f32[2,6,6,4]{3,2,1,0} %p, f32[3,3,4,8]{3,2,1,0} '
            '%w), custom_call_target="JaxnetOnednnConvForward", metadata={op_name="jit(f)/Conv_0/\\"x\\"" '
            'source_file="a.py"}\n'
            '  ROOT %erf_fusion = f32[8]{0} fusion(f32[8]{0} %q), kind=kLoop, calls=%fused_computation.2\n'
            '}\n')
    ops = profiling.hlo_instructions(text)
    assert ops["custom-call.3"] == {"opcode": "custom-call", "shape": "f32[2,6,6,8]{3,2,1,0}",
                                    "op_name": 'jit(f)/Conv_0/\\"x\\"', "target": "JaxnetOnednnConvForward",
                                    "computation": "main.9", "calls": ""}
    assert ops["erf_fusion"]["calls"] == "fused_computation.2" and ops["erf_fusion"]["op_name"] == ""
    assert ops["erf.1"]["computation"] == "fused_computation.2" and ops["erf.1"]["op_name"] == "jit(f)/jvp(Net)/erf"
    assert set(ops) == {"param_0", "erf.1", "custom-call.3", "erf_fusion"}
