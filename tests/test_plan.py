"""`dwjax plan`: ahead-of-time compilation on fake CPU devices of a tiny shape; the report has per-device memory
and a fits / does-not-fit verdict with what to change. 8 fake CPU devices come from conftest; the topology here
has 4, so everything runs in this process (no re-exec)."""
import dataclasses
import json

import flax.linen as nn
import pytest

from dwjax import plan as plan_lib
from dwjax.cli import plan as plan_cli
from dwjax.config import load_config
from dwjax.errors import ConfigError
from dwjax.models.configs import WhisperConfig, official
from dwjax.models.whisper import abstract_params, count_params

TINY = WhisperConfig(n_mels=16, n_audio_ctx=16, n_text_ctx=32, d_model=64, encoder_layers=2, decoder_layers=4,
                     encoder_heads=2, decoder_heads=2, ffn_dim=128, vocab_size=512)
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _topology(tmp_path, memory_gb):
    path = tmp_path / f"tiny-{memory_gb}.yaml"
    path.write_text(f"mesh: {{fsdp: 2}}\ntrain: {{per_device_batch_size: 2}}\nlabel: {{batch_size: 2}}\n"
                    f"data: {{max_label_length: 32}}\n"
                    f"devices: {{kind: tiny accelerator, count: 4, processes: 1, memory_gb: {memory_gb}}}\n")
    return path


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    cfg = load_config(topology=str(_topology(tmp_path_factory.mktemp("plan"), 1)))
    return plan_lib.make_plan(cfg, TINY, plan_lib.student_shape(TINY, 2), teacher_name="tiny",
                              compiler_options=FAST_COMPILE)


def test_plan_reports_memory_and_fits(tiny_plan):
    train = tiny_plan.train
    # the argument buffers XLA assigns are the shards the shardings give (+ step, rng)
    assert 0 <= train.memory.argument - sum(train.resident.values()) < 1024
    # fsdp 2: each device holds about half of the teacher (norms and biases over heads are replicated)
    full_teacher = 4 * count_params(nn.unbox(abstract_params(TINY)))
    assert 0.4 * full_teacher < train.resident["teacher parameters"] < 0.75 * full_teacher
    assert train.resident["optimizer state"] > 0 and train.memory.temp > 0
    assert train.flops_global and 0.8 < train.flops_global / train.analytic_vs_xla < 1.5
    text = plan_lib.format_plan(tiny_plan)
    for needle in ("per device", "student parameters", "optimizer state", "teacher parameters",
                   "activations/temporaries", "peak estimate", "fits:", "margin", "verdict: fits",
                   "4 devices = 8 global", "FLOPs per step", "generate step"):
        assert needle in text, needle
    assert "does not fit" not in text


def test_plan_too_small_says_what_to_change(tiny_plan):
    small = dataclasses.replace(tiny_plan.cfg, devices=dataclasses.replace(tiny_plan.cfg.devices, memory_gb=1e-4))
    plan = dataclasses.replace(tiny_plan, cfg=small)
    assert plan.all_fit is False
    text = plan_lib.format_plan(plan)
    assert "does not fit" in text and "verdict: does not fit" in text
    for knob in ("train.per_device_batch_size", "model.remat", "mesh.fsdp", "label.batch_size"):
        assert knob in text, knob


def test_cli_end_to_end(tmp_path, capsys):
    teacher = tmp_path / "tiny.json"
    teacher.write_text(json.dumps(dataclasses.asdict(TINY)))
    rc = plan_cli.main(["--topology", str(_topology(tmp_path, 1e-4)), "--teacher", str(teacher),
                        "--no-generate", "--no-flops", "train.grad_accum_steps=2"])
    out = capsys.readouterr().out
    assert rc == plan_cli.EXIT_DOES_NOT_FIT
    assert "student 2-2" in out and "x 2 accumulation = 16 examples" in out and "does not fit" in out


def test_teacher_shapes_and_device_env():
    assert plan_lib.resolve_teacher_shape("large-v3")[1] == official("large-v3")
    assert plan_lib.resolve_teacher_shape("builtin:whisper-tiny.en")[1] == official("tiny.en")
    assert plan_lib.resolve_teacher_shape('{"d_model": 64, "ffn_dim": 256}')[1].d_model == 64
    assert plan_lib.student_shape(official("large-v3"), 2).decoder_layers == 2
    with pytest.raises(ConfigError):
        plan_lib.student_shape(TINY, 5)
    with pytest.raises(ConfigError):
        plan_lib.resolve_teacher_shape("no-such-model")
    env = plan_cli.device_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8"}, 32)
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=32"]
    assert env["JAX_PLATFORMS"] == "cpu"
