"""`dwjax distill` on bad input gives one line on stderr and exit 1, never a traceback (issue 12), and what it prints
while it runs is true:

  * data.train: a path that does not exist, a label directory with one corrupt part file (named), a JSONL manifest
    instead of labels (says to run `dwjax pseudo-label`);
  * mesh.tensor=4 on a 6-head model (4 fake devices, a subprocess: the real CLI);
  * model.student with a truncated params.safetensors;
  * resuming past a newest checkpoint without an integrity record whose data is damaged: one line (which step was
    skipped and why, which step is used), no tracebacks (orbax's abandoned reads used to print ~140);
  * the start-up banner's batch arithmetic with gradient accumulation 4 (it multiplied the accumulation twice);
  * the progress bar counts finished steps, not dispatched ones, and shows samples/s and audio-s/s.

Tiny random models (d_model 64, tests/test_distill.py's assets) and 1-3 steps keep each test to seconds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_distill import build_assets, overrides
from tests.multiprocess import REPO


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("distill_error_assets"))


def _cli(argv, capfd) -> tuple[int, str, str]:
    from dwjax.cli import main
    capfd.readouterr()
    rc = main(["distill", *argv])
    out, err = capfd.readouterr()
    return rc, out, err


def _with_train(args: list[str], path) -> list[str]:
    return [a for a in args if not a.startswith("data.train=")] + [f"data.train=[{{name: x, path: {path}}}]"]


def assert_one_error_line(rc: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("dwjax distill: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------------- data.train


def test_train_path_that_does_not_exist(assets, tmp_path, capfd):
    missing = tmp_path / "nonexistent"
    rc, _, err = _cli(_with_train(overrides(assets, tmp_path / "run", 1), missing), capfd)
    assert_one_error_line(rc, err, str(missing), "does not exist", "pseudo-label")


def test_label_directory_with_a_corrupt_part_names_the_file(assets, tmp_path, capfd):
    labels = tmp_path / "labels"
    labels.mkdir()
    good = labels / "labels-00000-of-00001-part00000.parquet"
    shutil.copy(assets["labels"], good)
    bad = labels / "labels-00000-of-00001-part00001.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])          # truncated
    rc, _, err = _cli(_with_train(overrides(assets, tmp_path / "run", 1), labels), capfd)
    line = assert_one_error_line(rc, err, str(bad), "corrupt or truncated")
    assert str(good) not in line
    bad.write_bytes(os.urandom(3000))                                          # random bytes
    rc, _, err = _cli(_with_train(overrides(assets, tmp_path / "run", 1), labels), capfd)
    assert_one_error_line(rc, err, str(bad))


def test_jsonl_manifest_as_train_data_says_to_pseudo_label(assets, tmp_path, capfd):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"u{i}", "audio": str(path), "text": text}) + "\n"
                                for i, (text, path) in enumerate(assets["clips"])))
    rc, _, err = _cli(_with_train(overrides(assets, tmp_path / "run", 1), manifest), capfd)
    assert_one_error_line(rc, err, str(manifest), "data.train needs", "dwjax pseudo-label", f"--data {manifest}")
    # the same manifest without its suffix is still recognised (not reported as a corrupt parquet file)
    bare = tmp_path / "train"
    shutil.copy(manifest, bare)
    rc, _, err = _cli(_with_train(overrides(assets, tmp_path / "run", 1), bare), capfd)
    assert_one_error_line(rc, err, str(bare), "dwjax pseudo-label")


def test_parquet_that_is_not_labels(assets, tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), other)
    rc, _, err = _cli(_with_train(overrides(assets, tmp_path / "run", 1), other), capfd)
    assert_one_error_line(rc, err, str(other), "not a pseudo-label file", "token_ids")


# ----------------------------------------------------------------------------------------------------- mesh


def _six_head_models(root: Path) -> tuple[Path, Path]:
    from dwjax.models.configs import WhisperConfig
    from dwjax.models.student import make_student
    from dwjax.weights.loading import load_model, save_dwjax
    from tests.test_distill import TOKENIZER_SOURCE, _random_params
    ref = load_model(TOKENIZER_SOURCE)
    cfg = WhisperConfig(n_mels=80, n_audio_ctx=1500, n_text_ctx=448, d_model=96, encoder_layers=1, decoder_layers=2,
                        encoder_heads=6, decoder_heads=6, ffn_dim=192, vocab_size=51864)
    params = _random_params(cfg, 0)
    save_dwjax(root / "teacher6", cfg, params, ref.tokenizer, ref.generation, {})
    s_cfg, s_params = make_student(cfg, params, decoder_layers=1)
    save_dwjax(root / "student6", s_cfg, s_params, ref.tokenizer, ref.generation, {})
    return root / "teacher6", root / "student6"


def test_tensor_parallel_4_with_6_heads_is_one_line(assets, tmp_path):
    """XLA_FLAGS=--xla_force_host_platform_device_count=4 dwjax distill ... mesh.tensor=4 mesh.data=1"""
    teacher, student = _six_head_models(tmp_path)
    args = [a for a in overrides(assets, tmp_path / "run", 1, mesh=("mesh.tensor=4", "mesh.data=1"))
            if not a.startswith(("model.teacher=", "model.student="))]
    args += [f"model.teacher={teacher}", f"model.student={student}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "dwjax", "distill", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    line = assert_one_error_line(proc.returncode, proc.stderr, "mesh.tensor=4", "attention heads (6",
                                 "choose mesh.tensor from 1, 2")
    assert "student" in line and "teacher" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_check_shardable_names_every_dimension():
    """A mesh axis that divides none of several dimensions lists each (heads and MLP width), with the fits."""
    import jax
    from dwjax import mesh as mesh_lib
    from dwjax.config import MeshConfig
    from dwjax.errors import ConfigError
    from dwjax.models.configs import WhisperConfig
    from dwjax.models.whisper import abstract_params
    from dwjax.train_step import check_shardable
    cfg = WhisperConfig(n_mels=80, n_audio_ctx=1500, n_text_ctx=448, d_model=96, encoder_layers=1, decoder_layers=1,
                        encoder_heads=6, decoder_heads=6, ffn_dim=198, vocab_size=51864)
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, tensor=4), jax.devices()[:8])
    with pytest.raises(ConfigError) as info:
        check_shardable({"teacher": abstract_params(cfg)}, mesh, mesh_lib.logical_rules())
    msg = str(info.value)
    assert "attention heads (6, teacher)" in msg and "MLP width ffn_dim (198, teacher)" in msg
    assert "choose mesh.tensor from 1, 2" in msg
    ok = mesh_lib.make_mesh(MeshConfig(data=4, tensor=2), jax.devices()[:8])
    check_shardable({"teacher": abstract_params(cfg)}, ok, mesh_lib.logical_rules())


# ----------------------------------------------------------------------------------------------------- weights


def test_truncated_student_weights_are_one_line(assets, tmp_path, capfd):
    """`head -c 100000 params.safetensors` in model.student (load_model's WeightsError, or distill's own, passes
    through as one line)."""
    student = tmp_path / "student"
    shutil.copytree(assets["student"], student)
    weights = student / "params.safetensors"
    weights.write_bytes(weights.read_bytes()[:100000])
    args = [a for a in overrides(assets, tmp_path / "run", 1) if not a.startswith("model.student=")]
    rc, _, err = _cli(args + [f"model.student={student}"], capfd)
    assert_one_error_line(rc, err, str(student))


# ----------------------------------------------------------------------------------------------------- resume


def test_fallback_from_checkpoint_without_integrity_record_is_one_line(assets, tmp_path, capfd):
    """Newest step 2 lost its dwjax_manifest.json and half of its largest state file: the resume says in one
    line that step 2 was skipped, why, and that step 1 is used; nothing else is printed about it."""
    out = tmp_path / "run"
    rc, _, err = _cli(overrides(assets, out, 2), capfd)
    assert rc == 0, err
    shutil.rmtree(out / "student")
    (out / "summary.json").unlink()
    step2 = out / "checkpoints" / "2"
    (step2 / "dwjax_manifest.json").unlink()
    victim = max((p for p in (step2 / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    # the real command, in its own process: what a user sees (in-process, pytest's hooks and its garbage
    # collection timing would hide orbax's late tracebacks)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "dwjax", "distill", *overrides(assets, out, 3)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "Exception ignored" not in text and "Event loop is closed" not in text, \
        text[:3000]
    mentions = [line for line in re.split(r"[\r\n]+", text) if "step 2" in line and "checkpoint" in line]
    assert len(mentions) == 1, mentions
    line = mentions[0]
    assert line.startswith("checkpoint step 2 skipped: ") and "no dwjax_manifest.json integrity record" in line
    assert "resuming from step 1 instead" in line and "set aside as 2.corrupt-" in line
    assert len(line) < 600, line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == 1 and summary["end_step"] == 3


# ----------------------------------------------------------------------------------------------------- banner, bar


BANNER_RE = re.compile(r"batch (\d+) per device x (\d+) devices x (\d+) accumulation = (\d+) global "
                       r"\(examples per optimizer step; (\d+) per microbatch, (\d+) per process\)")


def test_banner_batch_arithmetic_with_accumulation(capsys):
    import jax
    from dwjax import mesh as mesh_lib
    from dwjax.config import load_config
    n = jax.device_count()
    cfg = load_config(overrides=["train.per_device_batch_size=2", "train.grad_accum_steps=4"])
    for given in (None, 2 * n * 4):            # the default, and what distill passes (accumulation included)
        text = mesh_lib.banner(cfg, given)
        m = BANNER_RE.search(text)
        assert m, text
        per_device, devices, accum, global_, micro, per_proc = map(int, m.groups())
        assert (per_device, devices, accum) == (2, n, 4)
        assert global_ == per_device * devices * accum == 8 * n and micro == 2 * n and per_proc == global_
        assert str(global_ * accum) not in text, text
    capsys.readouterr()


@pytest.fixture(scope="module")
def accum_run(assets, tmp_path_factory):
    """3 steps of distill on 8 devices with accumulation 4 (global batch 32), the bar and the steps watched."""
    import dwjax.distill as distill_mod
    from dwjax.train_step import ShardedSteps
    from tqdm import tqdm as base_tqdm

    losses, checks, bars = [], [], []

    class WatchedBar(base_tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)

        def update(self, n=1):
            out = super().update(n)
            # the bar may only count steps whose loss exists (is_ready: the step has finished)
            checks.append((self.n - self.initial, sum(bool(x.is_ready()) for x in losses), len(losses)))
            return out

    original = ShardedSteps.train_step

    def watched_step(self, state, teacher_params, batch):
        state, metrics = original(self, state, teacher_params, batch)
        losses.append(metrics["loss"])
        return state, metrics

    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("accum") / "run"
    try:
        mp.setattr(distill_mod, "tqdm", WatchedBar)
        mp.setattr(ShardedSteps, "train_step", watched_step)
        import io
        from contextlib import redirect_stdout
        buf = io.StringIO()
        from dwjax.cli.distill import main
        with redirect_stdout(buf):
            rc = main(overrides(assets, out, 3, extra=("train.grad_accum_steps=4", "train.log_every=100")))
    finally:
        mp.undo()
    return {"rc": rc, "stdout": buf.getvalue(), "checks": checks, "bars": bars, "out": out, "losses": losses}


def test_distill_banner_counts_accumulation_once(accum_run):
    import jax
    assert accum_run["rc"] == 0
    found = [BANNER_RE.search(line) for line in accum_run["stdout"].splitlines()]
    found = [m for m in found if m]
    assert len(found) == 1, accum_run["stdout"]
    per_device, devices, accum, global_, micro, _ = map(int, found[0].groups())
    assert (per_device, devices, accum) == (1, jax.device_count(), 4)
    assert global_ == per_device * devices * accum and micro == per_device * devices
    # the loader really drew that many rows per step
    first = json.loads((accum_run["out"] / "logs" / "batches.jsonl").read_text().splitlines()[0])
    assert len(first["ids"]) == global_


def test_progress_bar_counts_finished_steps(accum_run):
    checks = accum_run["checks"]
    assert [c[0] for c in checks] == [1, 2, 3] and len(accum_run["losses"]) == 3
    for counted, ready, dispatched in checks:
        assert counted <= ready, f"the bar shows {counted} steps but only {ready} of {dispatched} have finished"
    bar = accum_run["bars"][0]
    assert bar.n == 3
    postfix = bar.postfix or ""
    assert "smp/s=" in postfix and "audio-s/s=" in postfix, postfix
