"""The lent-GPU benchmark script runs end to end (tiny random shapes on CPU), so it is ready when a device is."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_accelerator_benchmark_smoke(tmp_path):
    out = tmp_path / "accel.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}      # one CPU device, not the suite's 8
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_accelerator.py"), "--cases",
                           "train:tiny-random:2:16,label:tiny-random:2:8:xla", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, env=dict(env, JAX_PLATFORMS="cpu"),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    train, label = results["train:tiny-random:2:16"], results["label:tiny-random:2:8:xla"]
    assert "error" not in train and "error" not in label, results
    assert math.isfinite(train["loss"]) and train["loss"] > 0 and train["global_batch"] == 2
    assert train["tflop_per_step"] > 0 and 0 < train["mfu"]
    # every row decoded exactly N tokens (the child asserts it) and the throughput follows from the step time
    assert label["new_tokens"] == 8 and math.isclose(label["audio_s_per_s"], 2 * 30.0 / label["step_s"])
    assert label["attention"] == "einsum"
