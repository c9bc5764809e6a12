"""Config loading/merging/validation, topology files, mesh creation on 8 fake CPU devices, run scripts."""
import argparse
import dataclasses
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

from dwjax import config as C
from dwjax import mesh as M
from dwjax.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TOPOLOGIES = sorted((REPO / "tpu_configs").glob("*.yaml"))
SCRIPTS = sorted(p for p in (REPO / "run_scripts").iterdir() if p.is_file())


def test_defaults_are_the_dataclass_defaults():
    assert C.load_config() == C.Config()
    assert C.load_config().mesh.logical_axis_rules == ()            # [] = the mesh's default rules
    assert M.logical_rules(C.load_config()) == M.DEFAULT_LOGICAL_AXIS_RULES


def test_every_field_is_documented():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no description"
            sub = C._section_type(typing.get_type_hints(cls)[f.name])
            if sub is not None:
                walk(sub)
    walk(C.Config)
    walk(C.DatasetSpec)
    walk(C.EvalSetSpec)


def test_expected_topologies_present():
    names = {p.stem for p in TOPOLOGIES}
    assert {"v4-8", "v4-32", "v5e-16", "v5p-64", "v6e-8", "gpu-8xh100", "gpu-2x8xh100", "cpu"} <= names


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_topology_loads_and_fits_its_devices(path):
    text = path.read_text()
    assert "dwjax" in text.split("\n\n")[0] or "run_scripts/" in text, "header must give the command that runs it"
    cfg = C.load_config(topology=str(path))
    assert cfg.devices is not None, "a topology file describes its devices"
    shape = M.validate_for_devices(cfg, cfg.devices.count, cfg.devices.processes)
    assert shape["data"] * shape["fsdp"] * shape["tensor"] == cfg.devices.count
    assert M.global_batch_size(cfg, cfg.devices.count) % (shape["data"] * shape["fsdp"]) == 0
    for logical, axes in M.logical_rules(cfg):
        assert logical in M.LOGICAL_AXES
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            assert axis in M.MESH_AXES
    if path.stem != "cpu":
        assert cfg.model.dtype == "bfloat16"
        assert cfg.devices.memory_gb
    # a topology overrides only what differs from the defaults
    defaults = C.to_dict(C.Config())
    for section, values in yaml.safe_load(text).items():
        if section != "devices":
            for key, value in values.items():
                assert defaults[section][key] != value, f"{path.stem}: {section}.{key} repeats the default"


def test_topology_by_name():
    assert C.load_config(topology="v4-32") == C.load_config(topology=str(REPO / "tpu_configs" / "v4-32.yaml"))
    with pytest.raises(ConfigError, match="did you mean v4-32"):
        C.load_config(topology="v4-23")


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        C.load_config(overrides=["train.per_device_batchsize=4"])
    assert str(e.value).startswith("unknown key train.per_device_batchsize; "
                                   "did you mean train.per_device_batch_size? (in override ")
    exp = tmp_path / "exp.yaml"
    exp.write_text("optim:\n  learning_rat: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"unknown key optim.learning_rat; did you mean "
                                          r"optim.learning_rate\? \(in .*exp.yaml\)"):
        C.load_config(config=str(exp))
    with pytest.raises(ConfigError, match="did you mean data.train\\[0\\].weight"):
        C.load_config(overrides=["data.train=[{name: a, path: b, wieght: 2}]"])
    with pytest.raises(ConfigError, match="unknown key zzz; valid keys under the top level"):
        C.load_config(overrides=["zzz.y=1"])


def test_type_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^train.per_device_batch_size \(from override .*\): Value 'abc' of type "
                                          r"'str' could not be converted to Integer$"):
        C.load_config(overrides=["train.per_device_batch_size=abc"])
    with pytest.raises(ConfigError, match=r"model.dtype.*one of \['float32', 'bfloat16'\]"):
        C.load_config(overrides=["model.dtype=float16"])
    with pytest.raises(ConfigError, match="checkpoint.async_save.*true or false"):
        C.load_config(overrides=["checkpoint.async_save=3"])
    with pytest.raises(ConfigError, match=r"data.train\[0\].path.*required"):
        C.load_config(overrides=["data.train=[{name: a}]"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        C.load_config(overrides=["train.per_device_batch_size"])
    with pytest.raises(ConfigError, match="data.timestamp_probability must be in"):
        C.load_config(overrides=["data.timestamp_probability=1.5"])
    with pytest.raises(ConfigError, match="data.run_on_fraction must be in"):
        C.load_config(overrides=["data.run_on_fraction=-0.1"])
    with pytest.raises(ConfigError, match="unknown logical axis 'embd'; did you mean embed"):
        M.validate_for_devices(C.load_config(overrides=["mesh.logical_axis_rules=[[embd, fsdp]]"]), 8)
    with pytest.raises(ConfigError, match="maps to unknown mesh axis 'fdsp'"):
        M.logical_rules(C.load_config(overrides=["mesh.logical_axis_rules=[[embed, fdsp]]"]))
    with pytest.raises(ConfigError, match=r"each rule is \[logical name"):
        M.logical_rules(C.load_config(overrides=["mesh.logical_axis_rules=[[embed]]"]))
    with pytest.raises(ConfigError, match=r"^eval.every must be >= 0"):
        C.load_config(overrides=["eval.every=-1"])
    with pytest.raises(ConfigError, match=r"^unknown key train.eval_batch_size; "):
        C.load_config(overrides=["train.eval_batch_size=4"])     # moved to eval.batch_size


def test_override_order(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("train:\n  per_device_batch_size: 4\noptim:\n  learning_rate: 3e-4\n"
                   "data:\n  train:\n    - {name: ls, path: /d/ls.jsonl, weight: 2}\n")
    cfg = C.load_config(topology="v4-8", config=str(exp))
    assert cfg.model.dtype == "bfloat16"  # topology over defaults
    assert cfg.train.per_device_batch_size == 4  # experiment over topology
    assert cfg.optim.learning_rate == 3e-4  # YAML 1.1 `3e-4` string coerced to float
    assert cfg.data.train == (C.DatasetSpec("ls", "/d/ls.jsonl", 2.0),)
    cfg = C.load_config(topology="v4-8", config=str(exp),
                        overrides=["train.per_device_batch_size=16", "model.dtype=float32",
                                   "mesh.logical_axis_rules=[[batch, [data, fsdp]], [embed, null]]",
                                   "model.student=null"])
    assert cfg.train.per_device_batch_size == 16  # overrides last
    assert cfg.model.dtype == "float32"
    assert cfg.mesh.logical_axis_rules == (("batch", ("data", "fsdp")), ("embed", None))
    assert cfg.run == C.RunConfig()  # untouched sections keep their defaults


def test_model_kernels_are_config_fields():
    from dwjax.models.kernels import Kernels
    assert C.Config().model.kernels == Kernels()
    cfg = C.load_config(overrides=["model.attention=xla", "model.query_chunk=0", "model.encode_per_example=false"])
    assert cfg.model.kernels == Kernels("xla", 0, False)
    with pytest.raises(ConfigError, match=r"model.attention.*one of \['auto', 'einsum', 'cudnn', 'xla'\]"):
        C.load_config(overrides=["model.attention=flash"])


def test_round_trip_yaml_and_args(tmp_path):
    cfg = C.load_config(topology="gpu-2x8xh100", overrides=["data.eval=[{name: e, path: p}]"])
    for comments in (False, True):
        out = tmp_path / f"cfg{comments}.yaml"
        out.write_text(C.to_yaml(cfg, comments=comments))
        assert C.load_config(config=str(out)) == cfg
    parser = argparse.ArgumentParser()
    C.add_config_args(parser)
    args = parser.parse_args(["--topology", "cpu", "train.log_every=7"])
    assert C.config_from_args(args).train.log_every == 7
    assert C.to_dict(cfg)["mesh"]["dcn_data"] == 2
    assert C.override(cfg, "mesh.dcn_data=1").mesh == dataclasses.replace(cfg.mesh, dcn_data=1)


def test_label_section_from_a_file_the_flags_and_overrides(tmp_path, monkeypatch):
    """`dwjax pseudo-label` runs with the config's label: section; its flags override the files, KEY=VALUE both."""
    import dwjax.pseudo_label as PL
    from dwjax.cli import pseudo_label as cli
    exp = tmp_path / "label.yaml"
    exp.write_text("model: {teacher: t}\nlabel:\n  data: [a=x.jsonl]\n  output: out\n  batch_size: 4\n"
                   "  pack: true\n  commit_every: 2\n")
    seen = {}
    monkeypatch.setattr(PL, "label_datasets", lambda specs, opts, cfg: seen.update(specs=specs, opts=opts) or {})
    assert cli.main(["--config", str(exp), "--batch-size", "6", "--workers", "1", "label.commit_every=3"]) == 0
    assert seen["specs"] == ["a=x.jsonl"]
    assert seen["opts"] == PL.LabelOptions(teacher="t", output="out", batch_size=6, timestamps=True, pack=True,
                                           max_new_tokens=448, commit_every=3, num_workers=1)
    assert cli.main(["--data", "b.jsonl", "--output", "o", "--max-new-tokens", "100"]) == 0
    assert seen["specs"] == ["b.jsonl"]
    assert seen["opts"] == PL.LabelOptions(teacher=C.ModelConfig.teacher, output="o", max_new_tokens=100)
    with pytest.raises(SystemExit) as e:
        cli.main(["--output", "o"])                     # nothing to label: a usage error
    assert e.value.code == 2


def test_topologies_ship_in_the_wheel(tmp_path):
    """An installed wheel (here: built, then unpacked as pip installs it) finds `--topology v4-8` inside the
    package, away from any source checkout."""
    import os
    import sys
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(REPO / "dwjax", src / "dwjax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tpu_configs", src / "tpu_configs")
    shutil.copy(REPO / "setup.py", src / "setup.py")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    wheel, = (tmp_path / "wheel").glob("dwjax-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert {f"dwjax/tpu_configs/{p.name}" for p in TOPOLOGIES} <= set(z.namelist())
        z.extractall(site)
    code = ("from dwjax.config import load_config, resolve_topology; "
            "print(resolve_topology('v4-8'), load_config(topology='v4-8').devices.count)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    path, count = out.stdout.split()
    assert Path(path) == site / "dwjax" / "tpu_configs" / "v4-8.yaml" and count == "4"


def test_misfit_config_says_what_to_change():
    cfg = C.load_config(overrides=["mesh.data=4", "mesh.fsdp=4"])
    with pytest.raises(ConfigError) as e:
        M.validate_for_devices(cfg, 8, 1)
    msg = str(e.value)
    assert msg.startswith("mesh data=4 fsdp=4 needs 16 devices but 8 are present: set mesh.data=2")
    assert "mesh.data=-1" in msg
    cfg = C.load_config(overrides=["mesh.fsdp=3"])
    with pytest.raises(ConfigError, match="cannot fill 8 devices"):
        M.validate_for_devices(cfg, 8, 1)
    cfg = C.load_config(topology="v4-32")
    with pytest.raises(ConfigError, match="topology is for 16 x TPU v4 but 8 devices are present"):
        M.validate_for_devices(cfg, 8, 1)
    cfg = C.load_config(overrides=["mesh.dcn_data=2"])
    with pytest.raises(ConfigError, match="mesh.dcn_data=2 must divide the 1 processes"):
        M.validate_for_devices(cfg, 8, 1)
    assert M.validate_for_devices(C.load_config(), 8, 1) == {"data": 8, "fsdp": 1, "tensor": 1}


# --------------------------------------------------------------------------------------------------- mesh


def _cpu_devices():
    import jax
    devices = jax.devices("cpu")
    if len(devices) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts (tests/conftest.py)")
    return devices[:8]


def test_mesh_on_8_cpu_devices():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from dwjax import mesh as M

    devices = _cpu_devices()
    cfg = C.load_config(topology="cpu")
    mesh = M.make_mesh(cfg.mesh, devices)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}

    rules = M.logical_rules(cfg)
    specs = {"kernel": P("layers", "embed", "mlp"), "x": P("batch", "enc_len", "embed")}
    shardings = M.logical_to_sharding(specs, mesh, rules)
    assert shardings["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["x"].spec == P(("data", "fsdp"), None, None)  # fsdp already taken by batch

    batch = jax.device_put(jnp.arange(16 * 3).reshape(16, 3), M.data_sharding(mesh))
    assert batch.sharding.shard_shape(batch.shape) == (2, 3)
    assert float(jax.jit(jnp.sum)(batch)) == float(sum(range(48)))

    hybrid = M.make_mesh(C.MeshConfig(dcn_data=2, data=2, fsdp=2), devices)
    assert dict(hybrid.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    tp = M.make_mesh(C.MeshConfig(data=-1, tensor=2), devices)
    assert dict(tp.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="needs 16 devices"):
        M.make_mesh(C.MeshConfig(data=4, fsdp=4), devices)


def test_process_helpers(capsys, monkeypatch):
    from dwjax import mesh as M

    for var in ("DWJAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert not M.multi_process_requested()
    assert M.initialize_distributed() is False
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert M.multi_process_requested()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert not M.multi_process_requested()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1,h2,h3")
    assert M.multi_process_requested()

    assert M.is_main_process()
    assert M.on_main(lambda: 42)() == 42
    text = M.banner(C.load_config(overrides=["train.per_device_batch_size=2"]))
    assert "process 0/1" in text and "global" in text and capsys.readouterr().out.strip() == text


# --------------------------------------------------------------------------------------------------- scripts


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help(script):
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    result = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    assert "/home/" not in script.read_text() and "/Users/" not in script.read_text()


def test_stage_scripts_build_the_commands(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DWJAX": "echo dwjax"}
    run = lambda *a, **kw: subprocess.run(["bash", *map(str, a)], capture_output=True, text=True, timeout=20,  # noqa
                                          env={**env, **kw})
    out = run(REPO / "run_scripts/pseudo_label.sh", "--data", "d.jsonl", "--output", "o", "--config", "c.yaml")
    assert out.stdout.strip() == "dwjax pseudo-label --teacher builtin:whisper-tiny.en --data d.jsonl --output o " \
                                 "--config c.yaml"
    out = run(REPO / "run_scripts/distill.sh", "--config", "e.yaml", "train.log_every=1", TOPOLOGY="cpu")
    assert out.stdout.strip() == "dwjax distill --config e.yaml --topology cpu train.log_every=1"
    out = run(REPO / "run_scripts/evaluate.sh", "--model", "m", "--data", "a", "--data", "b")
    assert out.stdout.strip() == "dwjax evaluate --model m --data a b"
    out = run(REPO / "run_scripts/local_cpu.sh", "distill", "--config", "e.yaml")
    assert out.stdout.strip().endswith("tpu_configs/cpu.yaml")
    assert run(REPO / "run_scripts/distill.sh").returncode == 2  # missing --config: usage, exit 2
    out = run(REPO / "run_scripts/tpu_pod.sh", "--dry-run", "--name", "p", "--zone", "z", "--accelerator",
              "v5litepod-16", "distill", "--config", "e.yaml")
    assert out.returncode == 0, out.stderr
    assert "--worker=all" in out.stdout and "TOPOLOGY=tpu_configs/v5e-16.yaml" in out.stdout


_TWO_PROCESS_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from dwjax import config as C, mesh as M
assert M.initialize_distributed()
cfg = C.load_config(overrides=["mesh.dcn_data=2", "mesh.fsdp=2", "train.per_device_batch_size=2"])
M.validate_for_devices(cfg, jax.device_count(), jax.process_count())
mesh = M.make_mesh(cfg)
local = np.full((2 * jax.local_device_count(), 3), jax.process_index(), np.float32)
batch = jax.make_array_from_process_local_data(M.data_sharding(mesh), local)
owners = [d.process_index for d in mesh.devices.reshape(-1)]
print("RESULT", jax.process_index(), float(jax.jit(jnp.sum)(batch)), owners)
"""


def test_two_processes_form_one_mesh(tmp_path):
    """What a 2-host pod does: jax.distributed over gloo, the data axis spanning the processes (dcn_data=2)."""
    import os
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    procs = []
    for rank in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(rank),
               "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=60)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-process run timed out")
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"RESULT {rank} 24.0 [0, 0, 0, 0, 1, 1, 1, 1]" in out, out
