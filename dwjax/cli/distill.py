"""dwjax distill --config YAML [--topology NAME] [key=value ...]

Train a student (from `dwjax init-student`) on a teacher's pseudo-labels with
KL(teacher_T || student_T) * T^2 + CE(student, pseudo-label). Re-running with the same run.output_dir resumes
from its newest complete checkpoint. Example (CPU, the demo):

    dwjax distill --topology cpu model.teacher=builtin:whisper-tiny.en model.student=runs/demo/student-init \
        'data.train=[{name: demo, path: runs/demo/labels}]' run.output_dir=runs/demo/distill
"""
from __future__ import annotations

import argparse
import json
import warnings

from dwjax.config import add_config_args, config_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dwjax distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    from dwjax.checkpoint import CheckpointFallbackWarning  # lazy: keeps --help fast (the stage imports jax)
    from dwjax.distill import run
    with warnings.catch_warnings():
        # the run prints one line per skipped checkpoint step itself (which, why, the step used instead)
        warnings.simplefilter("ignore", CheckpointFallbackWarning)
        summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))
    return 0
