"""The benchmark scripts run (their numbers are for benchmarks/results, not for tests)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_its_whole_path_on_cpu_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.py --smoke --device cpu: every check and timing, tiny shapes,
    FlexAttention eager; the correctness checks must pass."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    assert {r["system"] for r in report["timings"]} == {"full", "allmem"}
    assert report["model"]["decode_vs_prefill"] < 1e-4
    assert (tmp_path / "gpu_check.md").is_file()
