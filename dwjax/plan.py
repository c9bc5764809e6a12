"""`dwjax plan`: per-device memory and FLOPs of a run on a topology, before renting it.

The train step (`dwjax/train_step.py`) and the sharded generate step (the pseudo-labeller's: encode + greedy
`decode_loop` per device under `shard_map`, teacher parameters replicated) are lowered and compiled ahead of time
for a mesh of fake CPU devices with the topology's device count. Every argument is a `jax.ShapeDtypeStruct`
carrying its sharding: no weight is loaded or allocated, so a large-v3 plan needs no download and little RAM.

    plan = make_plan(cfg, teacher_cfg, student_cfg)        # cfg: a Config with a `devices:` section
    print(format_plan(plan))

What a CPU compilation tells about TPU/GPU memory (printed with the report):
  * parameters, optimizer state and batch per device are exact: they are the argument buffers of the partitioned
    program, i.e. the shard shapes the shardings give (TPU pads small minor dimensions to (8, 128) tiles on top);
  * activations/temporaries are XLA:CPU's buffer assignment of the same partitioned program. TPU and GPU fuse,
    schedule and rematerialise differently (and XLA:CPU may widen bfloat16 work to float32), so treat the figure
    as an estimate (typically within a few tens of percent), not a guarantee. Runtime reserves (GPU: cuBLAS/cuDNN
    workspaces, NCCL buffers; JAX preallocates 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is set)
    come on top: keep a margin.
FLOPs: XLA's cost analysis counts the body of a loop once, so the layer scan and the accumulation scan would be
undercounted; the plan therefore also lowers (without compiling) one microbatch with the layers unrolled and
counts that, times the accumulation steps, next to the analytic count of `dwjax/distill.py`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dwjax.config import Config, override
from dwjax.decoding.generate import Generator
from dwjax.decoding.rules import DecodeSpec
from dwjax.errors import ConfigError
from dwjax.flops import generate_flops, train_step_flops
from dwjax.mesh import MESH_AXES, make_mesh, replicated, validate_for_devices
from dwjax.models.configs import OFFICIAL, WhisperConfig, official
from dwjax.models.whisper import Whisper, abstract_params, count_params
from dwjax.train_step import BATCH_KEYS, _dtype, make_sharded_train_step, module_kwargs
from dwjax.weights.loading import _cfg_from_hf, load_model

GiB = 1024 ** 3
#: below this margin a plan that fits is flagged as tight (runtime reserves and estimate error)
TIGHT_MARGIN = 0.10
#: new tokens the generate step is planned for (the pseudo-labeller's default --max-new-tokens)
GENERATE_MAX_NEW_TOKENS = 224


# ----------------------------------------------------------------------------------------------------- shapes


def resolve_teacher_shape(spec: str) -> tuple[str, WhisperConfig]:
    """(label, shape) of a teacher named without loading weights where possible.

    Accepted: an official shape (`large-v3`, `whisper-base`, `openai/whisper-small.en`, `builtin:whisper-tiny.en`);
    WhisperConfig fields as inline JSON (`{"d_model": 64, ...}`) or a .json file of them; a dwjax or transformers
    model directory (its config file only). Other model paths are loaded to read their shape."""
    text = str(spec).strip()
    name = text.removeprefix("builtin:")
    try:
        return text, official(name)
    except KeyError:
        pass
    if text.startswith("{"):
        try:
            return "custom shape", _shape_from_dict(json.loads(text), text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--teacher {text!r}: not valid JSON ({e})") from None
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text())
        return str(path), _shape_from_dict(data.get("model", data), str(path))
    if path.is_dir() and (path / "dwjax_config.json").exists():
        meta = json.loads((path / "dwjax_config.json").read_text())
        return str(path), WhisperConfig.from_dict(meta["model"])
    if path.is_dir() and (path / "config.json").exists() and "num_mel_bins" in (path / "config.json").read_text():
        return str(path), _cfg_from_hf(json.loads((path / "config.json").read_text()))
    if path.exists() or text.startswith("builtin:"):
        return text, load_model(text).cfg      # CTranslate2 / OpenAI files: the shape is in the weights
    raise ConfigError(f"unknown teacher {text!r}: give an official shape ({', '.join(sorted(OFFICIAL))}), "
                      f"WhisperConfig fields as JSON, or a model path")


def _shape_from_dict(d: dict, source: str) -> WhisperConfig:
    names = {f.name for f in dataclasses.fields(WhisperConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown WhisperConfig fields {unknown}; valid: {', '.join(sorted(names))}")
    return WhisperConfig(**d)


def student_shape(teacher_cfg: WhisperConfig, decoder_layers: int = 2) -> WhisperConfig:
    """The `init-student` shape: the teacher's encoder and `decoder_layers` of its decoder layers."""
    if not 1 <= decoder_layers <= teacher_cfg.decoder_layers:
        raise ConfigError(f"--student-decoder-layers {decoder_layers}: the teacher has {teacher_cfg.decoder_layers} "
                          f"decoder layers; give 1..{teacher_cfg.decoder_layers}")
    return teacher_cfg.replace(decoder_layers=decoder_layers)


def planning_spec(vocab_size: int):
    """A DecodeSpec with Whisper's special-token layout for `vocab_size` (no tokenizer needed; shapes only)."""
    if vocab_size >= 51864:
        eot = 50256 if vocab_size == 51864 else 50257
        ts = vocab_size - 1501
    else:  # made-up small vocabularies (tests): specials at the end
        eot, ts = vocab_size - 6, vocab_size - 2
    return DecodeSpec(eot=eot, sot=eot + 1, no_speech=ts - 2, no_timestamps=ts - 1, timestamp_begin=ts,
                      vocab_size=vocab_size, suppress=tuple(range(1, 64)) + (eot + 1, ts - 2),
                      begin_suppress=(eot,))


def prompt_length(cfg: WhisperConfig) -> int:
    return 4 if cfg.is_multilingual else 2     # sot (lang transcribe) notimestamps


# ----------------------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class Memory:
    """Per-device bytes of one compiled program (`compiled.memory_analysis()`)."""
    argument: int
    output: int
    alias: int          # output bytes that reuse donated argument buffers
    temp: int           # activations and temporaries
    code: int = 0

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        if m is None:
            raise RuntimeError("this backend gives no memory analysis")
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                   int(m.temp_size_in_bytes), int(getattr(m, "generated_code_size_in_bytes", 0) or 0))


@dataclasses.dataclass
class StepPlan:
    name: str
    memory: Memory
    resident: dict[str, int]            # per-device bytes of named inputs (exact, from the shardings)
    batch_per_device: int
    lower_s: float
    compile_s: float
    xla_flops_device: float             # compiled program, per device (loop bodies counted once)
    flops_global: Optional[float]       # layers unrolled, whole step, all devices (None: not measured)
    analytic_global: float              # dwjax/distill.py formula (what the run loop logs MFU with)
    analytic_full_global: float         # the same plus attention scores and cross-attention keys/values
    analytic_vs_xla: float              # the analytic count of what the unrolled XLA count covers
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Plan:
    cfg: Config
    teacher_name: str
    teacher_cfg: WhisperConfig
    student_cfg: WhisperConfig
    mesh_shape: dict[str, int]
    label_len: int
    train: StepPlan
    generate: Optional[StepPlan]
    wall_s: float

    @property
    def memory_bytes(self) -> Optional[int]:
        gb = self.cfg.devices.memory_gb
        return None if gb is None else int(gb * GiB)

    def fits(self, step: StepPlan) -> Optional[bool]:
        return None if self.memory_bytes is None else step.memory.peak <= self.memory_bytes

    @property
    def all_fit(self) -> Optional[bool]:
        verdicts = [self.fits(s) for s in (self.train, self.generate) if s is not None]
        return None if None in verdicts else all(verdicts)


def _tree_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, i.e. device 0's)."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------------- flops


def _flops(cost) -> float:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


# ----------------------------------------------------------------------------------------------------- plan


def _train_plan(cfg: Config, mesh, teacher_cfg, student_cfg, length: int, compiler_options, count_flops: bool):
    n = mesh.devices.size
    k = cfg.train.grad_accum_steps
    rows = cfg.train.per_device_batch_size * n * k

    def batch_args(steps, rows):
        shapes = {"input_features": ((rows, teacher_cfg.n_mels, 2 * teacher_cfg.n_audio_ctx), jnp.float32),
                  "decoder_input_ids": ((rows, length), jnp.int32), "labels": ((rows, length), jnp.int32),
                  "loss_mask": ((rows, length), jnp.float32)}
        return {key: jax.ShapeDtypeStruct(*shapes[key], sharding=steps.batch_sharding) for key in BATCH_KEYS}

    def teacher_args(steps, model_cfg):
        boxed = abstract_params(teacher_cfg, **module_kwargs(model_cfg, train=False))
        return _abstract(nn.unbox(boxed), steps.teacher_shardings)

    steps = make_sharded_train_step(cfg, mesh, student_cfg, teacher_cfg, compiler_options=compiler_options)
    state, teacher, batch = steps.abstract_state(), teacher_args(steps, cfg.model), batch_args(steps, rows)
    t0 = time.perf_counter()
    lowered = steps._train.lower(state, teacher, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    resident = {"student parameters": _tree_device_bytes(state.params),
                "optimizer state": _tree_device_bytes(state.opt_state),
                "teacher parameters": _tree_device_bytes(teacher),
                "batch": _tree_device_bytes(batch)}
    notes = []
    flops_global = None
    if count_flops:
        # one microbatch with the layers unrolled, lowered only (cost analysis of the unpartitioned program)
        flat = override(cfg, "model.scan_layers=false", "train.grad_accum_steps=1")
        s2 = make_sharded_train_step(flat, mesh, student_cfg, teacher_cfg, grad_accum=1,
                                     compiler_options=compiler_options)
        micro = s2._train.lower(s2.abstract_state(), teacher_args(s2, flat.model),
                                batch_args(s2, rows // k))
        flops_global = _flops(micro.cost_analysis()) * k
    base, full = train_step_flops(teacher_cfg, student_cfg, rows, length)
    return StepPlan("train step", Memory.of(compiled), resident, cfg.train.per_device_batch_size, t1 - t0, t2 - t1,
                    _flops(compiled.cost_analysis()), flops_global, base, full, full, notes)


def _generate_plan(cfg: Config, mesh, teacher_cfg, compiler_options, count_flops: bool, max_new: int):
    """The pseudo-labeller's step (`Generator.label`, the engine's: encode + greedy decode per device, rows split
    over data x fsdp), parameters replicated (float32, as `dwjax pseudo-label` holds them), compute in
    `model.dtype`, the encoder over the whole batch as on accelerators."""
    n = mesh.devices.size
    b = cfg.label.batch_size * n
    spec = planning_spec(teacher_cfg.vocab_size)
    p = prompt_length(teacher_cfg)
    max_new = max(1, min(max_new, teacher_cfg.n_text_ctx - p))
    template = (spec.sot,) + (spec.sot + 1,) * (p - 2) + (spec.no_timestamps,)
    repl = replicated(mesh)

    def build(scan_layers):
        model = Whisper(teacher_cfg, dtype=_dtype(cfg.model.dtype), scan_layers=scan_layers)
        engine = Generator(model, None, spec, mesh, per_example_encoder=False)
        params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                                        nn.unbox(abstract_params(teacher_cfg, scan_layers=scan_layers)))
        rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=engine.rows)  # noqa: E731
        mel = rows((b, teacher_cfg.n_mels, 2 * teacher_cfg.n_audio_ctx), jnp.float32)
        per_row = (rows((b,), jnp.int32), rows((b,), jnp.int32), rows((b,), jnp.bool_), rows((b,), jnp.int32))
        lower = lambda: engine.label_step.lower(params, mel, *per_row, spec=spec, template=template,  # noqa: E731
                                            language_ids=None, max_new=max_new)
        return lower, (params, mel) + per_row

    lower, args = build(cfg.model.scan_layers)
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options)
    t2 = time.perf_counter()
    resident = {"teacher parameters": _tree_device_bytes(args[0]), "batch": _tree_device_bytes(args[1:])}
    flops_global = None
    notes = [f"{max_new} new tokens after a {p}-token prompt, greedy; XLA counts the token loop once, so its "
             f"count is compared with the analytic prefill plus one token"]
    if count_flops:
        flops_global = _flops(build(False)[0]().cost_analysis()) * n  # shard_map: the body is one device's program
    base, full = generate_flops(teacher_cfg, b, p, max_new)
    _, once = generate_flops(teacher_cfg, b, p, 1)
    return StepPlan("generate step (teacher, pseudo-labelling)", Memory.of(compiled), resident,
                    cfg.label.batch_size, t1 - t0, t2 - t1, _flops(compiled.cost_analysis()), flops_global,
                    base, full, once, notes)


def make_plan(cfg: Config, teacher_cfg: WhisperConfig, student_cfg: WhisperConfig, *, teacher_name: str = "",
              devices=None, compiler_options: dict | None = None, count_flops: bool = True,
              generate: bool = True, max_new_tokens: int = GENERATE_MAX_NEW_TOKENS) -> Plan:
    """Compile the train (and generate) step for `cfg.devices.count` devices (default: the first CPU devices)."""
    start = time.perf_counter()
    if cfg.devices is None:
        raise ConfigError("dwjax plan needs a topology with a `devices:` section (kind, count, memory_gb): "
                          "pass --topology NAME (see tpu_configs/)")
    n = cfg.devices.count
    if devices is None:
        devices = jax.devices("cpu")
    devices = list(devices)
    if len(devices) < n:
        raise ConfigError(f"the topology has {n} devices but only {len(devices)} fake devices are available: "
                          f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
    shape = validate_for_devices(cfg, n, cfg.devices.processes)
    mesh = make_mesh(cfg, devices[:n])
    length = min(cfg.data.max_label_length, student_cfg.n_text_ctx, teacher_cfg.n_text_ctx)
    train = _train_plan(cfg, mesh, teacher_cfg, student_cfg, length, compiler_options, count_flops)
    gen = _generate_plan(cfg, mesh, teacher_cfg, compiler_options, count_flops, max_new_tokens) if generate else None
    return Plan(cfg, teacher_name or "custom shape", teacher_cfg, student_cfg, shape, length, train, gen,
                time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------- report


def _gib(n: float) -> str:
    if abs(n) < GiB / 10:
        return f"{n / 1024 ** 2:.2f} MiB"
    return f"{n / GiB:.2f} GiB"


def _tflop(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e10 else f"{x / 1e9:.3f} GFLOP"


def _nparams(cfg: WhisperConfig) -> int:
    return count_params(nn.unbox(abstract_params(cfg)))


def advice(plan: Plan, step: StepPlan) -> list[str]:
    """What to change so that `step` fits (estimates; rerun the plan to check)."""
    cfg, budget = plan.cfg, plan.memory_bytes
    if budget is None:
        return []
    m, out = step.memory, []
    over = m.peak - budget
    b = step.batch_per_device
    if step is plan.train:
        weights = step.resident["student parameters"] + step.resident["optimizer state"] + \
            step.resident["teacher parameters"]
        # assume every activation byte scales with the batch (an upper bound on the slope: conservative)
        per_example = (m.temp + step.resident["batch"]) / max(b, 1)
        fixed = m.peak - per_example * b
        fit_b = int((budget * (1 - TIGHT_MARGIN) - fixed) // per_example) if per_example else b
        if 1 <= fit_b < b:
            accum = cfg.train.grad_accum_steps * math.ceil(b / fit_b)
            out.append(f"train.per_device_batch_size={fit_b} (≈{_gib(fixed + per_example * fit_b)} per device) with "
                       f"train.grad_accum_steps={accum} keeps about the same examples per optimizer step")
        elif fit_b < 1:
            out.append("even train.per_device_batch_size=1 does not fit: the parameters and optimizer state "
                       f"({_gib(weights)} per device) must shrink first, see below")
        if cfg.model.remat == "none":
            out.append("model.remat=dots (or full): the student decoder keeps fewer activations for the backward "
                       "pass (little gain with few decoder layers)")
        n = cfg.devices.count
        for f in (2, 4, 8, 16, 32, 64):
            if f <= cfg.mesh.fsdp or n % f or f > n:
                continue
            est = m.peak - weights + weights * cfg.mesh.fsdp / f
            if est <= budget or f == n:
                out.append(f"mesh.fsdp={f} (mesh.data=-1): shards teacher, student and optimizer state over {f} "
                           f"devices: ≈{_gib(est)} per device")
                break
        if cfg.model.param_dtype == "float32":
            out.append(f"model.param_dtype=bfloat16 halves parameters and optimizer state "
                       f"(≈{_gib(m.peak - weights / 2)} per device)")
        if cfg.model.dtype == "float32":
            out.append("model.dtype=bfloat16 halves most activations")
    else:
        per_example = m.temp / max(b, 1)
        fixed = m.peak - per_example * b
        fit_b = int((budget * (1 - TIGHT_MARGIN) - fixed) // per_example) if per_example else b
        if 1 <= fit_b < b:
            out.append(f"label.batch_size={fit_b} (dwjax pseudo-label --batch-size {fit_b}): "
                       f"≈{_gib(fixed + per_example * fit_b)} per device")
        else:
            out.append("the replicated teacher alone is too large for one device: use a smaller teacher")
    return [f"over by {_gib(over)}; change one of:"] + [f"  - {a}" for a in out] if over > 0 else \
        [f"margin under {TIGHT_MARGIN:.0%}: runtime reserves may not fit; to gain room:"] + [f"  - {a}" for a in out]


def format_plan(plan: Plan) -> str:
    cfg, d = plan.cfg, plan.cfg.devices
    n, k = d.count, cfg.train.grad_accum_steps
    lines = []
    mesh_text = " ".join(f"{a}={plan.mesh_shape[a]}" for a in MESH_AXES)
    lines.append(f"dwjax plan: {n} x {d.kind} ({d.processes} process{'es' if d.processes > 1 else ''}), "
                 f"{'?' if d.memory_gb is None else f'{d.memory_gb:g} GiB'} per device; mesh {mesh_text}")
    t, s = plan.teacher_cfg, plan.student_cfg
    lines.append(f"teacher {plan.teacher_name}: d_model {t.d_model}, {t.encoder_layers}-{t.decoder_layers} layers, "
                 f"vocab {t.vocab_size}, {_nparams(t) / 1e6:.1f}M parameters")
    lines.append(f"student {s.encoder_layers}-{s.decoder_layers} (teacher encoder, frozen; decoder trained): "
                 f"{_nparams(s) / 1e6:.1f}M parameters")
    lines.append(f"dtype {cfg.model.dtype}, params {cfg.model.param_dtype}, remat {cfg.model.remat}, "
                 f"scan_layers {cfg.model.scan_layers}")
    pdb = cfg.train.per_device_batch_size
    gb = pdb * n
    shards = plan.mesh_shape["data"] * plan.mesh_shape["fsdp"]
    lines += ["", "batch:",
              f"  {pdb} per device x {n} devices = {gb} global per microbatch; x {k} accumulation = {gb * k} "
              f"examples per optimizer step",
              f"  {gb // d.processes} per process ({d.processes}); split over data x fsdp = {shards} shards: "
              f"{gb // shards} rows per shard" + (f" (tensor: {plan.mesh_shape['tensor']} devices share a shard)"
                                                  if plan.mesh_shape["tensor"] > 1 else ""),
              f"  labels padded to {plan.label_len} tokens (data.max_label_length; a run uses its longest label "
              f"rounded up to 16): ≤ {gb * k * plan.label_len:,} label tokens per step",
              f"  generate: label.batch_size {cfg.label.batch_size} per device = "
              f"{cfg.label.batch_size * n} per step"]
    for step in (plan.train, plan.generate):
        if step is None:
            continue
        m = step.memory
        lines += ["", f"{step.name} — per device (compiled for {n} fake CPU devices: "
                      f"lower {step.lower_s:.1f} s, compile {step.compile_s:.1f} s):"]
        for name, v in step.resident.items():
            lines.append(f"  {name:<24}{_gib(v):>12}")
        other = m.argument - sum(step.resident.values())
        if abs(other) > 1024 * 1024:
            lines.append(f"  {'other arguments':<24}{_gib(other):>12}")
        lines.append(f"  {'arguments (XLA)':<24}{_gib(m.argument):>12}")
        lines.append(f"  {'outputs':<24}{_gib(m.output):>12}   ({_gib(m.alias)} reuse donated arguments)")
        lines.append(f"  {'activations/temporaries':<24}{_gib(m.temp):>12}")
        lines.append(f"  {'peak estimate':<24}{_gib(m.peak):>12}   = arguments + outputs - reused + temporaries")
        budget = plan.memory_bytes
        if budget is None:
            lines.append("  fits: unknown (the topology has no devices.memory_gb)")
        else:
            margin = budget - m.peak
            if margin >= 0:
                verdict = "fits" + (" (tight)" if margin < TIGHT_MARGIN * budget else "")
                lines.append(f"  {verdict}: {_gib(m.peak)} of {_gib(budget)}, margin {_gib(margin)} "
                             f"({margin / budget:.0%})")
            else:
                lines.append(f"  does not fit: {_gib(m.peak)} needed, {_gib(budget)} available "
                             f"(over by {_gib(-margin)})")
            if margin < TIGHT_MARGIN * budget:
                lines += ["  " + a for a in advice(plan, step)]
        lines.append("  FLOPs per step:")
        if step.flops_global is not None:
            lines.append(f"    XLA, layers unrolled: {_tflop(step.flops_global)} total, "
                         f"{_tflop(step.flops_global / n)} per device")
        lines.append(f"    XLA, compiled program: {_tflop(step.xla_flops_device)} per device (loop bodies once)")
        lines.append(f"    analytic (dwjax/distill.py, as MFU is logged): {_tflop(step.analytic_global)}; "
                     f"with attention scores and cross keys/values: {_tflop(step.analytic_full_global)}")
        if step.flops_global:
            lines.append(f"    cross-check: XLA unrolled / analytic with attention = "
                         f"{step.flops_global / step.analytic_vs_xla:.2f}"
                         + ("" if step.analytic_vs_xla == step.analytic_full_global else " (same token count)"))
        lines += ["    " + x for x in step.notes]
    verdict = plan.all_fit
    lines += ["", "verdict: " + ("unknown (no devices.memory_gb)" if verdict is None else
                                 "fits" if verdict else "does not fit (see above for what to change)"),
              "caveats: parameter, optimizer and batch bytes are exact shard sizes (TPU adds tile padding); "
              "activations are XLA:CPU's buffer assignment of the same program — TPU/GPU fuse, schedule and "
              "keep bfloat16 differently, so read them as an estimate; runtime reserves (GPU: cuBLAS/NCCL "
              "workspaces, XLA_PYTHON_CLIENT_MEM_FRACTION) come on top.",
              f"plan took {plan.wall_s:.1f} s"]
    return "\n".join(lines)
