"""Metrics sinks: JSONL, TensorBoard (tensorboardX) and optional wandb, written by process 0 only."""
from __future__ import annotations

import json
import os
import time

from dwjax.mesh import is_main_process


class MetricsWriter:
    def __init__(self, directory: str, jsonl: bool = True, tensorboard: bool = True, wandb: bool = False,
                 run_name: str = "dwjax", config: dict | None = None):
        self.main = is_main_process()
        self.jsonl = self.tb = self.wandb = None
        if not self.main:
            return
        os.makedirs(directory, exist_ok=True)
        if jsonl:
            self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter   # lazy: 1.5 s to import, needed only with tensorboard on
            self.tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        if wandb:
            import wandb as wb
            self.wandb = wb.init(name=run_name, config=config or {})

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.main:
            return
        flat = {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or
                hasattr(v, "__float__")}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": int(step), "time": time.time(), **flat}) + "\n")
        if self.tb:
            for k, v in flat.items():
                self.tb.add_scalar(k, v, int(step))
        if self.wandb:
            self.wandb.log(flat, step=int(step))

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
