"""Typed run configuration, one schema for every command: frozen dataclasses, the only place defaults are written.

`load_config` merges, each layer over the one before: the dataclass defaults -> --topology tpu_configs/X.yaml ->
--config experiment.yaml -> a command's flags -> key.sub=value overrides (YAML values: `"data.train=[{name: x,
path: y}]"`). OmegaConf (structured configs, as in MaxText) merges and converts each value to its field's type;
unknown keys, ill-typed values and missing keys are one-line `ConfigError`s naming the key and its layer. Each
field's one-line description (`field_doc`) is a comment in `to_yaml(cfg, comments=True)`: `to_yaml(Config(), True)`
lists every key with its default. List fields hold tuples (a config is immutable). Sections: run, model, data, loss,
optim, mesh, train, eval, checkpoint, logging (`dwjax distill`), label (`dwjax pseudo-label`; its flags set it),
devices (topology files). Whether a config fits the devices present is `dwjax.mesh.validate_for_devices`.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from dwjax.data.packing import DEFAULT_PACK_S
from dwjax.errors import ConfigError
from dwjax.models.kernels import Kernels
from dwjax.text.languages import resolve_language

#: where `--topology NAME` looks, in order: the working directory, the installed wheel (setup.py ships the
#: repository's tpu_configs/ as dwjax/tpu_configs), a source checkout
_TOPOLOGY_DIRS = (Path("tpu_configs"), resources.files("dwjax") / "tpu_configs",
                  Path(__file__).resolve().parent.parent / "tpu_configs")


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
    attention: Literal["auto", "einsum", "cudnn", "xla"] = _f(
        Kernels.attention, "unmasked attention (encoder, cross-attention): einsum (query blocks), or jax.nn."
        "dot_product_attention's cudnn (fused flash) or xla kernel; auto = cudnn on NVIDIA GPUs in bfloat16, einsum "
        "elsewhere (dwjax/models/kernels.py)")
    query_chunk: int = _f(Kernels.query_chunk, "einsum attention over the encoder's positions runs in blocks of "
                          "this many queries when it divides their number; 0 = one block")
    encode_per_example: Optional[bool] = _f(Kernels.encode_per_example, "encode a batch one example at a time "
                                            "(faster on CPU, where activations stay in cache); null = on CPU only")

    @property
    def kernels(self) -> Kernels:
        """How the model computes (the `Whisper` module's `kernels`)."""
        return Kernels(self.attention, self.query_chunk, self.encode_per_example)


@dataclass(frozen=True)
class DatasetSpec:
    name: str = _f(doc="short name used in logs and metrics")
    path: str = _f(doc="pseudo-labelled manifest (JSONL/CSV/TSV/parquet) or HF dataset directory")
    weight: float = _f(1.0, "relative sampling weight among the training sets")
    wer_threshold: float | None = _f(None, "this set's data.wer_threshold; null = the data section's (.inf = off)")
    min_avg_logprob: float | None = _f(None, "this set's data.min_avg_logprob; null = the data section's (-.inf = off)")
    max_compression_ratio: float | None = _f(None, "this set's data.max_compression_ratio; null = the data section's")
    max_no_speech_prob: float | None = _f(None, "this set's data.max_no_speech_prob; null = the data section's")
    language: str | None = _f(
        None, "the language token of every row's prompt (a Whisper code such as de); null = each row's own, as the "
              "labeller recorded it (given or detected)")
    task: Literal["transcribe", "translate"] | None = _f(None, "the task token of every row's prompt; null = each "
                                                               "row's own, as the labeller recorded it")


@dataclass(frozen=True)
class EvalSetSpec:
    name: str = _f(doc="short name used in logs and metrics")
    path: str = _f(doc="manifest or dataset directory with reference transcripts")


@dataclass(frozen=True)
class DataConfig:
    # Label filters (dwjax/data/label_filter.py): a label with a reference is judged by its WER alone, one without
    # by the teacher's confidence (all three bounds, inclusive; null turns one off; Whisper's transcribe() defaults).
    train: list[DatasetSpec] = _f(
        (), "training sets: list of {name, path, weight}, each optionally with its own filter thresholds "
            "(wer_threshold, min_avg_logprob, max_compression_ratio, max_no_speech_prob)")
    eval: list[EvalSetSpec] = _f((), "evaluation sets: list of {name, path} (eval: says how often and how many)")
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
    run_on_fraction: float = _f(
        0.0, "fraction of packed windows (those with a next window of the same speaker) whose audio runs on into "
             "the next window up to 30 s, labelled up to the cut utterance's start timestamp, always with timestamps: "
             "what sequential long-form decoding meets in every full window (dwjax/data/loader.py: Run-on windows)")
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
    frozen: list[str] = _f((), "student decoder parts kept at their initial values (embed_tokens, "
                               "embed_positions, final_norm, layers); [] = train the whole decoder")


@dataclass(frozen=True)
class MeshConfig:
    data: int = _f(-1, "data-parallel size within a slice; -1 = fill the devices left by the other axes")
    fsdp: int = _f(1, "fully-sharded (parameter-sharded) data-parallel size; -1 = fill")
    tensor: int = _f(1, "tensor-parallel size over heads/mlp/vocab; -1 = fill")
    dcn_data: int = _f(1, "data-parallel size across slices/nodes (multi-slice); the mesh data axis = dcn_data * data")
    logical_axis_rules: list[list[Any]] = _f(
        (), "list of [logical name, mesh axis | [mesh axes] | null]; [] = dwjax/mesh.py's DEFAULT_LOGICAL_AXIS_RULES "
            "(batch over data and fsdp, embed over fsdp, heads, mlp and vocab over tensor)")


@dataclass(frozen=True)
class TrainConfig:
    per_device_batch_size: int = _f(8, "examples per device per microbatch; global batch = this * device count")
    grad_accum_steps: int = _f(1, "microbatches accumulated per optimizer step")
    log_every: int = _f(50, "log training metrics every this many optimizer steps")
    encoder_cache: str | None = _f(
        None, "directory caching the frozen teacher encoder's output per training row (dwjax/data/encoder_cache.py;"
              " needs a student that keeps the teacher's encoder); null = run the encoder every step")
    encoder_cache_dtype: Literal["float16", "bfloat16"] = _f("float16", "dtype the encoder cache stores")
    encoder_cache_rebuild: bool = _f(False, "rebuild an encoder cache made for another teacher or audio, not refuse it")


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(1000, "evaluate data.eval every this many optimizer steps; 0 = only at the end")
    batch_size: int = _f(8, "examples per device when evaluating (generation and the teacher-forced KL)")
    max_samples: int | None = _f(None, "cap on examples per evaluation set; null = all")


@dataclass(frozen=True)
class LabelConfig:
    data: list[str] = _f((), "manifests or datasets to label, each PATH or NAME=PATH (--data)")
    output: str | None = _f(None, "directory of the label part files (--output)")
    batch_size: int = _f(8, "examples per device per step (--batch-size)")
    timestamps: bool = _f(False, "predict timestamps; segments go in the `timestamps` column (--timestamps)")
    language: str | None = _f(None, "force a language; null = the manifest's, else detected per row (--language)")
    task: Literal["transcribe", "translate"] = _f("transcribe", "the task of rows without a manifest task (--task)")
    num_beams: int = _f(1, "beam width; 1 = greedy, sharded (--num-beams)")
    max_new_tokens: int | None = _f(None, "decoding budget; null = 224, with pack 448 (--max-new-tokens)")
    pack: bool = _f(False, "label packed windows of consecutive clips, with timestamps, one row per window (--pack)")
    pack_gap_s: float = _f(0.5, "seconds of silence between packed clips (--pack-gap)")
    pack_max_s: float = _f(DEFAULT_PACK_S, "longest packed window in seconds, at most 30: the teacher drops the "
                           "last utterances of windows filled to 30 s (dwjax/data/packing.py; --pack-max)")
    pack_short: float = _f(0.0, "fraction of windows filled only to a random length up to pack_max_s (--pack-short)")
    commit_every: int = _f(8, "global batches per part file: what an interruption can lose (--commit-every)")


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
    eval: EvalConfig = _f(EvalConfig(), "in-training evaluation on data.eval (dwjax distill)")
    label: LabelConfig = _f(LabelConfig(), "dwjax pseudo-label's options (its flags override them)")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), "checkpointing and retention")
    logging: LoggingConfig = _f(LoggingConfig(), "metric sinks")
    devices: DevicesConfig | None = _f(None, "the devices a topology file was written for (validation and plan only)")




# ----------------------------------------------------------------------------------------------------- loading


def _section_type(tp: Any) -> type | None:
    """The dataclass a field of type `tp` holds (unwrapping `X | None` and `list[X]`), else None."""
    return next((a for a in (tp, *typing.get_args(tp)) if isinstance(a, type) and dataclasses.is_dataclass(a)), None)


def _check_layer(layer: Any, cls: type, prefix: str, source: str) -> None:
    """Unknown keys of `layer` (with the nearest valid one), recursing into sections and lists of them; and bools
    given as numbers, which OmegaConf would take (async_save: 3)."""
    if not isinstance(layer, dict):
        return
    hints = typing.get_type_hints(cls)
    for key, value in layer.items():
        if key not in hints:
            names = list(hints)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = (f"did you mean {prefix}{close[0]}?" if close else
                    f"valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
            raise ConfigError(f"unknown key {prefix}{key}; {hint} (in {source})")
        if hints[key] is bool and not isinstance(value, bool):
            raise ConfigError(f"{prefix}{key} (from {source}): expected true or false, got {value!r}")
        sub = _section_type(hints[key])
        if sub is not None and isinstance(value, list):
            for i, item in enumerate(value):
                _check_layer(item, sub, f"{prefix}{key}[{i}].", source)
        elif sub is not None:
            _check_layer(value, sub, f"{prefix}{key}.", source)


def _error(e: OmegaConfBaseException, source: str | None) -> ConfigError:
    """OmegaConf's error as one line naming the key (and the layer its value came from)."""
    where = f" (from {source})" if source else ""
    message = str(e).split("\n")[0]
    if isinstance(e, MissingMandatoryValue):
        message = "is required"
    elif "is not a ListConfig" in message:
        message = "expected a list"
    return ConfigError(f"{e.full_key or 'config'}{where}: {message}")


def _frozen(value: Any) -> Any:
    """`value` with lists as tuples, all the way down (OmegaConf builds lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{f.name: _frozen(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _build(layers: list[tuple[str, dict]]) -> Config:
    """Merge (source, mapping) layers over the defaults into a checked `Config`."""
    merged = OmegaConf.structured(Config)
    for source, layer in layers:
        _check_layer(layer, Config, "", source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise _error(e, source) from None
    try:
        cfg = _frozen(OmegaConf.to_object(merged))
    except OmegaConfBaseException as e:
        raise _error(e, None) from None
    _check_values(cfg)
    return cfg


def _read_yaml(path: str | Path, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {p} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {p} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {p} must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_topology(name_or_path: str) -> Path:
    """A topology file: a path, or a name (`v4-8`) looked up in ./tpu_configs/, then the installed package's, then
    the source checkout's."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    for directory in _TOPOLOGY_DIRS:
        if (directory / f"{stem}.yaml").is_file():
            return Path(str(directory / f"{stem}.yaml"))
    known = sorted({q.name[:-5] for d in _TOPOLOGY_DIRS if d.is_dir() for q in d.iterdir() if q.name.endswith(".yaml")})
    close = difflib.get_close_matches(stem, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else (f"; known topologies: {', '.join(known)}" if known else "")
    raise ConfigError(f"topology {name_or_path} not found{hint}")


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}} (OmegaConf's dotlist: the value a YAML scalar or flow value)."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([text]))
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {' '.join(str(e).split())}") from None


def load_config(topology: str | None = None, config: str | None = None, overrides=(),
                flags: dict | None = None) -> Config:
    """Defaults -> topology file -> experiment file -> a command's `flags` (a nested mapping) -> `key.sub=value`
    overrides, as a checked `Config`."""
    path = resolve_topology(topology) if topology else None
    layers = [(str(path), _read_yaml(path, "topology"))] if path else []
    if config:
        layers.append((str(config), _read_yaml(config, "config")))
    if flags:
        layers.append(("the command's flags", flags))
    layers += [(f"override {text}", parse_override(text)) for text in overrides]
    return _build(layers)


def from_dict(raw: dict) -> Config:
    """A checked `Config` from a nested mapping (`to_dict`'s output)."""
    return _build([("a mapping", raw)])


def override(cfg: Config, *overrides: str) -> Config:
    """`cfg` with `key.sub=value` overrides applied (same parsing and checks as on the command line)."""
    return _build([("the config", to_dict(cfg))] + [(f"override {text}", parse_override(text)) for text in overrides])


# ----------------------------------------------------------------------------------------------------- checks


#: key -> (bound, strict): the value must be > bound (strict) or >= bound
_BOUNDS = {"data.max_label_length": (0, True), "data.num_workers": (0, False), "data.label_bucket": (0, False),
           "model.query_chunk": (0, False), "loss.kl_weight": (0, False), "loss.ce_weight": (0, False),
           "loss.mse_weight": (0, False), "loss.temperature": (0, True), "optim.learning_rate": (0, True),
           "optim.total_steps": (0, True), "optim.max_grad_norm": (0, False), "train.per_device_batch_size": (1, False),
           "train.grad_accum_steps": (1, False), "train.log_every": (1, False), "eval.every": (0, False),
           "eval.batch_size": (1, False), "checkpoint.save_every": (1, False), "checkpoint.keep_last": (1, False),
           "checkpoint.keep_best": (0, False), "mesh.dcn_data": (1, False), "devices.count": (1, False),
           "devices.processes": (1, False)}


def _check_values(cfg: Config) -> None:
    """Range checks that do not depend on the devices (`dwjax.mesh.validate_for_devices` does those; the label
    options' are `dwjax.pseudo_label.label_datasets`'s)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for key, (bound, strict) in _BOUNDS.items():
        section, name = key.split(".")
        if getattr(cfg, section) is not None:
            v = getattr(getattr(cfg, section), name)
            need(v > bound if strict else v >= bound, f"{key} must be {'>' if strict else '>='} {bound}, got {v}")
    d, o, m = cfg.data, cfg.optim, cfg.mesh
    for name in ("timestamp_probability", "prev_context_probability", "run_on_fraction"):
        need(0.0 <= getattr(d, name) <= 1.0, f"data.{name} must be in [0, 1], got {getattr(d, name)}")
    for spec in d.train:
        need(spec.weight > 0, f"data.train weight of {spec.name} must be > 0, got {spec.weight}")
        if spec.language is not None:
            try:
                resolve_language(spec.language)
            except ConfigError as err:
                raise ConfigError(f"data.train {spec.name} language: {err}") from None
    for where, holder in (("data", d), *((f"data.train {spec.name}", spec) for spec in d.train)):
        _check_filter(where, holder, need)
    need(0 <= o.warmup_steps <= o.total_steps,
         f"optim.warmup_steps={o.warmup_steps} must be between 0 and optim.total_steps={o.total_steps}")
    for axis in ("data", "fsdp", "tensor"):
        need(getattr(m, axis) == -1 or getattr(m, axis) >= 1,
             f"mesh.{axis} must be -1 (fill) or >= 1, got {getattr(m, axis)}")
    need(sum(getattr(m, a) == -1 for a in ("data", "fsdp", "tensor")) <= 1,
         "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


def _check_filter(where: str, holder: Any, need) -> None:
    """Label-filter thresholds (of the data section or one training set) that can mean something."""
    ranges = (("wer_threshold", lambda v: v >= 0, ">= 0 (a WER in %), or null"),
              ("min_avg_logprob", lambda v: v <= 0, "<= 0 (a log-probability), or null"),
              ("max_compression_ratio", lambda v: v > 0, "> 0, or null"),
              ("max_no_speech_prob", lambda v: v >= 0, ">= 0 (a probability), or null"))
    for name, ok, text in ranges:
        v = getattr(holder, name)
        need(v is None or (v == v and ok(v)), f"{where} {name} must be {text}, got {v}")


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

    With `comments=True` each field is preceded by its one-line description: `to_yaml(Config(), True)` is the
    documented list of every key and its default."""
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


def config_from_args(args, flags: dict | None = None) -> Config:
    """The `Config` named by the arguments `add_config_args` added; `flags`: the command's own options as a nested
    mapping (None values left out), applied over the files and under the overrides."""
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in (flags or {}).items()}
    return load_config(topology=args.topology, config=args.config, overrides=tuple(args.overrides or ()),
                       flags={s: v for s, v in flags.items() if v})
