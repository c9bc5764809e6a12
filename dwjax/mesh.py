"""Device mesh, logical axis rules, shardings, multi-process start-up and process-0 helpers.

The mesh always has the axes ("data", "fsdp", "tensor"). On multi-slice TPU (or multi-node GPU) the data axis
is `dcn_data` slices x `data` per slice, laid out so that only the data axis crosses the slow network.
The model names its axes logically (`batch`, `embed`, `heads`, ...); `mesh.logical_axis_rules` in the config
maps them to mesh axes, so pure data parallel, FSDP and tensor parallel are rule sets, not code paths.

Call `initialize_distributed()` first thing in a process (before any other JAX call), then `make_mesh`.
"""
from __future__ import annotations

import functools
import os
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dwjax.config import (DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES, Config, MeshConfig, check_rules,
                          resolve_mesh_shape)

#: the batch dimension is split over these mesh axes (data parallel and FSDP both split the batch)
BATCH_AXES = ("data", "fsdp")


def _device_mesh(shape: tuple[int, ...], dcn_data: int, devices: list) -> np.ndarray:
    """An array of devices of `shape` (data, fsdp, tensor), with the data axis spanning `dcn_data` slices."""
    if dcn_data > 1:
        ici = (shape[0] // dcn_data, shape[1], shape[2])
        dcn = (dcn_data, 1, 1)
        has_slices = all(hasattr(d, "slice_index") for d in devices)
        try:  # TPU multi-slice: granules are slices; GPU multi-node: granules are processes
            return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not has_slices)
        except (ValueError, NotImplementedError, AssertionError):
            # fake CPU devices (one process): order by process then id; consecutive blocks act as slices
            ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
            return np.array(ordered, dtype=object).reshape(shape)
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        return np.array(devices, dtype=object).reshape(shape)


def make_mesh(mesh_cfg: MeshConfig | Config, devices=None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all), -1 sizes filled."""
    mesh_cfg = mesh_cfg.mesh if isinstance(mesh_cfg, Config) else mesh_cfg
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(_device_mesh(shape, mesh_cfg.dcn_data, devices), MESH_AXES)


def logical_rules(cfg: Config | MeshConfig | None = None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The logical-name -> mesh-axes rules in the form flax takes (the config's, else the defaults)."""
    if cfg is None:
        return DEFAULT_LOGICAL_AXIS_RULES
    mesh_cfg = cfg.mesh if isinstance(cfg, Config) else cfg
    rules = tuple(mesh_cfg.logical_axis_rules) or DEFAULT_LOGICAL_AXIS_RULES
    check_rules(rules)
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


def logical_to_sharding(logical_specs_tree, mesh: Mesh, rules=None):
    """A tree of `NamedSharding`s from a tree of logical `PartitionSpec`s (e.g. `nn.get_partition_spec(...)`)."""
    return nn.logical_to_mesh_sharding(logical_specs_tree, mesh, logical_rules() if rules is None else rules)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading dimension split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a value every device holds whole (step counters, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------------------------------- processes


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def multi_process_requested() -> bool:
    """Whether the environment describes a multi-process launch (JAX coordinator, SLURM, or a TPU pod)."""
    env = os.environ
    if env.get("DWJAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    slurm_tasks = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_PROCID") is not None and (slurm_tasks or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    return bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))  # multi-slice TPU


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None) -> bool:
    """Start `jax.distributed` when this is one process of many; return whether it did.

    Explicit arguments win; else JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), SLURM and
    TPU-pod environments are detected (DWJAX_DISTRIBUTED=1 forces it, e.g. on TPU VMs that only expose
    the topology through metadata). CPU collectives use gloo so multi-process CPU runs (tests) work.
    Must run before anything else touches JAX devices.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and not multi_process_requested():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not explicit:
        num_processes = _env_int("JAX_NUM_PROCESSES")
        process_id = _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, configs and summaries."""
    return jax.process_index() == 0


def on_main(fn):
    """Decorator: run `fn` only on process 0 (other processes get None). For side effects, never for collectives."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None
    return wrapper


def banner(cfg: Config, global_batch: int | None = None, file=None) -> str:
    """Print the start-up summary: one line per process, the mesh and batch arithmetic from process 0.

    `global_batch`: examples per optimizer step, gradient accumulation included (what the loader draws per step;
    default per-device batch x devices x `train.grad_accum_steps`). The accumulation factor shown is
    `global_batch / (per-device batch x devices)`, so a caller's global batch is never multiplied again."""
    n, n_local = jax.device_count(), jax.local_device_count()
    per_device = cfg.train.per_device_batch_size
    micro = per_device * n                                    # one microbatch over all devices
    if global_batch is None:
        global_batch = micro * cfg.train.grad_accum_steps
    accum = global_batch // micro if micro and global_batch % micro == 0 else cfg.train.grad_accum_steps
    sizes = resolve_mesh_shape(cfg.mesh, n)
    kind = jax.devices()[0].device_kind
    lines = [f"dwjax: process {jax.process_index()}/{jax.process_count()}: {n_local} local of {n} devices ({kind})"]
    if is_main_process():
        mesh_text = " ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
        if cfg.mesh.dcn_data > 1:
            mesh_text += f" (data = {cfg.mesh.dcn_data} slices x {sizes['data'] // cfg.mesh.dcn_data})"
        procs = max(jax.process_count(), 1)
        lines += [
            f"dwjax: mesh {mesh_text}",
            f"dwjax: batch {per_device} per device x {n} devices x {accum} accumulation = {global_batch} global "
            f"(examples per optimizer step; {micro} per microbatch, {global_batch // procs} per process)",
            f"dwjax: dtype {cfg.model.dtype} (params {cfg.model.param_dtype}), remat {cfg.model.remat}, "
            f"scan_layers {cfg.model.scan_layers}",
        ]
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text
