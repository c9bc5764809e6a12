"""The distillation train and eval steps: pure functions over explicit pytrees, jitted once with shardings.

    tx, schedule = make_optimizer(cfg.optim)
    state = init_train_state(student_params, tx, rng)
    state, metrics = train_step(state, teacher_params, batch, student_model=s, teacher_model=t,
                                loss_cfg=cfg.loss, tx=tx, schedule=schedule, grad_accum=k)

or, sharded over a mesh (state created sharded, step jitted with in/out shardings and the state donated):

    steps = make_sharded_train_step(cfg, mesh, student_cfg, teacher_cfg)
    state = steps.init_state(student_params_host, jax.random.PRNGKey(cfg.run.seed))
    teacher = steps.shard_teacher(teacher_params_host)
    state, metrics = steps.train_step(state, teacher, steps.put_batch(local_batch))

The batch layout is in `dwjax/losses.py` (input_features, decoder_input_ids, labels, loss_mask); its leading
dimension is grad_accum x microbatch. Per step:
  * the frozen teacher encoder runs once per microbatch (or, when the batch carries `encoder_out`, the teacher
    encoder's output read from an on-disk cache, dwjax/data/encoder_cache.py, is cast to the compute dtype and
    used instead), its output (stop_gradient) feeds the teacher decoder and,
    when the student encoder has the teacher's shape (`shares_encoder`: `init-student` copies it, and it is
    frozen), the student decoder too; otherwise the student's own encoder runs, also frozen;
  * only the decoder trains: the optimizer state covers `params["decoder"]` alone, the encoder has none;
  * microbatches run in a `lax.scan` summing loss sums, token counts and gradients; one division at the end by the
    token count of the whole step (all devices, all microbatches: under jit the sums are global).
Per-step randomness (none today: Whisper has no dropout) would be `jax.random.fold_in(state.rng, state.step)`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dwjax import losses
from dwjax import mesh as mesh_lib
from dwjax.config import Config, LossConfig, OptimConfig
from dwjax.errors import ConfigError
from dwjax.models.configs import WhisperConfig
from dwjax.models.whisper import Whisper, abstract_params, encode_batch

BATCH_KEYS = ("input_features", "decoder_input_ids", "labels", "loss_mask")
#: the batch with a cached teacher encoder output (n_audio_ctx, d_model) per row instead of the features
CACHED_BATCH_KEYS = ("encoder_out", "decoder_input_ids", "labels", "loss_mask")
#: optional, either layout: (b, k) int32, the positions whose logits the losses need (`TrainBatches` with
#: length padding: every unmasked position of the row, then repeats of a masked one); absent = all positions
TARGET_KEY = "target_positions"


def batch_keys(batch) -> tuple[str, ...]:
    """The keys of `batch` the steps take: the feature or cached-encoder layout, plus target positions if given."""
    keys = CACHED_BATCH_KEYS if "encoder_out" in batch else BATCH_KEYS
    return keys + ((TARGET_KEY,) if TARGET_KEY in batch else ())


def targets(mb) -> tuple[jax.Array, jax.Array]:
    """(labels, loss_mask) at the batch's target positions, (b, k); the whole rows without them."""
    pos = mb.get(TARGET_KEY)
    if pos is None:
        return mb["labels"], mb["loss_mask"]
    return (jnp.take_along_axis(mb["labels"], pos, axis=1), jnp.take_along_axis(mb["loss_mask"], pos, axis=1))


_ENCODER_FIELDS = ("n_mels", "n_audio_ctx", "d_model", "encoder_layers", "encoder_heads", "ffn_dim")


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken
    params: Any              # the whole student {"encoder": frozen, "decoder": trained}, param dtype
    opt_state: Any           # optimizer state of params["decoder"] only
    rng: jax.Array           # PRNGKey; fold in the step for per-step randomness


# ----------------------------------------------------------------------------------------------------- optimizer


def make_schedule(o: OptimConfig) -> Callable[[Any], jax.Array]:
    """Learning rate at optimizer step `step` (0-based): linear warm-up 0 -> lr over `warmup_steps`, then linear
    decay to 0 at `total_steps` (`schedule: linear`) or constant."""
    lr, warm, total = float(o.learning_rate), int(o.warmup_steps), int(o.total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = lr * step / max(warm, 1)
        if o.schedule == "constant":
            after = jnp.asarray(lr, jnp.float32)
        else:
            after = lr * jnp.clip((total - step) / max(total - warm, 1), 0.0, 1.0)
        return jnp.where(step < warm, warmup, after)
    return schedule


def _decay_mask(params):
    """Weight decay on kernels and embeddings, not on biases and norm scales (boxed or plain leaves)."""
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        return name not in ("bias", "scale")
    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


DECODER_PARTS = ("embed_tokens", "embed_positions", "final_norm", "layers")


def make_optimizer(o: OptimConfig) -> tuple[optax.GradientTransformation, Callable]:
    """(AdamW with global-norm clipping, the learning-rate schedule) from `optim` config. Decoder parts named in
    `optim.frozen` get zero updates and no optimizer state (their gradients are then never computed: XLA drops
    them), and do not count in the clipping norm."""
    schedule = make_schedule(o)
    parts = [optax.clip_by_global_norm(o.max_grad_norm)] if o.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=_decay_mask))
    tx = optax.chain(*parts)
    frozen = tuple(o.frozen)
    unknown = sorted(set(frozen) - set(DECODER_PARTS))
    if unknown:
        raise ConfigError(f"optim.frozen: unknown decoder part(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(DECODER_PARTS)}")
    if frozen:
        def labels(params):
            return {k: jax.tree_util.tree_map(lambda _: "frozen" if k in frozen else "trained", v,
                                              is_leaf=lambda x: isinstance(x, nn.Partitioned))
                    for k, v in params.items()}
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def init_train_state(student_params, tx: optax.GradientTransformation, rng) -> TrainState:
    """A fresh state: step 0, the optimizer initialised on the decoder only."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=student_params, opt_state=tx.init(student_params["decoder"]),
                      rng=rng)


# ----------------------------------------------------------------------------------------------------- models


def shares_encoder(student_cfg: WhisperConfig, teacher_cfg: WhisperConfig) -> bool:
    """Whether the student encoder has the teacher's shape (then it is the teacher's, frozen, and not run)."""
    return all(getattr(student_cfg, f) == getattr(teacher_cfg, f) for f in _ENCODER_FIELDS)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def module_kwargs(model_cfg, train: bool = True) -> dict:
    """Whisper constructor options from `model` config (compute/param dtype, scan, remat (none for inference),
    kernels)."""
    return dict(dtype=_dtype(model_cfg.dtype), param_dtype=_dtype(model_cfg.param_dtype),
                scan_layers=model_cfg.scan_layers, remat=model_cfg.remat if train else "none",
                kernels=model_cfg.kernels)


def make_models(model_cfg, student_cfg: WhisperConfig, teacher_cfg: WhisperConfig) -> tuple[Whisper, Whisper]:
    """(student, teacher) modules; the teacher takes no gradient, so it is never rematerialised."""
    return Whisper(student_cfg, **module_kwargs(model_cfg)), Whisper(teacher_cfg, **module_kwargs(model_cfg, False))


# ----------------------------------------------------------------------------------------------------- steps


def _teacher_forward(teacher_model, teacher_params, mb, need_hidden):
    variables = {"params": teacher_params}
    if "encoder_out" in mb:
        enc = jax.lax.stop_gradient(mb["encoder_out"].astype(teacher_model.dtype))
    else:
        enc = jax.lax.stop_gradient(encode_batch(teacher_model, teacher_params, mb["input_features"]))
    logits, _, hidden = teacher_model.apply(variables, mb["decoder_input_ids"], enc, None, True,
                                            mb.get(TARGET_KEY), method="decode")
    return enc, jax.lax.stop_gradient(logits), (jax.lax.stop_gradient(hidden) if need_hidden else None)


def _student_encoder_out(student_model, teacher_model, student_params, teacher_enc, features):
    if shares_encoder(student_model.cfg, teacher_model.cfg):
        return teacher_enc
    if features is None:
        raise ConfigError("a cached teacher encoder output cannot feed a student whose encoder differs from the "
                          "teacher's: train without train.encoder_cache")
    enc = student_model.apply({"params": student_params}, features, method="encode")
    return jax.lax.stop_gradient(enc)


def _microbatches(batch, k: int):
    """(k * m, ...) -> (k, m, ...), microbatch i = rows i, k + i, 2k + i, ... so that each microbatch is spread
    evenly over the devices holding the batch (a contiguous split would put one microbatch on few devices)."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum={k}")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(split, batch)


def train_step(state: TrainState, teacher_params, batch: dict, *, student_model: Whisper, teacher_model: Whisper,
               loss_cfg: LossConfig, tx: optax.GradientTransformation, schedule: Callable | None = None,
               grad_accum: int = 1, frozen: tuple[str, ...] = ()) -> tuple[TrainState, dict]:
    """One optimizer step over `grad_accum` microbatches of `batch`; returns (new state, metrics).

    `frozen`: decoder parts (optim.frozen) whose gradients are replaced by zeros (so never computed) and whose
    updates are zero (make_optimizer). metrics: loss, kl (per token, at the training temperature, without T²), ce,
    mse, grad_norm (of the trained parts, before clipping), lr (of this step), n_tokens (of the whole step)."""
    use_mse = bool(loss_cfg.mse_weight)
    dec_params = state.params["decoder"]
    batch = {k: batch[k] for k in batch_keys(batch)}

    def loss_fn(dec, enc_out, mb, t_logits, t_hidden):
        logits, _, hidden = student_model.apply({"params": {"decoder": dec}}, mb["decoder_input_ids"], enc_out,
                                                None, True, mb.get(TARGET_KEY), method="decode")
        terms = losses.distill_loss_terms(t_logits, logits, *targets(mb), loss_cfg.temperature,
                                          t_hidden, hidden if use_mse else None)
        return losses.weighted_sum(terms, loss_cfg), terms

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def micro(mb):
        t_enc, t_logits, t_hidden = _teacher_forward(teacher_model, teacher_params, mb, use_mse)
        enc_out = _student_encoder_out(student_model, teacher_model, state.params, t_enc, mb.get("input_features"))
        return grad_fn(dec_params, enc_out, mb, t_logits, t_hidden)

    if grad_accum == 1:
        grads, terms = micro(batch)
    else:
        def body(carry, mb):
            return jax.tree_util.tree_map(jnp.add, carry, micro(mb)), None
        zero_terms = {k: jnp.zeros((), jnp.float32) for k in ("kl_sum", "ce_sum", "mse_sum", "n_tokens")}
        init = (jax.tree_util.tree_map(jnp.zeros_like, dec_params), zero_terms)
        (grads, terms), _ = jax.lax.scan(body, init, _microbatches(batch, grad_accum))

    n = jnp.maximum(terms["n_tokens"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: (g / n).astype(g.dtype), grads)
    grads = {key: jax.tree_util.tree_map(jnp.zeros_like, g) if key in frozen else g for key, g in grads.items()}
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, dec_params)
    new_dec = optax.apply_updates(dec_params, updates)
    new_state = state.replace(step=state.step + 1, params=dict(state.params, decoder=new_dec), opt_state=opt_state)
    metrics = {"loss": losses.weighted_sum(terms, loss_cfg) / n, "kl": terms["kl_sum"] / n, "ce": terms["ce_sum"] / n,
               "mse": terms["mse_sum"] / n, "grad_norm": grad_norm, "n_tokens": terms["n_tokens"],
               "lr": schedule(state.step) if schedule is not None else jnp.asarray(jnp.nan, jnp.float32)}
    return new_state, metrics


def eval_step(student_params, teacher_params, batch: dict, *, student_model: Whisper,
              teacher_model: Whisper) -> dict:
    """Teacher-forced evaluation sums: {"kl_sum" (KL at T = 1), "ce_sum", "n_tokens"}; divide after summing over
    the evaluation set."""
    t_enc, t_logits, _ = _teacher_forward(teacher_model, teacher_params, batch, False)
    enc_out = _student_encoder_out(student_model, teacher_model, student_params, t_enc, batch.get("input_features"))
    logits, _ = student_model.apply({"params": {"decoder": student_params["decoder"]}}, batch["decoder_input_ids"],
                                    enc_out, None, False, batch.get(TARGET_KEY), method="decode")
    terms = losses.distill_loss_terms(t_logits, logits, *targets(batch), 1.0)
    return {k: terms[k] for k in ("kl_sum", "ce_sum", "n_tokens")}


# ----------------------------------------------------------------------------------------------------- sharded


def _put(host_tree, shardings):
    """Host arrays -> global arrays with `shardings`; each process fills only its own shards (multi-host safe)."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree_util.tree_map(one, host_tree, shardings)


@dataclasses.dataclass
class ShardedSteps:
    """What `make_sharded_train_step` builds: models, optimizer, shardings and the jitted functions."""
    mesh: Any
    rules: tuple
    student_model: Whisper
    teacher_model: Whisper
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: Any
    teacher_shardings: Any
    batch_sharding: Any
    grad_accum: int
    _abstract_state: Any
    _init: Callable
    _train: Callable
    _eval: Callable
    _encode: Callable = None

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs of the state with their shardings (checkpoint restore targets); allocates nothing."""
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      self._abstract_state, self.state_shardings)

    def init_state(self, student_params, rng) -> TrainState:
        """The sharded train state from host student parameters (cast to the param dtype on device)."""
        params = _put(student_params, self.state_shardings.params)
        return self._init(params, jnp.asarray(rng))

    def shard_teacher(self, teacher_params):
        dtype = self.teacher_model.param_dtype
        return _put(jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), teacher_params), self.teacher_shardings)

    def put_batch(self, local_batch: dict) -> dict:
        """This process's rows of the batch -> global arrays split over data x fsdp (`encoder_out` instead of
        `input_features` when the batch has it)."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local_batch[k]))
                for k in batch_keys(local_batch)}

    def train_step(self, state, teacher_params, batch):
        """One step; a batch with `encoder_out` (a cached teacher encoder output) runs no encoder."""
        return self._train(state, teacher_params, {k: batch[k] for k in batch_keys(batch)})

    def encode(self, teacher_params, features, dtype):
        """The teacher encoder's output of global `features`, cast to `dtype` (for the encoder cache), sharded
        like the batch."""
        return self._encode(teacher_params, features, dtype)

    def eval_step(self, student_params, teacher_params, batch):
        return self._eval(student_params, teacher_params, batch)


def _logical_specs(tree):
    return nn.get_partition_spec(tree)


#: what a logical axis is, in the words of an error message
_AXIS_WORDS = {"heads": "attention heads", "mlp": "MLP width ffn_dim", "vocab": "vocabulary size",
               "embed": "d_model", "layers": "layers", "head_dim": "head dimension"}


def check_shardable(models: dict, mesh, rules) -> None:
    """Every parameter dimension of `models` ({"teacher": boxed abstract params, ...}) must divide evenly over the
    mesh axes its logical name maps to; otherwise one ConfigError naming the dimensions, their sizes, the mesh axis
    and the sizes that would fit (instead of JAX's IndivisibleError from inside the first device_put)."""
    sizes = dict(mesh.shape)
    bad: dict[str, dict[tuple[str, int], set[str]]] = {}     # mesh axes text -> {(logical, dim): {model}}
    dims_on: dict[str, list[int]] = {}                       # mesh axes text -> every dim sharded over it
    for who, tree in models.items():
        leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            if not isinstance(leaf, nn.Partitioned):
                continue
            spec = nn.logical_to_mesh_axes(leaf.names, rules)
            for logical, axes, dim in zip(leaf.names, tuple(spec) + (None,) * len(leaf.names), leaf.value.shape):
                if axes is None:
                    continue
                axes = (axes,) if isinstance(axes, str) else tuple(axes)
                n = math.prod(sizes[a] for a in axes)
                if n == 1:
                    continue
                key = "*".join(axes)
                dims_on.setdefault(key, []).append(int(dim))
                if dim % n:
                    bad.setdefault(key, {}).setdefault((str(logical), int(dim)), set()).add(who)
    if not bad:
        return
    parts = []
    for key, found in bad.items():
        n = math.prod(sizes[a] for a in key.split("*"))
        what = ", ".join(f"the {_AXIS_WORDS.get(lg, lg)} ({dim}, {' and '.join(sorted(w))})"
                         for (lg, dim), w in sorted(found.items()))
        g = math.gcd(*dims_on[key])
        fits = [d for d in range(1, g + 1) if g % d == 0 and mesh.devices.size % d == 0][:8]
        knob = f"mesh.{key}" if "*" not in key else f"the mesh axes {key}"
        parts.append(f"{knob}={n} does not divide {what}: choose {knob} from {', '.join(map(str, fits))} "
                     f"(or change mesh.logical_axis_rules)")
    raise ConfigError("the model does not fit the mesh: " + "; ".join(parts))


def make_sharded_train_step(cfg: Config, mesh, student_cfg: WhisperConfig, teacher_cfg: WhisperConfig,
                            grad_accum: int | None = None, compiler_options: dict | None = None) -> ShardedSteps:
    """Models, optimizer, state/teacher/batch shardings and the jitted train/eval steps for `mesh`.

    State shardings come from `jax.eval_shape` of the state init on the boxed abstract parameters (logical axis
    names) -> `nn.get_partition_spec` -> `dwjax.mesh.logical_to_sharding` with the config's rules.
    `compiler_options` go to every `jax.jit` (XLA options, e.g. {"xla_backend_optimization_level": 0} in tests).

    The steps are traced inside `nn.logical_axis_rules(rules)` but without a global mesh (`jax.set_mesh`): with one
    set, flax's DenseGeneral checks parameter shapes by running its kernel init, which applies the 3-name logical
    constraint of the attention kernels to the flattened 2-D kernel and fails. So the activations' logical
    constraints in the model are no-ops and GSPMD propagates from the in/out shardings stated here."""
    rules = mesh_lib.logical_rules(cfg)
    student_model, teacher_model = make_models(cfg.model, student_cfg, teacher_cfg)
    tx, schedule = make_optimizer(cfg.optim)
    k = cfg.train.grad_accum_steps if grad_accum is None else grad_accum
    param_dtype = student_model.param_dtype

    def init(params, rng):
        params = jax.tree_util.tree_map(lambda x: x.astype(param_dtype), params)
        return init_train_state(params, tx, rng)

    boxed = abstract_params(student_cfg, **module_kwargs(cfg.model))
    teacher_boxed = abstract_params(teacher_cfg, **module_kwargs(cfg.model, train=False))
    check_shardable({"teacher": teacher_boxed, "student": boxed}, mesh, rules)
    abstract_state = jax.eval_shape(init, boxed, jax.ShapeDtypeStruct((2,), jnp.uint32))
    state_shardings = mesh_lib.logical_to_sharding(_logical_specs(abstract_state), mesh, rules)
    teacher_shardings = mesh_lib.logical_to_sharding(_logical_specs(teacher_boxed), mesh, rules)
    batch_sharding = mesh_lib.data_sharding(mesh)
    repl = mesh_lib.replicated(mesh)

    def with_rules(fn):
        @functools.wraps(fn)
        def wrapped(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)
        return wrapped

    step_fn = functools.partial(train_step, student_model=student_model, teacher_model=teacher_model,
                                loss_cfg=cfg.loss, tx=tx, schedule=schedule, grad_accum=k,
                                frozen=tuple(cfg.optim.frozen))
    jit = functools.partial(jax.jit, compiler_options=compiler_options)
    jit_init = jit(init, in_shardings=(state_shardings.params, repl), out_shardings=state_shardings,
                   donate_argnums=(0,))
    # one sharding for every batch array: the step takes either layout, with or without target positions
    jit_train = jit(with_rules(step_fn), in_shardings=(state_shardings, teacher_shardings, batch_sharding),
                    out_shardings=(state_shardings, repl), donate_argnums=(0,))

    @functools.partial(jax.jit, static_argnums=(2,), compiler_options=compiler_options)
    def jit_encode(teacher_params, features, dtype):
        with nn.logical_axis_rules(rules):
            enc = encode_batch(teacher_model, teacher_params, features)
        return jax.lax.with_sharding_constraint(enc.astype(dtype), batch_sharding)
    eval_fn = functools.partial(eval_step, student_model=student_model, teacher_model=teacher_model)
    jit_eval = jit(with_rules(eval_fn), in_shardings=(state_shardings.params, teacher_shardings, batch_sharding),
                       out_shardings=repl)
    return ShardedSteps(mesh, rules, student_model, teacher_model, tx, schedule, state_shardings, teacher_shardings,
                        batch_sharding, k, nn.unbox(abstract_state), jit_init, jit_train, jit_eval, jit_encode)
