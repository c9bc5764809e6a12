"""Typed run configuration: frozen dataclasses, merged from YAML layers and `key.sub=value` overrides.

Loading order, each layer overriding the one before (`load_config`):

    dwjax/defaults/base.yaml  ->  --topology tpu_configs/X.yaml  ->  --config experiment.yaml  ->  key.sub=value ...

Unknown keys and ill-typed values are `ConfigError`s that name the key (and suggest the nearest valid one).
Every field's dataclass default equals `dwjax/defaults/base.yaml` (a test checks it). Each field carries a
one-line description in its metadata (`field_doc`), which `to_yaml(cfg, comments=True)` writes as a comment.

`validate_for_devices(cfg, n_devices, n_processes)` resolves `mesh.* = -1` against the devices actually present
and checks the batch arithmetic; its errors say which key to change.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dwjax.errors import ConfigError

DEFAULTS_PATH = Path(__file__).parent / "defaults" / "base.yaml"
TOPOLOGY_DIR = Path(__file__).resolve().parent.parent / "tpu_configs"

#: logical axis names used by the model (see docs/DESIGN.md)
LOGICAL_AXES = ("batch", "enc_len", "dec_len", "embed", "heads", "head_dim", "mlp", "vocab", "layers",
                "conv_in", "conv_k", "kv_len")
#: physical mesh axes, in mesh order
MESH_AXES = ("data", "fsdp", "tensor")

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


def _f(default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field with a one-line description (`field_doc`)."""
    return field(default=default, metadata={"doc": doc})


def field_doc(cls: type, name: str) -> str:
    """The one-line description of field `name` of config dataclass `cls`."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}[name]


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("default", "run name, used in logs and as the W&B run name")
    output_dir: str = _f("runs/default", "directory for checkpoints, logs and evaluation results of this run")
    seed: int = _f(0, "seed for parameter init and training randomness (folded with the step)")


@dataclass(frozen=True)
class ModelConfig:
    teacher: str = _f("builtin:whisper-tiny.en", "teacher model: builtin:NAME, or a transformers/CTranslate2/OpenAI path")
    student: str | None = _f(None, "directory written by `dwjax init-student`; null = pseudo-label/evaluate only")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "compute (activation) dtype")
    param_dtype: Literal["float32", "bfloat16"] = _f("float32", "dtype parameters and optimizer state are stored in")
    scan_layers: bool = _f(True, "run layers with nn.scan (fast compile); false unrolls the same stacked params")
    remat: Literal["none", "full", "dots"] = _f("none", "rematerialisation per layer: none, full, or save only matmuls (dots)")


@dataclass(frozen=True)
class DatasetSpec:
    name: str = _f(doc="short name used in logs and metrics")
    path: str = _f(doc="pseudo-labelled manifest (JSONL/CSV/TSV/parquet) or HF dataset directory")
    weight: float = _f(1.0, "relative sampling weight among the training sets")
    wer_threshold: float | None = _f(None, "this set's data.wer_threshold; null = the data section's (.inf = off)")
    min_avg_logprob: float | None = _f(None, "this set's data.min_avg_logprob; null = the data section's (-.inf = off)")
    max_compression_ratio: float | None = _f(
        None, "this set's data.max_compression_ratio; null = the data section's (.inf = off)")
    max_no_speech_prob: float | None = _f(
        None, "this set's data.max_no_speech_prob; null = the data section's (.inf = off)")
    language: str | None = _f(
        None, "the language token of every row's prompt (a Whisper code such as de); null = each row's own, as the "
              "labeller recorded it (given or detected)")
    task: Literal["transcribe", "translate"] | None = _f(
        None, "the task token of every row's prompt; null = each row's own, as the labeller recorded it")


@dataclass(frozen=True)
class EvalSetSpec:
    name: str = _f(doc="short name used in logs and metrics")
    path: str = _f(doc="manifest or dataset directory with reference transcripts")


@dataclass(frozen=True)
class DataConfig:
    # Label filters (dwjax/data/label_filter.py). A label with a reference is judged by its WER alone; one without
    # (no reference, or one that normalises to nothing) by the teacher's confidence: kept only when all three of
    # avg_logprob >= min_avg_logprob, compression_ratio <= max_compression_ratio, no_speech_prob <= max_no_speech_prob
    # hold. Bounds are inclusive (a value at its threshold is kept); null turns a condition off (all three null:
    # labels without a reference are kept unjudged). The confidence defaults are Whisper's own transcribe() ones.
    train: tuple[DatasetSpec, ...] = _f(
        (), "training sets: list of {name, path, weight}, each optionally with its own filter thresholds "
            "(wer_threshold, min_avg_logprob, max_compression_ratio, max_no_speech_prob)")
    eval: tuple[EvalSetSpec, ...] = _f((), "evaluation sets: list of {name, path}")
    wer_threshold: float | None = _f(
        10.0, "labels with a reference: dropped when their WER vs the reference exceeds this (%); null = keep all "
              "(10: the paper's threshold)")
    min_avg_logprob: float | None = _f(
        -1.0, "labels without a reference: dropped when the teacher's mean token log-probability is below this; "
              "null = off (-1.0: Whisper's logprob_threshold, below which it re-decodes as unreliable)")
    max_compression_ratio: float | None = _f(
        2.4, "labels without a reference: dropped when the text's zlib compression ratio exceeds this; null = off "
             "(2.4: Whisper's compression_ratio_threshold, above which text is a runaway repeat)")
    max_no_speech_prob: float | None = _f(
        0.6, "labels without a reference: dropped when the teacher's no-speech probability exceeds this; null = off "
             "(0.6: Whisper's no_speech_threshold, above which it calls a window silent)")
    timestamp_probability: float = _f(0.2, "probability of training on the timestamped form of a label")
    prev_context_probability: float = _f(
        0.0, "probability of conditioning a packed window on the previous window's text (<|startofprev|> prompt, "
             "masked from the loss; dwjax/data/loader.py)")
    max_label_length: int = _f(448, "labels longer than this many tokens are dropped")
    label_bucket: int = _f(
        64, "pad each batch's labels to its longest sequence rounded up to a multiple of this (one compile per "
            "bucket); 0 = pad every batch to the run's longest label")
    seed: int = _f(0, "seed of the data order; the order is a function of (seed, step)")
    num_workers: int = _f(4, "host threads decoding audio and computing features")


@dataclass(frozen=True)
class LossConfig:
    # The paper (Gandhi et al. 2023, eq. 3) writes L = a_KL * KL + a_PL * CE with a_KL = 0.8, a_PL = 1.0; the
    # released distil-whisper checkpoints were trained with 0.8 on CE and 1.0 on KL, which is our default.
    kl_weight: float = _f(1.0, "weight of KL(teacher || student) on temperature-softened logits (released: 1.0)")
    ce_weight: float = _f(0.8, "weight of cross-entropy on the pseudo-labels (released: 0.8; the paper: 1.0)")
    temperature: float = _f(2.0, "softmax temperature of the KL term (the KL is scaled by temperature**2)")
    mse_weight: float = _f(0.0, "weight of the MSE between student and mapped teacher decoder hidden states; 0 = off")


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = _f(1e-4, "peak learning rate of AdamW")
    warmup_steps: int = _f(500, "steps of linear warm-up from 0 to learning_rate")
    schedule: Literal["linear", "constant"] = _f("linear", "after warm-up: linear decay to 0 at total_steps, or constant")
    total_steps: int = _f(5000, "optimizer steps to train for")
    b1: float = _f(0.9, "Adam beta1")
    b2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.0, "decoupled weight decay (AdamW)")
    max_grad_norm: float = _f(1.0, "clip gradients to this global norm; 0 = no clipping")
    frozen: tuple[str, ...] = _f((), "student decoder parts kept at their initial values (embed_tokens, "
                                     "embed_positions, final_norm, layers); [] = train the whole decoder")


@dataclass(frozen=True)
class MeshConfig:
    data: int = _f(-1, "data-parallel size within a slice; -1 = fill the devices left by the other axes")
    fsdp: int = _f(1, "fully-sharded (parameter-sharded) data-parallel size; -1 = fill")
    tensor: int = _f(1, "tensor-parallel size over heads/mlp/vocab; -1 = fill")
    dcn_data: int = _f(1, "data-parallel size across slices/nodes (multi-slice); the mesh data axis = dcn_data * data")
    logical_axis_rules: tuple[LogicalRule, ...] = _f(
        DEFAULT_LOGICAL_AXIS_RULES, "list of [logical name, mesh axis | [mesh axes] | null]")


@dataclass(frozen=True)
class TrainConfig:
    per_device_batch_size: int = _f(8, "examples per device per microbatch; global batch = this * device count")
    grad_accum_steps: int = _f(1, "microbatches accumulated per optimizer step")
    eval_every: int = _f(1000, "evaluate every this many optimizer steps; 0 = only at the end")
    log_every: int = _f(50, "log training metrics every this many optimizer steps")
    eval_batch_size: int = _f(8, "examples per device when evaluating (generation)")
    max_eval_samples: int | None = _f(None, "cap on examples per evaluation set; null = all")
    encoder_cache: str | None = _f(
        None, "directory caching the frozen teacher encoder's output per training row (dwjax/data/encoder_cache.py;"
              " needs a student that keeps the teacher's encoder); null = run the encoder every step")
    encoder_cache_dtype: Literal["float16", "bfloat16"] = _f("float16", "dtype the encoder cache stores")
    encoder_cache_rebuild: bool = _f(
        False, "rebuild an encoder cache made for another teacher or audio instead of refusing it")


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = _f(1000, "save every this many optimizer steps (and on preemption)")
    keep_last: int = _f(3, "number of most recent checkpoints kept")
    keep_best: int = _f(1, "number of best-by-eval-WER checkpoints kept besides the recent ones")
    async_save: bool = _f(True, "write checkpoints in the background while training continues")
    init_from: str | None = _f(None, "checkpoint to initialise parameters from (not the optimizer); null = student")


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str | None = _f(None, "directory for logs; null = <run.output_dir>/logs")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    wandb: bool = _f(False, "log to Weights & Biases (needs `wandb` installed and logged in)")
    jsonl: bool = _f(True, "append metrics to metrics.jsonl")


@dataclass(frozen=True)
class DevicesConfig:
    kind: str = _f(doc="device kind, e.g. 'TPU v4' or 'NVIDIA H100 80GB HBM3'")
    count: int = _f(doc="total number of devices (chips / GPUs) the topology has")
    processes: int = _f(1, "number of processes (TPU hosts, or GPU nodes x processes per node)")
    memory_gb: float | None = _f(None, "accelerator memory per device in GiB (HBM), for `dwjax plan`")


@dataclass(frozen=True)
class Config:
    run: RunConfig = _f(RunConfig(), "run identity and output location")
    model: ModelConfig = _f(ModelConfig(), "teacher, student and numerics")
    data: DataConfig = _f(DataConfig(), "datasets and label filtering")
    loss: LossConfig = _f(LossConfig(), "distillation loss weights")
    optim: OptimConfig = _f(OptimConfig(), "optimizer and learning-rate schedule")
    mesh: MeshConfig = _f(MeshConfig(), "device mesh and logical axis rules")
    train: TrainConfig = _f(TrainConfig(), "batch sizes and loop intervals")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), "checkpointing and retention")
    logging: LoggingConfig = _f(LoggingConfig(), "metric sinks")
    devices: DevicesConfig | None = _f(None, "the devices a topology file was written for (validation and plan only)")


# ----------------------------------------------------------------------------------------------------- typing


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _union_args(tp: Any) -> tuple | None:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _section_type(tp: Any) -> type | None:
    """The dataclass a field of type `tp` holds (unwrapping `X | None`), else None."""
    if _is_dataclass_type(tp):
        return tp
    args = _union_args(tp)
    if args:
        classes = [a for a in args if _is_dataclass_type(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    args = _union_args(tp)
    if args:
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(tp) is tuple:
        targs = typing.get_args(tp)
        if len(targs) == 2 and targs[1] is Ellipsis:
            return f"a list of ({_describe(targs[0])})"
        return "a list [" + ", ".join(_describe(a) for a in targs) + "]"
    if _is_dataclass_type(tp):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: a value does not have the expected type (the caller turns it into a ConfigError)."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path, self.message = path, message


def _convert(value: Any, tp: Any, path: str) -> Any:
    """`value` (from YAML) as type `tp`; raises `_Mismatch` naming the innermost key that is wrong."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch(path, f"expected null, got {value!r}")
    args = _union_args(tp)
    if args:
        if value is None and type(None) in args:
            return None
        failures = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, path)
            except _Mismatch as e:
                failures.append(e)
        deepest = max(failures, key=lambda e: len(e.path))
        if deepest.path != path:  # a nested field is wrong: report that one
            raise deepest
        raise _Mismatch(path, f"expected {_describe(tp)}, got {value!r}")
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch(path, f"expected {_describe(tp)}, got {value!r}")
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(path, f"expected {_describe(tp)}, got {value!r}")
        targs = typing.get_args(tp)
        if len(targs) == 2 and targs[1] is Ellipsis:
            return tuple(_convert(v, targs[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(targs):
            raise _Mismatch(path, f"expected {_describe(tp)}, got {value!r}")
        return tuple(_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, targs)))
    if _is_dataclass_type(tp):
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch(path, f"expected an integer, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch(path, f"expected an integer, got {value!r}") from None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch(path, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch(path, f"expected a string, got {value!r}")
    raise TypeError(f"config field {path} has an unsupported type {tp!r}")


def _unknown_key_error(key: str, cls: type, prefix: str, source: str | None) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}{key}"
    where = f" (in {source})" if source else ""
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        return ConfigError(f"unknown key {full}; did you mean {prefix}{close[0]}?{where}")
    section = prefix.rstrip(".") or "the top level"
    return ConfigError(f"unknown key {full}; valid keys under {section}: {', '.join(names)}{where}")


def _build(cls: type, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise _Mismatch(path, f"expected {_describe(cls)}, got {value!r}")
    hints = _hints(cls)
    prefix = f"{path}." if path else ""
    kwargs = {}
    for key in value:
        if key not in hints:
            raise _unknown_key_error(key, cls, prefix, None)
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = _convert(value[f.name], hints[f.name], f"{prefix}{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Mismatch(f"{prefix}{f.name}", "is required")
    return cls(**kwargs)


def _check_keys(layer: Any, cls: type, prefix: str, source: str) -> None:
    """Raise on keys of `layer` that `cls` does not have, recursing into sub-sections and lists of them."""
    if not isinstance(layer, dict):
        return
    hints = _hints(cls)
    for key, value in layer.items():
        if key not in hints:
            raise _unknown_key_error(key, cls, prefix, source)
        sub = _section_type(hints[key])
        if sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.", source)
        elif typing.get_origin(hints[key]) is tuple and isinstance(value, list):
            targs = typing.get_args(hints[key])
            if len(targs) == 2 and targs[1] is Ellipsis and _is_dataclass_type(targs[0]):
                for i, item in enumerate(value):
                    _check_keys(item, targs[0], f"{prefix}{key}[{i}].", source)


# ----------------------------------------------------------------------------------------------------- loading


def _read_yaml(path: str | Path, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {p} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {p} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {p} must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_topology(name_or_path: str) -> Path:
    """A topology file: a path, or a name (`v4-8`) looked up in ./tpu_configs/ then the repository's tpu_configs/."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    for directory in (Path.cwd() / "tpu_configs", TOPOLOGY_DIR):
        candidate = directory / f"{stem}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(q.stem for q in TOPOLOGY_DIR.glob("*.yaml")) if TOPOLOGY_DIR.is_dir() else []
    close = difflib.get_close_matches(stem, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else (f"; known topologies: {', '.join(known)}" if known else "")
    raise ConfigError(f"topology {name_or_path} not found{hint}")


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as a YAML scalar or flow list/mapping."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {' '.join(str(e).split())}") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _merge(base: dict, layer: dict, origin: dict, source: str, prefix: str = "") -> dict:
    """Deep-merge `layer` onto `base` (mappings merge, everything else replaces); record each leaf's source."""
    out = dict(base)
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, source, f"{path}.")
        else:
            out[key] = value
            origin[path] = source
    return out


def _check_values(cfg: Config) -> None:
    """Range checks that do not depend on the devices."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    d, o, t, c, m = cfg.data, cfg.optim, cfg.train, cfg.checkpoint, cfg.mesh
    for name in ("timestamp_probability", "prev_context_probability"):
        need(0.0 <= getattr(d, name) <= 1.0, f"data.{name} must be in [0, 1], got {getattr(d, name)}")
    for spec in d.train:
        need(spec.weight > 0, f"data.train weight of {spec.name} must be > 0, got {spec.weight}")
        if spec.language is not None:
            from dwjax.text.languages import resolve_language
            try:
                resolve_language(spec.language)
            except ConfigError as e:
                raise ConfigError(f"data.train {spec.name} language: {e}") from None
    for where, holder in (("data", d), *((f"data.train {spec.name}", spec) for spec in d.train)):
        _check_filter(where, holder, need)
    need(d.max_label_length > 0, f"data.max_label_length must be > 0, got {d.max_label_length}")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    need(d.label_bucket >= 0, f"data.label_bucket must be >= 0, got {d.label_bucket}")
    for name in ("kl_weight", "ce_weight", "mse_weight"):
        need(getattr(cfg.loss, name) >= 0, f"loss.{name} must be >= 0, got {getattr(cfg.loss, name)}")
    need(cfg.loss.temperature > 0, f"loss.temperature must be > 0, got {cfg.loss.temperature}")
    need(o.learning_rate > 0, f"optim.learning_rate must be > 0, got {o.learning_rate}")
    need(o.total_steps > 0, f"optim.total_steps must be > 0, got {o.total_steps}")
    need(0 <= o.warmup_steps <= o.total_steps,
         f"optim.warmup_steps={o.warmup_steps} must be between 0 and optim.total_steps={o.total_steps}")
    need(o.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0, got {o.max_grad_norm}")
    need(t.per_device_batch_size >= 1, f"train.per_device_batch_size must be >= 1, got {t.per_device_batch_size}")
    need(t.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1, got {t.eval_batch_size}")
    need(t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    need(t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}")
    need(c.save_every >= 1, f"checkpoint.save_every must be >= 1, got {c.save_every}")
    need(c.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {c.keep_last}")
    need(c.keep_best >= 0, f"checkpoint.keep_best must be >= 0, got {c.keep_best}")
    for axis in MESH_AXES:
        size = getattr(m, axis)
        need(size == -1 or size >= 1, f"mesh.{axis} must be -1 (fill) or >= 1, got {size}")
    need(m.dcn_data >= 1, f"mesh.dcn_data must be >= 1, got {m.dcn_data}")
    need(sum(getattr(m, a) == -1 for a in MESH_AXES) <= 1,
         "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    check_rules(m.logical_axis_rules)
    if cfg.devices is not None:
        need(cfg.devices.count >= 1, f"devices.count must be >= 1, got {cfg.devices.count}")
        need(cfg.devices.processes >= 1, f"devices.processes must be >= 1, got {cfg.devices.processes}")


def _check_filter(where: str, holder: Any, need) -> None:
    """Label-filter thresholds (of the data section or one training set) that can mean something."""
    ranges = (("wer_threshold", lambda v: v >= 0, ">= 0 (a WER in %), or null"),
              ("min_avg_logprob", lambda v: v <= 0, "<= 0 (a log-probability), or null"),
              ("max_compression_ratio", lambda v: v > 0, "> 0, or null"),
              ("max_no_speech_prob", lambda v: v >= 0, ">= 0 (a probability), or null"))
    for name, ok, text in ranges:
        v = getattr(holder, name)
        need(v is None or (v == v and ok(v)), f"{where} {name} must be {text}, got {v}")


def check_rules(rules: tuple[LogicalRule, ...]) -> None:
    """Logical names must be the model's, mesh axes must be data/fsdp/tensor, each logical name at most once."""
    seen = set()
    for logical, axes in rules:
        if logical not in LOGICAL_AXES:
            close = difflib.get_close_matches(logical, LOGICAL_AXES, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(LOGICAL_AXES)}"
            raise ConfigError(f"mesh.logical_axis_rules: unknown logical axis {logical!r}{hint}")
        if logical in seen:
            raise ConfigError(f"mesh.logical_axis_rules: logical axis {logical!r} appears twice")
        seen.add(logical)
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            if axis not in MESH_AXES:
                raise ConfigError(f"mesh.logical_axis_rules: {logical!r} maps to unknown mesh axis {axis!r}; "
                                  f"mesh axes are {', '.join(MESH_AXES)}")


def from_dict(raw: dict, origin: dict | None = None) -> Config:
    """A `Config` from a (merged) nested dict; type errors name the key and where its value came from."""
    try:
        cfg = _build(Config, raw, "")
    except _Mismatch as e:
        src = (origin or {}).get(e.path) or next(
            (s for p, s in (origin or {}).items() if e.path.startswith(p + ".") or e.path.startswith(p + "[")), None)
        where = f" (from {src})" if src else ""
        raise ConfigError(f"{e.path}{where}: {e.message}") from None
    _check_values(cfg)
    return cfg


def load_config(topology: str | None = None, config: str | None = None, overrides=()) -> Config:
    """Defaults -> topology file -> experiment file -> `key.sub=value` overrides, as a validated `Config`."""
    origin: dict[str, str] = {}
    layers = [(str(DEFAULTS_PATH), _read_yaml(DEFAULTS_PATH, "defaults"))]
    if topology:
        path = resolve_topology(topology)
        layers.append((str(path), _read_yaml(path, "topology")))
    if config:
        layers.append((str(config), _read_yaml(config, "config")))
    for text in overrides:
        layers.append((f"override {text}", parse_override(text)))
    merged: dict = {}
    for source, layer in layers:
        _check_keys(layer, Config, "", source)
        merged = _merge(merged, layer, origin, source)
    return from_dict(merged, origin)


def override(cfg: Config, *overrides: str) -> Config:
    """`cfg` with `key.sub=value` overrides applied (same parsing and checks as on the command line)."""
    origin: dict[str, str] = {}
    merged = to_dict(cfg)
    for text in overrides:
        layer = parse_override(text)
        _check_keys(layer, Config, "", f"override {text}")
        merged = _merge(merged, layer, origin, f"override {text}")
    return from_dict(merged, origin)


# ----------------------------------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> Any:
    """Plain nested dicts/lists/scalars (YAML- and JSON-ready) from a config dataclass."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1000).strip().removesuffix(
        "\n...").removesuffix("...").strip()


def to_yaml(cfg: Config, comments: bool = False) -> str:
    """The config as YAML that `load_config(config=...)` reads back to an equal `Config`.

    With `comments=True` each field is preceded by its one-line description (how base.yaml is written)."""
    if not comments:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False, width=1000)
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if lines:
            lines.append("")
        lines.append(f"# {section.metadata.get('doc', '')}")
        if value is None:
            lines.append(f"{section.name}: null")
            continue
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(value):
            lines.append(f"  # {f.metadata.get('doc', '')}")
            v = to_dict(getattr(value, f.name))
            if isinstance(v, list) and v and not all(isinstance(x, (str, int, float, bool)) for x in v):
                lines.append(f"  {f.name}:")
                lines += [f"    - {_flow(x)}" for x in v]
            else:
                lines.append(f"  {f.name}: {_flow(v)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- CLI


def add_config_args(parser) -> None:
    """Add `--topology`, `--config` and positional `key.sub=value` overrides to an argparse parser."""
    parser.add_argument("--topology", metavar="YAML",
                        help="topology file or name in tpu_configs/ (v4-8, gpu-8xh100, cpu, ...)")
    parser.add_argument("--config", metavar="YAML", help="experiment config, applied over the topology")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides applied last, e.g. train.per_device_batch_size=16 model.dtype=bfloat16")


def config_from_args(args) -> Config:
    """The `Config` named by the arguments `add_config_args` added."""
    return load_config(topology=args.topology, config=args.config, overrides=tuple(args.overrides or ()))


# ----------------------------------------------------------------------------------------------------- devices


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
    for k, v in sizes.items():
        if v != -1:
            fixed *= v
    if fill:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh {_mesh_text({k: v for k, v in sizes.items() if v != -1})} cannot fill {n_devices} devices "
                f"({n_devices} is not divisible by {fixed}): make the product of the other mesh axes divide {n_devices}")
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        fixes = []
        for axis in MESH_AXES:
            others = fixed // sizes[axis]
            if n_devices % others == 0:
                fixes.append(f"mesh.{axis}={n_devices // others}")
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
                            ("train.eval_batch_size", cfg.train.eval_batch_size)):
        total = per_device * n_devices
        if total % batch_shards:
            raise ConfigError(f"global batch {total} ({key}={per_device} x {n_devices} devices) is not divisible by "
                              f"mesh data*fsdp={batch_shards}: change {key}")
        if total % n_processes:
            raise ConfigError(f"global batch {total} ({key}={per_device} x {n_devices} devices) is not divisible by "
                              f"the {n_processes} processes: change {key}")
    return shape
