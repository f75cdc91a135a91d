"""Every kind of wrong input to `python -m experiments.cifar10`, run in-process through `main(argv)`: one line on
stderr naming the field and what is allowed, exit code 2, nothing created or overwritten, within seconds."""

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fixtures import synthetic, write_binary

from jaxnet import cache, cifar10, compiler, configs
from jaxnet.errors import ConfigError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_binary(tmp_path_factory.mktemp("cifar"), synthetic(n_train=600, n_test=200))


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-data")
    (root / "empty").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "readme.txt").write_text("not CIFAR-10")
    good = write_binary(root / "good", synthetic(n_train=300, n_test=100))
    with tarfile.open(root / "full.tar.gz", "w:gz") as tar:
        tar.add(good, arcname=".")
    data = (root / "full.tar.gz").read_bytes()
    (root / "truncated.tar.gz").write_bytes(data[: len(data) // 2])
    short = write_binary(root / "short", synthetic(n_train=300, n_test=100))
    (short / "cifar-10-batches-bin" / "data_batch_3.bin").write_bytes(b"\x01" * 100)
    from fixtures import png_bytes

    (root / "one.png").write_bytes(png_bytes(synthetic(1, 1)["train"]["image"][0]))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """A workdir after a one-epoch smoke run (for the checkpoint cases)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    code, err = _main(["--config", "smoke", "epochs=1.0", "--workdir", str(workdir), "--data-dir", str(dataset)])
    assert code == 0, err
    return workdir


def _main(argv):
    """(exit code, stderr) of `cifar10.main(argv)` in this process, with JAX's per-run options kept out (the
    test process's JAX has started) and the signal handlers restored."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    original, original_memory = compiler.set_cpu_conv, compiler.set_host_memory
    err = io.StringIO()
    try:
        compiler.set_cpu_conv = lambda name: None if name in compiler.CPU_CONV_FLAGS else original(name)
        compiler.set_host_memory = lambda name: None if name in compiler.HOST_MEMORY else original_memory(name)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cifar10.main([*argv, "--compilation-cache", ""] if argv[:1] != ["predict"] else argv)
            except SystemExit as e:
                code = e.code
    finally:
        compiler.set_cpu_conv, compiler.set_host_memory = original, original_memory
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, err.getvalue()


def _snapshot(path: Path):
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else None


CONFIG_CASES = [  # (override(s), what the message must say)
    (["epochs"], "not key=value"),
    (["width=3"], "not key=value with a known key"),
    (["epochs=fast"], "override epochs=fast: expected a float"),
    (["batch_size=64.5"], "override batch_size=64.5: expected an int"),
    (["batch_size=True"], "override batch_size=True: expected an int"),
    (["whiten_stem=1"], "override whiten_stem=1: expected a bool"),
    (["mean=0.5"], "override mean=0.5: expected a tuple"),
    (["mean=(0.5, 0.5)"], "mean must be 3 numbers"),
    (["std=(1.0, 1.0, 0.0)"], "std must be 3 positive numbers"),
    (["batch_size=0"], "batch_size must be > 0, got 0"),
    (["batch_size=-5"], "batch_size must be > 0, got -5"),
    (["eval_batch_size=0"], "eval_batch_size must be > 0"),
    (["epochs=0.0"], "epochs must be > 0"),
    (["epochs=-1.0"], "epochs must be > 0"),
    (["epochs=0.01"], "make no step"),
    (["lr=0.0"], "lr must be > 0"),
    (["lr=-1.0"], "lr must be > 0"),
    (["momentum=1.0"], "momentum must be in [0, 1), got 1.0"),
    (["weight_decay=-0.1"], "weight_decay must be >= 0"),
    (["label_smoothing=2.0"], "label_smoothing must be in [0, 1), got 2.0"),
    (["label_smoothing=-0.1"], "label_smoothing must be in [0, 1)"),
    (["patience=-3"], "patience must be >= 0, got -3"),
    (["min_delta=-0.5"], "min_delta must be >= 0"),
    (["tta_level=5"], "tta_level must be 0, 1 or 2, got 5"),
    (["translate=-1"], "translate must be 0 to 31 (pixels"),
    (["translate=32"], "translate must be 0 to 31 (pixels; CIFAR-10's images are 32), got 32"),
    (["cutout=-2"], "cutout must be 0 (off) to 32"),
    (["cutout=33"], "cutout must be 0 (off) to 32 (pixels; CIFAR-10's images are 32), got 33"),
    (["lr=inf"], "lr must be a finite number, got inf"),
    (["lr=1e400"], "lr must be a finite number, got inf"),  # an overflowing literal: was a run that diverged at step 2
    (["min_delta=nan"], "min_delta must be a finite number, got nan"),
    (["time_budget=-inf"], "time_budget must be a finite number, got -inf"),
    (["mean=(0.5, 1e999, 0.5)"], "mean must be finite numbers, got (0.5, inf, 0.5)"),
    (["widths=(inf, 64, 64)"], "widths must be finite numbers, got (inf, 64, 64)"),  # was "expected a tuple"
    (["schedule_points=((0.0, NaN), (1.0, 0.0))"], "schedule_points must be finite numbers, got ((0.0, nan), (1.0"),
    (["lr=-Infinity"], "lr must be a finite number, got -inf"),
    (["model=inf"], "model must be one of fastnet"),  # a string field keeps the word
    (["val_size=-1"], "val_size must be >= 0"),
    (["val_size=512"], "val_size must be an integer in [0, 512)"),  # the whole training subset
    (["train_subset=-5"], "train_subset must be >= 0"),
    (["test_subset=100000"], "subset size must be an integer in [1, 200]"),
    (["log_every=0"], "log_every must be > 0"),
    (["keep_checkpoints=0"], "keep_checkpoints must be > 0"),
    (["lookahead_every=-5"], "lookahead_every must be >= 0, got -5"),
    (["warmup_fraction=1.5"], "warmup_fraction must be in [0, 1)"),
    (["whiten_bias_epochs=-1.0"], "whiten_bias_epochs must be >= 0"),
    (["schedule_points=((0.5, 1.0), (0.1, 0.0))"], "increasing steps"),
    (["model=vgg"], "model must be one of fastnet, fastnet_tiny"),
    (["dtype=float16"], "dtype must be one of auto, float32, bfloat16"),
    (["widths=(8, 16)"], "widths must be () or 3 positive integers"),
    (["widths=(8, 0, 16)"], "widths must be () or 3 positive integers"),
    (["model=plain_tiny", "widths=(8, 16, 16)"], "widths sets FastNet's blocks; model plain_tiny has its own"),
    (["activation=tanh"], "activation must be one of gelu, silu, relu, got 'tanh'"),
    (["model=plain_tiny", "activation=silu"], "activation sets FastNet's; model plain_tiny has its own"),
    (["model=plain_tiny", "depth=3"], "depth sets FastNet's blocks; model plain_tiny has its own"),
    (["depth=4"], "depth must be 2 or 3 (convs in each of FastNet's blocks), got 4"),
    (["jitter=1.5"], "jitter must be in [0, 1), got 1.5"),
    (["tta_fraction=0.0"], "tta_fraction must be in (0, 1], got 0.0"),
    (["hard_fraction=0.0"], "hard_fraction must be in (0, 1], got 0.0"),
    (["hard_fraction=1.5"], "hard_fraction must be in (0, 1], got 1.5"),
    (["hard_fraction=0.5", "hard_score_size=4"], "hard_score_size must be 0 (the images as trained) or 8 to 32"),
    (["hard_score_size=16"], "hard_score_size=16 changes nothing while hard_fraction is 1"),
    (["hard_fraction=0.5", "proxy_widths=(4, 8)"], "proxy_widths must be () (off) or 3 positive integers"),
    (["proxy_widths=(4, 8, 8)"], "proxy_widths=(4, 8, 8) changes nothing while hard_fraction is 1"),
    (["hard_fraction=0.5", "proxy_widths=(4, 8, 8)", "proxy_every=0"], "proxy_every must be a positive integer"),
    (["proxy_every=2"], "proxy_every=2 changes nothing without a proxy: set proxy_widths too"),
    (["model=plain_tiny", "hard_fraction=0.5", "proxy_widths=(4, 8, 8)"],
     "proxy_widths sets a FastNet proxy; model plain_tiny is not a FastNet"),
    (["low_res=8"], "low_res must be 0 (off) or 16 to 31 (pixels; CIFAR-10's images are 32), got 8"),
    (["low_res=32"], "low_res must be 0 (off) or 16 to 31"),
    (["low_res=20", "low_res_fraction=1.0"], "low_res_fraction must be in (0, 1), got 1.0"),
    (["low_res_fraction=0.3"], "low_res_fraction=0.3 changes nothing while low_res is 0 (off)"),
    (["time_budget=-1"], "time_budget must be >= 0"),
    (["checkpoint_minutes=-0.5"], "checkpoint_minutes must be >= 0"),
    (["conv_impl=fast"], "conv_impl must be one of xla, im2col"),
    (["optimizer=rmsprop"], "optimizer must be one of airbench, muon, sgd, adam"),
    (["schedule=step"], "schedule must be one of piecewise, cosine, constant"),
    (["flip=sideways"], "flip must be one of alternate, random, none, got 'sideways'"),
    (["xla_cpu_conv=mkl"], "xla_cpu_conv must be one of ynnpack, eigen"),
    (["host_memory=jemalloc"], "host_memory must be one of keep, system, got 'jemalloc'"),
]

FLAG_CASES = [
    (["--config", "nope"], "argument --config: invalid choice: 'nope'"),
    (["--seed", "x"], "argument --seed: invalid int value"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**63), got -1"),  # were tracebacks from NumPy and JAX
    (["--seed", str(2 ** 63)], f"seed must be an integer in [0, 2**63), got {2 ** 63}"),
    (["--parallel", "mpi"], "argument --parallel: invalid choice"),
    (["--peak-tflops", "-1"], "argument --peak-tflops: must be > 0"),
    (["--peak-tflops", "0"], "argument --peak-tflops: must be > 0"),
    (["--peak-tflops", "inf"], "argument --peak-tflops: must be finite, got inf"),  # an MFU of 0 %
    (["--data-dir", ""], "the CIFAR-10 source is an empty path: give a local copy's path"),  # read the cwd
    (["--num-devices", "0"], "argument --num-devices: must be > 0, got 0"),  # was said after reading the data
    (["--num-devices", "9"], "9 devices asked for, but 8 are available"),
    (["--parallel", "pmap", "--num-devices", "3"], "batch_size 64 does not divide over 3 devices"),
    (["--parallel", "pmap", "--num-devices", "-1"], "argument --num-devices: must be > 0, got -1"),
    (["--parallel", "pmap", "--num-devices", "9"], "9 devices asked for, but 8 are available"),
    (["--parallel", "pmap", "--dump-hlo", "h"], "--dump-hlo and --profile work with --parallel jit only"),
    (["--export", "tflite"], "--export takes jax and/or onnx, got tflite"),
    (["--export", "jax,svg"], "--export takes jax and/or onnx, got svg"),
    (["--export", "jax", "--export-platforms", "cpu,gpu"], "export platforms are one or more of cpu, cuda, rocm, tpu, got 'gpu'"),
    (["--export-platforms", ""], "export platforms are one or more of cpu, cuda, rocm, tpu, got none"),
    (["--resume"], "--resume: no checkpoints in"),
    (["--coordinator", "127.0.0.1:1"], "give all three"),
    (["--num-processes", "0"], "give all three"),  # was taken for no flag at all: one process, and the run went on
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "process id 2 is not in [0, 2)"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "1"], "coordinator address must be HOST:PORT"),
    # on process 0 these reached JAX's runtime, which crashed (SIGSEGV); on the others they waited 60 s
    (["--coordinator", "127.0.0.1:abc", "--num-processes", "2", "--process-id", "0"],
     "coordinator address must be HOST:PORT with a port in 1-65535, got '127.0.0.1:abc'"),
    (["--coordinator", "127.0.0.1:99999", "--num-processes", "2", "--process-id", "0"], "a port in 1-65535"),
    (["--coordinator", ":123", "--num-processes", "2", "--process-id", "1"], "a port in 1-65535, got ':123'"),
    (["--coordinator", "[::1]:0", "--num-processes", "2", "--process-id", "1"], "a port in 1-65535, got '[::1]:0'"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "0", "--process-id", "0"],
     "number of processes must be at least 1, got 0"),
    (["--config", "muon", "renorm_every=0"], "renorm_every must be > 0, got 0"),
    (["--config", "muon", "filter_momentum=1.0"], "filter_momentum must be in [0, 1), got 1.0"),
    (["--config", "muon", "ns_steps=0"], "ns_steps must be > 0"),
    (["--config", "muon", "head_lr=-0.5"], "head_lr must be > 0"),
    (["--config", "muon", "bias_lr=0.0"], "bias_lr must be > 0"),
]

DATA_CASES = [  # (the --data-dir under bad_sources, message)
    ("missing", "does not exist"),
    ("empty", "unknown layout"),
    ("junk", "unknown layout"),
    ("truncated.tar.gz", "not a readable tar archive"),
    ("short", "data_batch_3.bin has 100 bytes, not a whole number of 3073-byte records"),
    ("one.png", "not a readable tar archive"),
]


def _check(tmp_path, argv, message, protected=None):
    before = _snapshot(protected) if protected else None
    code, err = _main(argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "w").exists()
    if protected:
        assert _snapshot(protected) == before


@pytest.mark.parametrize("overrides,message", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_config_value(tmp_path, dataset, overrides, message):
    _check(tmp_path, ["--config", "smoke", *overrides, "--workdir", str(tmp_path / "w"), "--data-dir", str(dataset)],
           message)


@pytest.mark.parametrize("flags,message", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flag(tmp_path, dataset, flags, message):
    _check(tmp_path, ["--config", "smoke", "--workdir", str(tmp_path / "w"), "--data-dir", str(dataset), *flags],
           message)


def test_an_onnx_export_without_the_onnx_extra_is_one_line_before_training(tmp_path, dataset, monkeypatch):
    """Was said after the whole run had trained (and without its summary). jax2onnx is hidden from the import
    system where the extra is installed (CI's Python 3.11), as it is missing in a plain install (CI's 3.12)."""
    monkeypatch.setitem(sys.modules, "jax2onnx", None)
    _check(tmp_path, ["--config", "smoke", "--workdir", str(tmp_path / "w"), "--data-dir", str(dataset),
                      "--export", "jax,onnx"], "ONNX export needs the onnx extra: pip install 'jaxnet[onnx]'")


@pytest.mark.parametrize("flag,where,message", [
    ("--workdir", "file/run", "workdir {file}/run cannot be made: {file} is not a directory"),
    ("--dump-hlo", "file", "--dump-hlo {file} exists and is not a directory"),
    ("--profile", "file/trace", "--profile {file}/trace cannot be made: {file} is not a directory"),
])
def test_an_output_directory_with_a_file_in_its_way_is_one_line_before_training(tmp_path, dataset, flag, where,
                                                                                 message):
    """Before: a traceback (the workdir), or one after training had started (the profile, at its trace), or after
    compiling (the HLO dump)."""
    file = tmp_path / "file"
    file.write_text("a user's file")
    workdir = [] if flag == "--workdir" else ["--workdir", str(tmp_path / "w")]
    _check(tmp_path, ["--config", "smoke", "--data-dir", str(dataset), *workdir, flag, str(tmp_path / where)],
           message.format(file=file), protected=file)
    assert file.read_text() == "a user's file"


@pytest.mark.parametrize("flag,what", [("--workdir", "workdir"), ("--dump-hlo", "--dump-hlo"),
                                       ("--profile", "--profile")])
def test_an_output_directory_that_cannot_be_made_is_one_line_before_training(tmp_path, dataset, flag, what):
    """/proc passes the access check (as root) and refuses a new directory: the profile's was a traceback once
    training had started, the HLO dump's one after compiling."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    workdir = [] if flag == "--workdir" else ["--workdir", str(tmp_path / "w")]
    _check(tmp_path, ["--config", "smoke", "--data-dir", str(dataset), *workdir, flag, "/proc/jaxnet-out"],
           f"{what} /proc/jaxnet-out")


def test_checking_a_directory_to_be_made_leaves_nothing_behind(tmp_path):
    cache.check_directory(tmp_path / "a" / "b", "workdir")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_inside_one_this_process_cannot_search_is_one_line(tmp_path, monkeypatch):
    """Not as root, stat of a path in a directory without search permission is EACCES, which pathlib's exists()
    raised (a traceback); the tests run as root, so the refusal is simulated."""
    locked = tmp_path / "locked"
    locked.mkdir()
    stat = os.stat

    def refused(path, *args, **kwargs):
        if str(path).startswith(f"{locked}{os.sep}"):
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refused)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(ConfigError, match=f"^workdir {locked}/run: {locked} is not writable$"):
        cache.check_directory(locked / "run", "workdir")


@pytest.mark.parametrize("where,message", [
    ("{tmp}/file", ("exists and is not a directory",)),
    ("/proc/jaxnet-xla", ("cannot be made: No such file or directory",  # /proc looks writable to root
                          ": /proc is not writable")),  # and is not to others
])
def test_a_compilation_cache_that_cannot_be_a_directory_is_one_line(tmp_path, dataset, where, message):
    """Through the real entry point (the in-process runs above turn the cache off): JAX only warned, then compiled
    every program again."""
    if where.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    (tmp_path / "file").write_text("")
    where = where.format(tmp=tmp_path)
    result = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--data-dir",
                             str(dataset), "--workdir", str(tmp_path / "w"), "--compilation-cache", where],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: compilation cache {where}") and any(m in lines[0] for m in message), lines
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("platforms,message", [
    ("cuda", "error: JAX_PLATFORMS='cuda' names no platform this machine has ('cuda' needs a visible NVIDIA GPU"),
    ("tpu", "error: JAX cannot start its backend: Unable to initialize backend 'tpu'"),
])
def test_a_platform_jax_cannot_start_is_one_line(tmp_path, dataset, platforms, message):
    """JAX_PLATFORMS=cuda on a machine without a GPU was JAX's bare AssertionError, tpu its RuntimeError."""
    if shutil.which("nvidia-smi") and platforms == "cuda":
        pytest.skip("this machine may have a GPU: JAX_PLATFORMS=cuda may start")
    env = {**os.environ, "JAX_PLATFORMS": platforms}
    result = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--data-dir",
                             str(dataset), "--workdir", str(tmp_path / "w"), "--compilation-cache", ""],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_a_cache_home_under_a_file_is_one_line(tmp_path, dataset):
    """$XDG_CACHE_HOME that cannot hold jaxnet's cache folder: the record of XLA flags this jaxlib knows is not
    kept (it was a traceback from mkdir), and the default compilation cache there is refused in one line."""
    (tmp_path / "file").write_text("mine")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "file")}
    result = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--data-dir",
                             str(dataset), "--workdir", str(tmp_path / "w")], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: compilation cache {tmp_path / 'file'}/jaxnet/xla cannot be made: {tmp_path / 'file'} is not a "
        "directory"], result.stderr[-2000:]
    assert not (tmp_path / "w").exists() and (tmp_path / "file").read_text() == "mine"


def test_coordinator_port_in_use(tmp_path, dataset):
    """Process 0 on a port something listens on (a previous run's coordinator): one line, where JAX's service
    crashed the process (SIGSEGV or abort)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _check(tmp_path, ["--config", "smoke", "--workdir", str(tmp_path / "w"), "--data-dir", str(dataset),
                          "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"],
               f"the coordinator's port {port} is in use on this host")


@pytest.mark.parametrize("source,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(tmp_path, bad_sources, source, message):
    _check(tmp_path, ["--config", "smoke", "--workdir", str(tmp_path / "w"), "--data-dir", str(bad_sources / source)],
           message)


@pytest.mark.parametrize("extra,message", [
    (["model=resnet_tiny", "whiten_stem=False"], "was made with another config (differs in model, whiten_stem)"),
    (["--seed", "1"], "was made with another seed (0, not 1)"),
    (["epochs=2.0"], "was made with another config (differs in epochs)"),
], ids=["other-config", "other-seed", "other-epochs"])
def test_bad_resume_leaves_the_checkpoints_alone(trained, dataset, extra, message, tmp_path):
    base = ["--config", "smoke", "epochs=1.0", "--workdir", str(trained), "--data-dir", str(dataset), "--resume"]
    _check(tmp_path, [*base, *extra], message, protected=trained)


def test_corrupt_checkpoint_is_one_line_and_left_alone(trained, dataset, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    (workdir / "checkpoints" / "last" / "6" / "state" / "_METADATA").write_text("{broken")
    _check(tmp_path, ["--config", "smoke", "epochs=1.0", "--workdir", str(workdir), "--data-dir", str(dataset),
                      "--resume"], "/last/6 cannot be restored into this model", protected=workdir)


def test_a_rerun_without_resume_is_refused_and_overwrites_nothing(trained, dataset, tmp_path):
    _check(tmp_path, ["--config", "smoke", "epochs=1.0", "--workdir", str(trained), "--data-dir", str(dataset)],
           "already holds checkpoints: pass --resume", protected=trained)


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_workdir_another_run_is_writing_is_refused_and_left_alone(trained, dataset, tmp_path, resume):
    """Two runs started in one workdir (a second terminal, a scheduler's retry) wrote into the same checkpoints
    and metrics: one died with a checkpoint error, the other's metrics.jsonl lost half its rows. The run holds its
    workdir from its first write to its last; here the test holds it, as a running run would."""
    import shutil

    from jaxnet import cache

    workdir = tmp_path / "busy"
    if resume:
        shutil.copytree(trained, workdir)
    with cache.hold_directory(workdir, "workdir"):
        _check(tmp_path, ["--config", "smoke", "epochs=1.0", "--workdir", str(workdir), "--data-dir", str(dataset),
                          *(["--resume"] if resume else [])],
               f"workdir {workdir} is in use by another run: wait for it to end", protected=workdir)
    assert resume or not any(workdir.iterdir())
    code, err = _main(["--config", "smoke", "epochs=1.0", "--workdir", str(workdir), "--data-dir", str(dataset),
                       *(["--resume"] if resume else [])])
    assert code == 0, err  # once the other run is gone


def test_a_workdir_that_is_a_file(tmp_path, dataset):
    target = tmp_path / "notes"
    target.write_text("mine")
    _check(tmp_path, ["--config", "smoke", "--workdir", str(target), "--data-dir", str(dataset)],
           "exists and is not a directory")
    assert target.read_text() == "mine"


@pytest.mark.parametrize("argv,message", [
    (["predict", "--workdir", "{trained}", "x.png"], "model.jaxexport does not exist: train with --export jax"),
    (["predict", "--workdir", "{missing}", "x.png"], "model.jaxexport does not exist"),
    (["predict", "--workdir", "{trained}"], "the following arguments are required: images"),
    (["predict", "x.png"], "the following arguments are required: --workdir"),
], ids=["no-export", "no-workdir", "no-images", "no-workdir-flag"])
def test_bad_predict_input(trained, tmp_path, argv, message):
    argv = [a.format(trained=trained, missing=tmp_path / "missing") for a in argv]
    _check(tmp_path, argv, message, protected=trained)


@pytest.mark.parametrize("damage", ["cut", "junk", "folder"])
def test_predict_with_an_export_that_is_not_whole_is_one_line(tmp_path, damage):
    """An export cut short (a copy stopped half way, a full disk), junk, or a folder in its place: was a traceback
    from the flatbuffer parser (struct.error) or from open()."""
    import jax
    import numpy as np
    from PIL import Image

    from jaxnet import export

    workdir = tmp_path / "run"
    workdir.mkdir()
    whole = export.export_jax(lambda x: x.astype(np.float32).mean(axis=(1, 2)), tmp_path / "whole.jaxexport",
                              platforms=("cpu",))
    target = workdir / "model.jaxexport"
    match damage:
        case "cut":
            target.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        case "junk":
            target.write_text("not an export")
        case "folder":
            target.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    code, err = _main(["predict", "--workdir", str(workdir), str(tmp_path / "x.png")])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {target} cannot be loaded (") and "export the model again" in lines[0], err
    assert jax.numpy.asarray(export.load_jax(whole)(np.zeros((2, 32, 32, 3), np.uint8))).shape == (2, 3)



@pytest.mark.parametrize("command", [["jaxnet-cifar10"], ["-m", "jaxnet.cifar10"], ["-m", "experiments.cifar10"]],
                         ids=["console script", "python -m jaxnet.cifar10", "python -m experiments.cifar10"])
def test_every_entry_point_is_the_same_command_line(command):
    """The installed console script, the package module and the repository's shim: --help lists each config with
    its one line, and bad input is one line with exit 2."""
    exe = [str(Path(sys.executable).with_name("jaxnet-cifar10"))] if command[0] == "jaxnet-cifar10" else \
        [sys.executable, *command]
    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run([*exe, "--help"], cwd=root, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: jaxnet-cifar10"), shown.stderr[-2000:]
    for name, line in configs.SUMMARIES.items():
        assert f"  {name:9} {line}" in shown.stdout
    bad = subprocess.run([*exe, "--config", "nope"], cwd=root, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice: 'nope'" in bad.stderr
