"""Checkpoints: bitwise save/restore, resharding 8 -> 2 devices, retention, integrity, preemption, kill -9.

Run: python -m pytest tests/test_checkpoint.py -q   (8 fake CPU devices from conftest.py)
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dwjax import checkpoint as ck
from dwjax.cli import checkpoint_info
from dwjax.config import CheckpointConfig, Config, RunConfig, ModelConfig
from dwjax.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent


def small_state(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"dense": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jax.random.normal(k2, (8,))},
              "embed": jnp.arange(32, dtype=jnp.float32).reshape(8, 4)}
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero mu/nu, count=1
    return {"params": params, "opt_state": opt_state, "step": jnp.array(7, jnp.int32),
            "rng": jax.random.key(seed + 1)}


def assert_bitwise(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def abstract(tree, sharding_fn=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=sharding_fn(x) if sharding_fn else None), tree)


CFG = CheckpointConfig(save_every=1, keep_last=2, keep_best=1, async_save=True)


def test_save_restore_bitwise(tmp_path):
    state = small_state()
    with ck.Checkpointer(tmp_path / "ckpt", CFG) as c:
        assert c.save(5, state, data_position={"step": 5, "seed": 3}, metrics={"wer": 12.5, "loss": jnp.float32(2)})
        c.wait_until_finished()
        assert c.latest_step() == 5
        restored, pos, meta = c.restore(abstract_state=abstract(state))
    assert_bitwise(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert pos == {"step": 5, "seed": 3}
    assert meta["step"] == 5 and meta["metrics"] == {"wer": 12.5, "loss": 2.0}
    assert meta["topology"]["device_count"] == 8 and meta["topology"]["process_count"] == 1
    assert meta["config"]["checkpoint"]["keep_last"] == 2 and meta["dwjax_version"]
    assert (tmp_path / "ckpt" / "5" / ck.MANIFEST_NAME).is_file()


def test_save_interval_and_force(tmp_path):
    cfg = CheckpointConfig(save_every=10, keep_last=5, keep_best=0)
    state = small_state()
    with ck.Checkpointer(tmp_path, cfg, run_config=Config()) as c:
        saved = [s for s in range(1, 25) if c.save(s, state, {"step": s})]
        assert c.save(25, state, {"step": 25}, force=True)
        assert not c.save(25, state, {"step": 25}, force=True)  # already there
        c.wait_until_finished()
        assert saved == [10, 20] and c.all_steps() == [10, 20, 25]
        _, _, meta = c.restore(abstract_state=abstract(state))
        assert meta["config"]["run"]["name"] == "default"


def test_reshard_8_to_2_devices(tmp_path):
    mesh8 = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    state = small_state()

    def spec(x):
        return P("fsdp", "tensor") if x.ndim == 2 else P()
    state8 = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh8, spec(x))), state)
    assert state8["params"]["dense"]["kernel"].sharding.mesh.size == 8
    with ck.Checkpointer(tmp_path, CFG) as c:
        c.save(1, state8, {"step": 1})
        c.wait_until_finished()
    mesh2 = Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    with ck.Checkpointer(tmp_path, CFG, read_only=True) as c:
        target = abstract(state, lambda x: NamedSharding(mesh2, P("fsdp") if x.ndim == 2 else P()))
        restored, _, meta = c.restore(abstract_state=target)
    kernel = restored["params"]["dense"]["kernel"]
    assert kernel.sharding.mesh.devices.size == 2 and kernel.sharding.spec == P("fsdp")
    assert {d.id for d in kernel.devices()} == {d.id for d in jax.devices()[:2]}
    assert_bitwise(restored, state)
    assert meta["topology"]["mesh"] == {"fsdp": 4, "tensor": 2}
    # shardings given separately (one Mesh = replicated on it) also work
    with ck.Checkpointer(tmp_path, CFG, read_only=True) as c:
        restored, _, _ = c.restore(1, abstract_state=abstract(state), shardings=mesh2)
    assert_bitwise(restored, state)


def test_retention_last_k_plus_best_k(tmp_path):
    cfg = CheckpointConfig(save_every=1, keep_last=2, keep_best=2)
    state = small_state()
    wers = {1: 30.0, 2: 10.0, 3: 25.0, 4: 12.0, 5: 40.0, 6: None, 7: 50.0}
    with ck.Checkpointer(tmp_path, cfg) as c:
        for step, wer in wers.items():
            c.save(step, state, {"step": step}, metrics=None if wer is None else {"wer": wer, "loss": 1.0})
        c.wait_until_finished()
        assert c.best_step() == 2
    # last 2 (6, 7) + best 2 by WER (2, 4)
    assert ck.Checkpointer(tmp_path, cfg, read_only=True).all_steps() == [2, 4, 6, 7]
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 4, 6, 7]


def _truncate_largest_state_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "ocdbt.process" in str(p)]
    victim = max(files, key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return victim


def test_truncated_file_is_detected_and_previous_used(tmp_path):
    states = {s: small_state(seed=s) for s in (1, 2)}
    with ck.Checkpointer(tmp_path, CFG) as c:
        for s, st in states.items():
            c.save(s, st, {"step": s})
        c.wait_until_finished()
    victim = _truncate_largest_state_file(tmp_path / "2")
    c = ck.Checkpointer(tmp_path, CFG, read_only=True)
    with pytest.raises(ck.CheckpointCorruptError) as info:
        c.restore(2, abstract_state=abstract(states[2]))
    assert str(victim) in str(info.value) and "truncated" in str(info.value)
    assert isinstance(info.value, CheckpointError)
    with pytest.warns(RuntimeWarning, match="falling back"):
        restored, pos, meta = c.restore_latest_valid(abstract_state=abstract(states[2]))
    assert pos == {"step": 1} and meta["step"] == 1
    assert_bitwise(restored, states[1])
    # a flipped byte (same size) is caught by the CRC
    with pytest.raises(ck.CheckpointCorruptError, match="CRC"):
        other = next(p for p in (tmp_path / "1" / "state").rglob("*") if p.is_file() and "ocdbt.process" in str(p))
        raw = bytearray(other.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        other.write_bytes(bytes(raw))
        c.restore(1, abstract_state=abstract(states[1]))


def test_shape_mismatch_is_a_clear_error(tmp_path):
    state = small_state()
    with ck.Checkpointer(tmp_path, CFG) as c:
        c.save(1, state, {"step": 1})
        c.wait_until_finished()
        wrong = abstract(state)
        wrong["params"]["embed"] = jax.ShapeDtypeStruct((9, 4), jnp.float32)
        with pytest.raises(CheckpointError, match="params/embed has shape"):
            c.restore(abstract_state=wrong)
        with pytest.raises(CheckpointError, match="no complete checkpoint for step 3"):
            c.restore(3)


def test_uncommitted_tmp_checkpoint_is_ignored(tmp_path):
    state = small_state()
    with ck.Checkpointer(tmp_path, CFG) as c:
        c.save(1, state, {"step": 1})
        c.wait_until_finished()
    # an interrupted write of step 2: the tmp directory holds a half-written copy
    tmp = tmp_path / f"2{ck.TMP_SUFFIX}"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{")
    listed = ck.list_checkpoints(tmp_path)
    assert [(s.step, s.complete) for s in listed] == [(1, True), (2, False)]
    c = ck.Checkpointer(tmp_path, CFG, read_only=True)
    assert c.latest_step() == 1
    _, pos, _ = c.restore(abstract_state=abstract(state))
    assert pos == {"step": 1}
    # a writer removes the leftover (orbax cleans tmp directories up before its first save)
    with ck.Checkpointer(tmp_path, CFG) as c:
        c.save(3, state, {"step": 3})
    assert not tmp.exists() and ck.Checkpointer(tmp_path, CFG, read_only=True).all_steps() == [1, 3]


def test_resolve_start_order(tmp_path):
    run = tmp_path / "run"
    other = tmp_path / "other"
    cfg = Config(run=RunConfig(output_dir=str(run)))
    assert ck.resolve_start(run, cfg) == ck.StartPoint("fresh")
    cfg = Config(run=RunConfig(output_dir=str(run)), model=ModelConfig(student=str(tmp_path / "student")))
    assert ck.resolve_start(run, cfg) == ck.StartPoint("weights", tmp_path / "student")
    with ck.Checkpointer(ck.checkpoint_dir(other), CFG) as c:
        c.save(3, small_state(), {"step": 3})
    cfg = cfg.__class__(**{**cfg.__dict__, "checkpoint": CheckpointConfig(init_from=str(other))})
    start = ck.resolve_start(run, cfg)
    assert (start.kind, start.path, start.step) == ("init_from", ck.checkpoint_dir(other).absolute(), 3)
    assert ck.resolve_start(run, cfg.checkpoint.__class__(init_from=str(ck.checkpoint_dir(other) / "3"))).step == 3
    with pytest.raises(CheckpointError, match="init_from"):
        ck.resolve_start(run, CheckpointConfig(init_from=str(tmp_path / "nope")))
    with ck.Checkpointer(ck.checkpoint_dir(run), CFG) as c:
        c.save(9, small_state(), {"step": 9})
    assert ck.resolve_start(run, cfg) == ck.StartPoint("resume", ck.checkpoint_dir(run).absolute(), 9)


def test_sigterm_sets_flag():
    ck.reset_stop()
    old = signal.getsignal(signal.SIGTERM)
    restore = ck.install_preemption_handler()
    try:
        assert not ck.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes of the main thread
            if ck.should_stop(1):
                break
            time.sleep(0.01)
        assert ck.should_stop(1)
    finally:
        restore()
        ck.reset_stop()
    assert signal.getsignal(signal.SIGTERM) is old


def test_checkpoint_info_cli(tmp_path, capsys):
    with ck.Checkpointer(tmp_path / "checkpoints", CFG) as c:
        c.save(4, small_state(), {"step": 4}, metrics={"wer": 9.5})
    (tmp_path / "checkpoints" / f"6{ck.TMP_SUFFIX}").mkdir()
    assert checkpoint_info.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "wer=9.5" in out and "complete" in out and "INCOMPLETE" in out and "1 proc" in out
    assert checkpoint_info.main([str(tmp_path), "--verify"]) == 0
    with pytest.raises(CheckpointError):
        checkpoint_info.main([str(tmp_path / "missing")])


CHILD = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from dwjax.checkpoint import Checkpointer
    from dwjax.config import CheckpointConfig
    c = Checkpointer(sys.argv[1], CheckpointConfig(save_every=1, keep_last=100, keep_best=0, async_save=True))
    big = {"w%d" % i: jnp.zeros((1024, 1024), jnp.float32) for i in range(24)}  # 96 MiB per save
    for step in range(1, 1000):
        state = {"params": jax.tree.map(lambda x: x + step, big), "step": jnp.int32(step)}
        jax.block_until_ready(state)
        c.save(step, state, {"step": step})
        print("started", step, flush=True)
""")


def test_kill_9_during_async_save(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        last = 0
        for line in proc.stdout:
            last = int(line.split()[1])
            if last == 3:
                break
        proc.send_signal(signal.SIGKILL)  # step 3 is being written; 1 and 2 are committed
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert last == 3
    steps = ck.Checkpointer(tmp_path, CFG, read_only=True).all_steps()
    assert steps[:2] == [1, 2] and max(steps) <= 3
    interrupted = (tmp_path / f"3{ck.TMP_SUFFIX}").exists()
    assert interrupted, "the kill came after step 3 was committed: make the child state larger"
    c = ck.Checkpointer(tmp_path, CFG, read_only=True)
    restored, pos, _ = c.restore_latest_valid()
    latest = c.latest_step()
    assert latest == 2
    assert pos == {"step": latest} and int(restored["step"]) == latest
    assert float(restored["params"]["w0"][0, 0]) == latest and float(restored["params"]["w23"][-1, -1]) == latest
