"""The prepared GPU script (benchmarks/gpu_fmnist.py) runs end to end on a CPU at a small size, writes its
numbers, and never imports what the GPU machine lacks (Ray, MLflow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_small_on_cpu_without_ray_or_mlflow(tmp_path):
    probe = tmp_path / "probe.py"  # run the script, then report which of the absent packages got imported
    probe.write_text("import runpy, sys\nsys.argv = ['gpu_fmnist.py', '--small']\n"
                     f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
                     f"runpy.run_path({str(REPO / 'benchmarks' / 'gpu_fmnist.py')!r}, run_name='__main__')\n"
                     "print('IMPORTED', sorted(m for m in ('ray', 'mlflow') if m in sys.modules))\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(probe)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout, done.stdout[-2000:]
    result = json.loads((tmp_path / "out" / "gpu_fmnist.json").read_text())
    assert result["small"] is True and result["card"]
    assert {"tiny_1x28x28", "ddpm_cifar"} <= set(result["diffence"])
    for part in result["diffence"].values():
        assert part["rows"] and all(r["ms_per_sample"] > 0 and 0 < r["floor_over_time"] for r in part["rows"])
