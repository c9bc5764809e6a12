"""`dwjax transcribe` on good and bad input: bad files get one line on stderr, good ones are still transcribed,
the exit status says something failed, and no traceback ever reaches the user."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from dwjax.cli import main
from dwjax.weights.loading import _builtin
from tests.helpers import synthesize


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (text, audio), = synthesize(d / "synth", 1)
    good = d / "good.flac"
    sf.write(good, audio, 16000)
    # the same speech as 44.1 kHz stereo 16-bit wav
    import soxr
    a44 = soxr.resample(audio, 16000, 44100)
    sf.write(d / "stereo44k.wav", np.stack([a44, 0.5 * a44], axis=1), 44100, subtype="PCM_16")
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "silence.wav", np.zeros(32000, np.float32), 16000)
    nan = audio.copy()
    nan[100] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    return d, text


def test_good_and_bad_files_together(files, capsys):
    d, text = files
    paths = [d / "good.flac", d / "missing.wav", d / "corrupt.wav", d / "empty.wav", d / "silence.wav",
             d / "nan.wav", d / "stereo44k.wav"]
    rc = main(["transcribe", "--model", "builtin:whisper-tiny.en", *map(str, paths)])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.strip().splitlines()
    assert len(lines) == 2                      # good.flac and the stereo 44.1 kHz copy
    # several inputs: each line is FILE<TAB>TEXT
    assert [line.split("\t", 1)[0] for line in lines] == [str(d / "good.flac"), str(d / "stereo44k.wav")]
    from dwjax.text.wer import wer
    assert wer([text, text], [line.split("\t", 1)[1] for line in lines]) < 0.35
    errors = [l for l in err.strip().splitlines() if l.startswith("dwjax transcribe: error:")]
    assert len(errors) == 5
    for name in ("missing.wav", "corrupt.wav", "empty.wav", "silence.wav", "nan.wav"):
        assert sum(name in l for l in errors) == 1, (name, errors)
    assert "Traceback" not in err


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dwjax", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("model", ["/nonexistent/model", "builtin:whisper-huge"])
def test_unknown_model(files, model):
    d, _ = files
    r = _run_cli("transcribe", "--model", model, str(d / "good.flac"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr


@pytest.mark.parametrize("missing", ["vocabulary.txt", "config.json", "model.bin"])
def test_model_dir_missing_a_file(files, tmp_path, missing):
    d, _ = files
    src, _ = _builtin("builtin:whisper-tiny.en")
    model = tmp_path / "tiny"
    shutil.copytree(src, model)
    (model / missing).unlink()
    r = _run_cli("transcribe", "--model", str(model), str(d / "good.flac"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "error" in last and (missing in last or "not a model directory" in last), r.stderr
