"""`dwjax distill` end to end on a tiny random teacher (d_model 64, 2 heads, 2+2 layers, the real English vocabulary
so the builtin tiny.en tokenizer works) and a 1-layer student, trained on a handful of flite clips whose pseudo-labels
are written directly as a parquet file.

  * smoke: the loss falls; metrics.jsonl, TensorBoard events, summary.json and a loadable, usable student are
    written; the WER filter's per-set counts are reported.
  * exact resume: N steps, stop (SIGTERM-style, in-process; and a real kill -9 of `python -m dwjax distill`), resume
    for N more == 2N uninterrupted, bitwise, with the same batches (ids) in the same order.
  * topology change: 8 devices (data 2 x fsdp 4) then 2 devices == 8 devices throughout, within 1e-5.
  * multi-process: 2 processes x 2 devices, then 1 process x 4 devices == 4 devices throughout (slow).
  * a truncated latest checkpoint: a warning, the previous step is restored, the run continues.

Every run keeps the global batch at 8 (per-device batch x devices), so the data stream is the same everywhere.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import multiprocess

TOKENIZER_SOURCE = "builtin:whisper-tiny.en"
SENTENCES = ("The cat sat on the mat.", "Turn left at the old church.", "Please close the door.",
             "We ate bread and soup.", "The train was late again.", "Birds fly south in winter.")
GLOBAL_BATCH = 8


# ----------------------------------------------------------------------------------------------------- assets


def _random_params(cfg, seed):
    import flax.linen as nn
    from dwjax.models.whisper import abstract_params
    rng = np.random.default_rng(seed)

    def one(path, x):
        scale = str(getattr(path[-1], "key", "")) == "scale"
        return (scale + rng.normal(0, 0.05, x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, nn.unbox(abstract_params(cfg)))


def build_assets(root: Path) -> dict:
    """Clips (16 kHz FLAC from flite), a tiny teacher and a student (dwjax model dirs), a labels parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dwjax.models.configs import WhisperConfig
    from dwjax.models.student import make_student
    from dwjax.weights.loading import load_model, save_dwjax

    root.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, text in enumerate(SENTENCES):
        wav, flac = root / f"c{i}.wav", root / f"c{i}.flac"
        subprocess.run(["flite", "-voice", "kal", "-t", text, "-o", str(wav)], check=True, timeout=60)
        subprocess.run(["sox", str(wav), "-r", "16000", "-c", "1", str(flac)], check=True, timeout=60)
        wav.unlink()
        clips.append((text, flac))

    ref = load_model(TOKENIZER_SOURCE)
    tok = ref.tokenizer
    cfg = WhisperConfig(n_mels=80, n_audio_ctx=1500, n_text_ctx=448, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_heads=2, decoder_heads=2, ffn_dim=128, vocab_size=51864)
    teacher = _random_params(cfg, 0)
    save_dwjax(root / "teacher", cfg, teacher, tok, ref.generation, {"note": "random test teacher"})
    s_cfg, s_params = make_student(cfg, teacher, decoder_layers=1)
    save_dwjax(root / "student-init", s_cfg, s_params, tok, ref.generation, {"note": "test student"})

    rows = []
    for i, (text, path) in enumerate(clips):
        rows.append(dict(id=f"u{i}", audio=str(path), token_ids=tok.encode(" " + text), text=text, reference=text,
                         wer=0.0, status="ok"))
    # filtered out: WER 50 % > 10 %, one 8 % (kept), a failed row, an empty reference
    rows[4]["wer"] = 0.5
    rows[5]["wer"] = 0.08
    rows.append(dict(id="x_failed", audio=str(root / "missing.flac"), token_ids=[], text="", reference="something",
                     wer=None, status="missing audio: no such file"))
    rows.append(dict(id="x_noref", audio=str(clips[0][1]), token_ids=tok.encode(" hello"), text="hello", reference="",
                     wer=None, status="ok"))
    schema = pa.schema([("id", pa.string()), ("audio", pa.string()), ("token_ids", pa.list_(pa.int32())),
                        ("text", pa.string()), ("reference", pa.string()), ("wer", pa.float64()),
                        ("status", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "labels.parquet")
    return {"root": root, "teacher": root / "teacher", "student": root / "student-init",
            "labels": root / "labels.parquet", "clips": clips, "cache": root / "xla-cache"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("distill_assets"))


def overrides(assets, out, total, per_device=1, mesh=("mesh.data=-1",), **extra) -> list[str]:
    args = [f"model.teacher={assets['teacher']}", f"model.student={assets['student']}",
            f"data.train=[{{name: tiny, path: {assets['labels']}}}]", f"run.output_dir={out}",
            f"optim.total_steps={total}", "optim.warmup_steps=0", "optim.learning_rate=0.003",
            "optim.schedule=constant", f"train.per_device_batch_size={per_device}", "train.log_every=1",
            "train.eval_every=0", "checkpoint.save_every=1", "checkpoint.keep_last=3", "data.num_workers=1",
            "data.timestamp_probability=0.0", *mesh]
    return args + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
