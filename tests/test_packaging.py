"""What `pip install` of a wheel built from the project puts on a user's path: the `jaxnet` package with its
recipes, the C++ source its oneDNN impl compiles, the console script and the licence — and no top-level
module of a common name (`experiments`, `benchmarks`, `tests`) that could shadow a user's own."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_jaxnet_its_data_and_entry_point_and_nothing_else_at_the_top(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("jaxnet-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(info).decode()
        top_level = {n.split("/")[0] for n in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"jaxnet"}, top_level
    for path in ("jaxnet/cifar10.py", "jaxnet/configs/default.py", "jaxnet/configs/muon.py",
                 "jaxnet/ops/onednn_conv.cc"):
        assert path in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "jaxnet-cifar10 = jaxnet.cifar10:main" in entry_points
