"""Train/eval steps: accumulation == full batch, sharded (2 data x 4 fsdp) == one device, scan == unrolled,
frozen encoder without optimizer state, schedule, eval sums. Tiny random configs; 8 fake CPU devices (conftest)."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from dwjax import losses
from dwjax import mesh as mesh_lib
from dwjax import train_step as ts
from dwjax.config import Config, LossConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from dwjax.models.configs import WhisperConfig
from dwjax.models.student import make_student
from dwjax.models.whisper import Whisper, abstract_params, count_params

TEACHER = WhisperConfig(n_mels=16, n_audio_ctx=16, n_text_ctx=32, d_model=64, encoder_layers=2, decoder_layers=4,
                        encoder_heads=2, decoder_heads=2, ffn_dim=128, vocab_size=512)
OPTIM = OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant", max_grad_norm=1.0, weight_decay=0.01)
LOSS = LossConfig(kl_weight=1.0, ce_weight=0.8, temperature=2.0)
#: tiny graphs compile twice as fast without LLVM optimisation (the numbers are the same to float32 rounding)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    def one(path, x):
        scale = str(getattr(path[-1], "key", "")) == "scale"
        return (scale + rng.normal(0, 0.05, x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, nn.unbox(abstract_params(cfg)))


def make_batch(b=16, t=12, seed=0):
    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, TEACHER.vocab_size, (b, t + 1))
    batch = losses.make_decoder_batch(seqs, rng.integers(1, 4, b), rng.integers(6, t + 2, b))
    batch["input_features"] = rng.normal(size=(b, TEACHER.n_mels, 2 * TEACHER.n_audio_ctx)).astype(np.float32)
    return batch


@pytest.fixture(scope="module")
def setup():
    teacher = random_params(TEACHER, 1)
    student_cfg, student = make_student(TEACHER, teacher, decoder_layers=2)
    return teacher, student_cfg, student, make_batch()


@functools.lru_cache(maxsize=None)
def _jitted_step(student_cfg, grad_accum, scan_layers, dtype, remat):
    """One compiled step per distinct setting, shared by the tests."""
    model_cfg = ModelConfig(scan_layers=scan_layers, dtype=dtype, remat=remat)
    s_model, t_model = ts.make_models(model_cfg, student_cfg, TEACHER)
    tx, schedule = ts.make_optimizer(OPTIM)
    step = jax.jit(functools.partial(ts.train_step, student_model=s_model, teacher_model=t_model, loss_cfg=LOSS,
                                     tx=tx, schedule=schedule, grad_accum=grad_accum), compiler_options=FAST_COMPILE)
    return step, tx


def one_step(teacher, student_cfg, student, batch, grad_accum=1, scan_layers=True, dtype="float32", remat="none"):
    step, tx = _jitted_step(student_cfg, grad_accum, scan_layers, dtype, remat)
    return step(ts.init_train_state(student, tx, jax.random.PRNGKey(0)), teacher, batch)


def assert_trees_close(a, b, rtol, leaf_rtol=None):
    """Relative difference of the whole tree (as one vector) <= rtol, and of each leaf <= leaf_rtol (10 x rtol).

    One Adam step moves each weight by about lr * sign(g): a gradient element near zero whose sign differs in the
    last bits moves its weight by up to 2 lr, so single small leaves (e.g. query biases) can differ more."""
    leaf_rtol = 10 * rtol if leaf_rtol is None else leaf_rtol
    num = den = 0.0
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        num, den = num + np.sum((x - y) ** 2), den + np.sum(x ** 2)
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)
        assert rel <= leaf_rtol, f"{jax.tree_util.keystr(path)}: relative difference {rel:.2e} > {leaf_rtol}"
    assert np.sqrt(num / max(den, 1e-24)) <= rtol, f"relative difference {np.sqrt(num / den):.2e} > {rtol}"


def test_schedule_warmup_then_linear_decay():
    sched = ts.make_schedule(OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110, schedule="linear"))
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 60, 110, 200)],
                               [0, 5e-4, 1e-3, 5e-4, 0, 0], atol=1e-9)
    const = ts.make_schedule(OptimConfig(learning_rate=1e-3, warmup_steps=4, schedule="constant"))
    np.testing.assert_allclose([float(const(s)) for s in (0, 2, 4, 10_000)], [0, 5e-4, 1e-3, 1e-3], atol=1e-9)


def test_grad_accumulation_equals_full_batch(setup):
    teacher, student_cfg, student, batch = setup
    full_state, full = one_step(teacher, student_cfg, student, batch, grad_accum=1)
    acc_state, acc = one_step(teacher, student_cfg, student, batch, grad_accum=4)
    assert float(full["n_tokens"]) == float(acc["n_tokens"]) == batch["loss_mask"].sum()
    # fp32 sums over 4 microbatches in another order: about 1e-7 per term, measured up to 1.8e-6 on the loss
    for k in ("loss", "kl", "ce", "grad_norm"):
        np.testing.assert_allclose(float(acc[k]), float(full[k]), rtol=1e-5)
    assert_trees_close(full_state.params, acc_state.params, 1e-6)
    assert_trees_close(full_state.opt_state, acc_state.opt_state, 1e-5)
    # the loss is the token-weighted total, not a mean of per-microbatch means
    assert float(full["loss"]) == pytest.approx(LOSS.kl_weight * 4 * float(full["kl"]) + LOSS.ce_weight * float(full["ce"]),
                                                rel=1e-6)


def test_encoder_frozen_without_optimizer_state(setup):
    teacher, student_cfg, student, batch = setup
    state, metrics = one_step(teacher, student_cfg, student, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["lr"]) == pytest.approx(1e-3)
    assert int(state.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(state.params["encoder"]), jax.tree_util.tree_leaves(student["encoder"])):
        np.testing.assert_array_equal(np.asarray(a), b)
    changed = [not np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree_util.tree_leaves(state.params["decoder"]), jax.tree_util.tree_leaves(student["decoder"]))]
    assert sum(changed) > len(changed) // 2
    # Adam's mu and nu cover the decoder only
    moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * count_params(student["decoder"])

def test_frozen_decoder_parts_stay_and_the_rest_steps_as_without(setup):
    """optim.frozen=[embed_tokens, embed_positions]: those stay bit-equal to the initial student and hold no Adam
    state; the trained parts take the step an optimizer over those parts alone takes (plain optax.adamw + clipping
    on the same gradients, the reference), and an unknown part name is a ConfigError."""
    import dataclasses

    import optax

    from dwjax.errors import ConfigError
    teacher, student_cfg, student, batch = setup
    frozen = ("embed_tokens", "embed_positions")
    o = dataclasses.replace(OPTIM, frozen=frozen)
    s_model, t_model = ts.make_models(ModelConfig(), student_cfg, TEACHER)
    tx, schedule = ts.make_optimizer(o)
    step = jax.jit(functools.partial(ts.train_step, student_model=s_model, teacher_model=t_model, loss_cfg=LOSS,
                                     tx=tx, schedule=schedule, frozen=frozen), compiler_options=FAST_COMPILE)
    state, metrics = step(ts.init_train_state(student, tx, jax.random.PRNGKey(0)), teacher, batch)
    for part in frozen:
        for a, b in zip(jax.tree_util.tree_leaves(state.params["decoder"][part]),
                        jax.tree_util.tree_leaves(student["decoder"][part])):
            np.testing.assert_array_equal(np.asarray(a), b)
    moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
    trained = {k: v for k, v in student["decoder"].items() if k not in frozen}
    assert moments == 2 * count_params(trained)
    # the reference: gradients of the same loss (the full-decoder step computes them), Adam on the trained parts
    _, full_metrics = one_step(teacher, student_cfg, student, batch)
    assert float(metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-6)

    ref_tx = optax.chain(optax.clip_by_global_norm(OPTIM.max_grad_norm),
                         optax.adamw(schedule, b1=OPTIM.b1, b2=OPTIM.b2, eps=OPTIM.eps,
                                     weight_decay=OPTIM.weight_decay, mask=ts._decay_mask))
    # the gradients of the trained parts, taken directly
    import jax.numpy as jnp
    from dwjax import losses

    def loss_fn(dec):
        full = dict(student["decoder"], **dec)
        t_enc, t_logits, _ = ts._teacher_forward(t_model, teacher, batch, False)
        enc = ts._student_encoder_out(s_model, t_model, student, t_enc, batch.get("input_features"))
        logits, _, _ = s_model.apply({"params": {"decoder": full}}, batch["decoder_input_ids"], enc, None, True,
                                     method="decode")
        terms = losses.distill_loss_terms(t_logits, logits, batch["labels"], batch["loss_mask"], LOSS.temperature)
        return losses.weighted_sum(terms, LOSS) / jnp.maximum(terms["n_tokens"], 1.0)
    grads = jax.grad(loss_fn)(trained)
    updates, _ = ref_tx.update(grads, ref_tx.init(trained), trained)
    expect = optax.apply_updates(trained, updates)
    assert_trees_close({k: state.params["decoder"][k] for k in trained}, expect, 1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    with pytest.raises(ConfigError, match="optim.frozen"):
        ts.make_optimizer(dataclasses.replace(OPTIM, frozen=("embeddings",)))


def test_frozen_embedding_is_never_differentiated_as_flops_says(setup):
    """XLA's own FLOP count of the compiled step (cost_analysis) drops by the embedding's weight gradient when
    optim.frozen holds embed_tokens, 2 x tokens x d_model x vocab (the gradient is replaced by zeros, so it is dead
    code), which is what dwjax.flops.train_step_flops subtracts."""
    import dataclasses

    from dwjax.flops import train_step_flops
    teacher, student_cfg, student, batch = setup

    def compiled_flops(frozen):
        s_model, t_model = ts.make_models(ModelConfig(), student_cfg, TEACHER)
        tx, schedule = ts.make_optimizer(dataclasses.replace(OPTIM, frozen=frozen))
        step = jax.jit(functools.partial(ts.train_step, student_model=s_model, teacher_model=t_model, loss_cfg=LOSS,
                                         tx=tx, schedule=schedule, frozen=frozen))
        state = ts.init_train_state(student, tx, jax.random.PRNGKey(0))
        cost = step.lower(state, teacher, batch).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    b, t = batch["labels"].shape
    expect = 2 * b * t * student_cfg.d_model * student_cfg.vocab_size
    dropped = compiled_flops(()) - compiled_flops(("embed_tokens",))
    # the matmul, plus the element-wise work on the 512 x 64 embedding that also goes (Adam, clipping norm, the
    # lookup's gradient: measured 13.32 M against the matmul's 12.58 M, 22 FLOPs per parameter; bound 32)
    elementwise = 32 * student_cfg.vocab_size * student_cfg.d_model
    assert expect <= dropped <= expect + elementwise, (dropped, expect)
    formula = (train_step_flops(TEACHER, student_cfg, b, t)[1]
               - train_step_flops(TEACHER, student_cfg, b, t, frozen=("embed_tokens",))[1])
    assert formula == pytest.approx(expect, rel=1e-9)


def test_scan_equals_unrolled(setup):
    """scan_layers=True and the unrolled stack (here also rematerialised) give the same step."""
    teacher, student_cfg, student, batch = setup
    scanned, m1 = one_step(teacher, student_cfg, student, batch, scan_layers=True)
    unrolled, m2 = one_step(teacher, student_cfg, student, batch, scan_layers=False, remat="full")
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    assert_trees_close(scanned.params, unrolled.params, 1e-6)


@functools.lru_cache(maxsize=None)
def _jitted_eval(student_cfg):
    s_model, t_model = ts.make_models(ModelConfig(), student_cfg, TEACHER)
    return jax.jit(functools.partial(ts.eval_step, student_model=s_model, teacher_model=t_model),
                   compiler_options=FAST_COMPILE)


def test_sharded_2x4_with_accumulation_matches_one_device(setup):
    """2 data x 4 fsdp over 8 fake devices, 2 microbatches == one device, one full batch (within 1e-5)."""
    teacher, student_cfg, student, batch = setup
    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 fake CPU devices"
    cfg = Config(optim=OPTIM, loss=LOSS, mesh=MeshConfig(data=2, fsdp=4), train=TrainConfig(grad_accum_steps=2))
    mesh = mesh_lib.make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    steps = ts.make_sharded_train_step(cfg, mesh, student_cfg, TEACHER, compiler_options=FAST_COMPILE)
    state8 = steps.init_state(student, jax.random.PRNGKey(0))
    abstract = steps.abstract_state()
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(state8)
    assert all(a.shape == b.shape and a.sharding == b.sharding for a, b in
               zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state8)))
    teacher8 = steps.shard_teacher(teacher)
    batch8 = steps.put_batch(batch)
    assert batch8["labels"].sharding.shard_shape(batch8["labels"].shape) == (2, 12)
    state8, m8 = steps.train_step(state8, teacher8, batch8)
    ev8 = steps.eval_step(state8.params, teacher8, batch8)

    # parameters and Adam moments are split over fsdp along `embed`
    emb = state8.params["decoder"]["embed_tokens"]["embedding"]
    assert emb.sharding.shard_shape(emb.shape) == (512, 16)
    mu = state8.opt_state[1][0].mu["embed_tokens"]["embedding"]
    assert mu.sharding.shard_shape(mu.shape) == (512, 16)

    state1, m1 = one_step(teacher, student_cfg, student, batch, grad_accum=1)
    for k in ("loss", "kl", "ce", "grad_norm", "n_tokens", "lr"):
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5)
    assert int(state8.step) == 1
    assert_trees_close(jax.device_get(state1.params), jax.device_get(state8.params), 1e-5)
    ev1 = _jitted_eval(student_cfg)(state1.params, teacher, batch)
    for k in ev1:
        np.testing.assert_allclose(float(ev8[k]), float(ev1[k]), rtol=1e-5)


def test_eval_step_sums(setup):
    teacher, student_cfg, student, batch = setup
    ev = _jitted_eval(student_cfg)(student, teacher, batch)
    assert float(ev["n_tokens"]) == batch["loss_mask"].sum()
    # the train step's metrics are computed with the parameters before its update: the same CE
    _, m = one_step(teacher, student_cfg, student, batch)
    np.testing.assert_allclose(float(ev["ce_sum"]) / float(ev["n_tokens"]), float(m["ce"]), rtol=1e-5)
    assert float(ev["kl_sum"]) > 0
    # a student that is the whole teacher: zero KL, and the teacher's own CE
    full_cfg, full = make_student(TEACHER, teacher, decoder_layers=4)
    ev_full = _jitted_eval(full_cfg)(full, teacher, batch)
    assert abs(float(ev_full["kl_sum"])) < 1e-4
    # a student with its own smaller encoder (not the teacher's): its encoder runs instead
    cfg1, student1 = make_student(TEACHER, teacher, decoder_layers=2, encoder_layers=1)
    assert not ts.shares_encoder(cfg1, TEACHER) and ts.shares_encoder(student_cfg, TEACHER)
    ev1 = _jitted_eval(cfg1)(student1, teacher, batch)
    assert np.isfinite(float(ev1["kl_sum"])) and float(ev1["kl_sum"]) != pytest.approx(float(ev["kl_sum"]))
    t_logits = jax.jit(Whisper(TEACHER).apply, compiler_options=FAST_COMPILE)({"params": teacher}, batch["input_features"], batch["decoder_input_ids"])
    np.testing.assert_allclose(float(ev_full["ce_sum"]),
                               float(losses.ce_sum(t_logits, batch["labels"], batch["loss_mask"])), rtol=1e-5)
