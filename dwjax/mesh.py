"""Device mesh, logical axis rules, fitting a config to the devices, shardings, multi-process start-up and
process-0 helpers.

The mesh always has the axes ("data", "fsdp", "tensor"). On multi-slice TPU (or multi-node GPU) the data axis
is `dcn_data` slices x `data` per slice, laid out so that only the data axis crosses the slow network.
The model names its axes logically (`batch`, `embed`, `heads`, ...); `mesh.logical_axis_rules` in the config

maps them to mesh axes (`DEFAULT_LOGICAL_AXIS_RULES` when it is []), so pure data parallel, FSDP and tensor
parallel are rule sets, not code paths. `validate_for_devices` resolves `mesh.* = -1` against the devices present
and checks the batch arithmetic; its errors say which key to change.

Call `initialize_distributed()` first thing in a process (before any other JAX call), then `make_mesh`.
"""
from __future__ import annotations

import difflib
import functools
import os
import sys
from typing import Union

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dwjax.config import Config, MeshConfig
from dwjax.errors import ConfigError

#: logical axis names used by the model (see docs/DESIGN.md)
LOGICAL_AXES = ("batch", "enc_len", "dec_len", "embed", "heads", "head_dim", "mlp", "vocab", "layers",
                "conv_in", "conv_k", "kv_len")
#: physical mesh axes, in mesh order
MESH_AXES = ("data", "fsdp", "tensor")
#: the batch dimension is split over these mesh axes (data parallel and FSDP both split the batch)
BATCH_AXES = ("data", "fsdp")

#: logical name -> mesh axis (or axes, or None = replicated); FSDP over `embed`, tensor parallel over heads/mlp/vocab
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("enc_len", None),
    ("dec_len", None),
    ("head_dim", None),
    ("kv_len", None),
    ("conv_in", None),
    ("conv_k", None),
)

LogicalRule = tuple[str, Union[str, tuple[str, ...], None]]


def check_rules(rules) -> tuple[LogicalRule, ...]:
    """`rules` as flax takes them: each a [logical name of the model, mesh axis | [mesh axes] | null], each
    logical name at most once; a `ConfigError` naming `mesh.logical_axis_rules` otherwise."""
    out, where = [], "mesh.logical_axis_rules"
    for rule in rules:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"{where}: each rule is [logical name, mesh axis | [mesh axes] | null], got {rule!r}")
        logical, axes = rule
        if logical not in LOGICAL_AXES:
            close = difflib.get_close_matches(logical, LOGICAL_AXES, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(LOGICAL_AXES)}"
            raise ConfigError(f"{where}: unknown logical axis {logical!r}{hint}")
        if logical in (r[0] for r in out):
            raise ConfigError(f"{where}: logical axis {logical!r} appears twice")
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            if axis not in MESH_AXES:
                raise ConfigError(f"{where}: {logical!r} maps to unknown mesh axis {axis!r}; "
                                  f"mesh axes are {', '.join(MESH_AXES)}")
        out.append((logical, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def _mesh_text(sizes: dict[str, int]) -> str:
    shown = {k: v for k, v in sizes.items() if v != 1}
    return " ".join(f"{k}={v}" for k, v in (shown or {"data": sizes["data"]}).items())


def resolve_mesh_shape(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
    """{"data": dcn_data * data, "fsdp": ..., "tensor": ...} for `n_devices`, with -1 filled; errors say what to set."""
    sizes = {"dcn_data": mesh.dcn_data, **{a: getattr(mesh, a) for a in MESH_AXES}}
    fill = [a for a in MESH_AXES if sizes[a] == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: only one of data, fsdp, tensor may be -1, got {_mesh_text(sizes)}")
    fixed = 1
    for v in sizes.values():
        if v != -1:
            fixed *= v
    if fill:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh {_mesh_text({k: v for k, v in sizes.items() if v != -1})} cannot fill {n_devices} devices "
                f"({n_devices} is not divisible by {fixed}): make the product of the other mesh axes divide {n_devices}")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        fixes = [f"mesh.{axis}={n_devices // (fixed // sizes[axis])}" for axis in MESH_AXES
                 if n_devices % (fixed // sizes[axis]) == 0]
        if "mesh.data=-1" not in fixes and n_devices % (fixed // sizes["data"]) == 0:
            fixes.append("mesh.data=-1")
        advice = " or ".join(fixes) if fixes else f"mesh sizes whose product is {n_devices}"
        raise ConfigError(f"mesh {_mesh_text(sizes)} needs {fixed} devices but {n_devices} are present: set {advice}")
    return {"data": sizes["dcn_data"] * sizes["data"], "fsdp": sizes["fsdp"], "tensor": sizes["tensor"]}


def global_batch_size(cfg: Config, n_devices: int) -> int:
    """Examples per microbatch across all devices (an optimizer step sees `grad_accum_steps` of these)."""
    return cfg.train.per_device_batch_size * n_devices


def validate_for_devices(cfg: Config, n_devices: int, n_processes: int = 1) -> dict[str, int]:
    """Check `cfg` fits `n_devices` devices on `n_processes` processes; return the resolved mesh shape."""
    if cfg.devices is not None:
        d = cfg.devices
        if d.count != n_devices:
            raise ConfigError(f"the topology is for {d.count} x {d.kind} but {n_devices} devices are present: use the "
                              f"topology file for this machine, or set devices.count={n_devices}")
        if d.processes != n_processes:
            raise ConfigError(f"the topology is for {d.processes} processes but {n_processes} are running: launch "
                              f"one process per host (see run_scripts/), or set devices.processes={n_processes}")
    if n_devices % n_processes:
        raise ConfigError(f"{n_devices} devices cannot be split evenly over {n_processes} processes")
    shape = resolve_mesh_shape(cfg.mesh, n_devices)
    if n_processes % cfg.mesh.dcn_data:
        raise ConfigError(f"mesh.dcn_data={cfg.mesh.dcn_data} must divide the {n_processes} processes "
                          f"(each slice/node runs whole processes): set mesh.dcn_data=1 on a single slice")
    check_rules(cfg.mesh.logical_axis_rules)
    batch_shards = shape["data"] * shape["fsdp"]
    for key, per_device in (("train.per_device_batch_size", cfg.train.per_device_batch_size),
                            ("eval.batch_size", cfg.eval.batch_size)):
        total = per_device * n_devices
        if total % batch_shards:
            raise ConfigError(f"global batch {total} ({key}={per_device} x {n_devices} devices) is not divisible by "
                              f"mesh data*fsdp={batch_shards}: change {key}")
        if total % n_processes:
            raise ConfigError(f"global batch {total} ({key}={per_device} x {n_devices} devices) is not divisible by "
                              f"the {n_processes} processes: change {key}")
    return shape


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
    mesh_cfg = getattr(mesh_cfg, "mesh", mesh_cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(_device_mesh(shape, mesh_cfg.dcn_data, devices), MESH_AXES)


def logical_rules(cfg: Config | MeshConfig | None = None) -> tuple[LogicalRule, ...]:
    """The logical-name -> mesh-axes rules in the form flax takes (the config's, else the defaults)."""
    rules = () if cfg is None else getattr(cfg, "mesh", cfg).logical_axis_rules
    return check_rules(rules or DEFAULT_LOGICAL_AXIS_RULES)


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
