"""`dwjax plan`: compile the train and generate steps for a topology on fake CPU devices; print memory and FLOPs.

    dwjax plan --topology v4-8 --teacher large-v3 --student-decoder-layers 2
    dwjax plan --topology gpu-8xh100 --config experiment.yaml train.per_device_batch_size=16

No weights are loaded (abstract shapes only) and no accelerator is needed. JAX must see at least as many CPU
devices as the topology has: this command sets XLA_FLAGS=--xla_force_host_platform_device_count=N (and
JAX_PLATFORMS=cpu) before JAX starts, or, when JAX already runs with too few devices, re-runs itself in a
subprocess with them. Exit status: 0 when everything fits, 3 when something does not, 1 on bad input.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from dwjax.config import add_config_args, config_from_args
from dwjax.errors import ConfigError

_CHILD = "DWJAX_PLAN_CHILD"
EXIT_DOES_NOT_FIT = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dwjax plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--teacher", default=None, metavar="SHAPE_OR_MODEL",
                   help="official shape (large-v3, large-v2, base, tiny.en, ...), WhisperConfig JSON (inline or a "
                        ".json file), or a model; default: model.teacher (builtins map to their shape)")
    p.add_argument("--student-decoder-layers", type=int, default=2, metavar="N",
                   help="decoder layers of the student (teacher encoder + N decoder layers; default 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens the generate step decodes (default 224, as dwjax pseudo-label)")
    p.add_argument("--no-generate", action="store_true", help="plan the train step only")
    p.add_argument("--no-flops", action="store_true",
                   help="skip the unrolled-layer FLOP count (saves a lowering per step)")
    return p


def device_env(env: dict, n: int) -> dict:
    """`env` with XLA_FLAGS asking for `n` host devices (other flags kept) and JAX on CPU."""
    env = dict(env)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cpu_device_count() -> int:
    import jax
    try:
        return len(jax.devices("cpu"))
    except RuntimeError:
        return 0


def _jax_started(n: int) -> bool:
    """Whether JAX's backends are already up (XLA_FLAGS no longer counts then), unless they started with
    `jax_num_cpu_devices` = `n`. JAX has no public query for it, but refuses (RuntimeError) to change
    `jax_num_cpu_devices` once its backends are up; before, that setting asks for `n` devices as XLA_FLAGS does."""
    if "jax" not in sys.modules:
        return False
    import jax
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        return True
    return False


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if cfg.devices is None:
        raise ConfigError("dwjax plan needs a topology with a `devices:` section: pass --topology NAME "
                          "(a file in tpu_configs/, e.g. v4-8, gpu-8xh100, cpu)")
    n = cfg.devices.count
    if not _jax_started(n):
        os.environ.update(device_env(os.environ, n))
    elif _cpu_device_count() < n:
        if os.environ.get(_CHILD):
            raise ConfigError(f"{n} fake CPU devices were asked for but JAX has {_cpu_device_count()}")
        env = device_env(os.environ, n)
        env[_CHILD] = "1"
        return subprocess.run([sys.executable, "-m", "dwjax", "plan", *argv], env=env).returncode

    from dwjax import plan as plan_lib   # lazy: XLA_FLAGS above must be set before jax is imported

    teacher_name, teacher_cfg = plan_lib.resolve_teacher_shape(args.teacher or cfg.model.teacher)
    student_cfg = plan_lib.student_shape(teacher_cfg, args.student_decoder_layers)
    kw = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    plan = plan_lib.make_plan(cfg, teacher_cfg, student_cfg, teacher_name=teacher_name,
                              count_flops=not args.no_flops, generate=not args.no_generate, **kw)
    print(plan_lib.format_plan(plan), flush=True)
    return EXIT_DOES_NOT_FIT if plan.all_fit is False else 0
