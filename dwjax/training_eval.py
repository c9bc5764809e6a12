"""In-training evaluation of the student on `data.eval` (what `dwjax distill` runs every `eval.every` steps).

Two measurements per evaluation set, both on rows that have a reference text, on the run's mesh with the state's
sharded parameters:
  * WER of greedy generation (`GreedyWer`): the student's (and at the first and last evaluation, the teacher's)
    transcripts against the references, through one inference engine (`Transcriber`) per model built at its
    first evaluation and fed each evaluation's parameters (compiled once per run); the mean student WER ranks
    checkpoints for `checkpoint.keep_best`;
  * teacher-forced KL(teacher || student) at T = 1 and the student's cross-entropy, per token (`TeacherForced`):
    the reference text (no timestamps, the model's prompt) through both decoders with the jitted, sharded
    `eval_step` of dwjax/train_step.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import numpy as np

from dwjax.audio import N_SAMPLES, load_audio, load_audio_bytes, log_mel_spectrogram, pad_or_trim
from dwjax.data.loader import bucket_length
from dwjax.data.manifest import read_dataset
from dwjax.decoding.transcribe import Transcriber
from dwjax.losses import make_decoder_batch
from dwjax.models.kernels import Kernels
from dwjax.text.wer import wer


def _audio(e) -> np.ndarray:
    """16 kHz audio of an example held as a path or as bytes (a saved `datasets` set, parquet with audio)."""
    return load_audio(e.audio_path) if e.audio_path else load_audio_bytes(e.audio_bytes, name=e.id)


@dataclass
class EvalSet:
    """One evaluation set's rows that have a reference, with their audio, read once for the whole run."""
    name: str
    rows: list                   # dwjax.data.manifest.Example
    audio: list                  # 16 kHz float32 audio per row


def load_eval_sets(eval_sets, max_samples) -> list[EvalSet]:
    """`data.eval` -> EvalSets: the first `max_samples` rows with a reference text of each (None: all)."""
    out = []
    for es in eval_sets:
        rows = [e for e in read_dataset(f"{es.name}={es.path}") if e.text and e.text.strip()][: max_samples or None]
        out.append(EvalSet(es.name, rows, [_audio(e) for e in rows]))
    return out


class GreedyWer:
    """WER of greedy generation on each evaluation set, one `Transcriber` per model on the run's mesh.

    `models`: {"student": LoadedModel, "teacher": LoadedModel} (configuration, tokenizer, generation config; their
    weights are not used). Each call takes {name: parameters} (the training state's student parameters, the
    sharded teacher's; any subset of `models`) and returns {"SET/NAME_wer", "SET/NAME_seconds"} (percent,
    seconds). A model's engine is built at its first call and fed the parameters of every later call: the
    compiled programs are reused. Multi-process: every process decodes every row (the mesh's global batches)."""

    def __init__(self, sets: list[EvalSet], models: dict, mesh, global_batch: int, kernels: Kernels = Kernels()):
        self.sets, self.models, self.mesh, self.global_batch = sets, models, mesh, global_batch
        self.kernels = kernels
        self.transcribers: dict[str, Transcriber] = {}

    def transcriber(self, name: str, params) -> Transcriber:
        """The engine of model `name`, holding `params`."""
        if name not in self.transcribers:
            self.transcribers[name] = Transcriber(self.models[name], batch_size=self.global_batch, mesh=self.mesh,
                                                  params=params, kernels=self.kernels)
        tr = self.transcribers[name]
        tr.params = params
        return tr

    def __call__(self, params: dict) -> dict:
        out = {}
        for es in self.sets:
            refs = [e.text for e in es.rows]
            for name, p in params.items():
                tr = self.transcriber(name, p)
                t0 = time.time()
                hyps = [r.text for r in tr.transcribe(es.audio)]
                out[f"{es.name}/{name}_wer"] = 100 * wer(refs, hyps)
                out[f"{es.name}/{name}_seconds"] = time.time() - t0
        return out


@dataclass
class _Tokens:
    seqs: np.ndarray             # (n, T + 1) int32: prompt + reference tokens + EOT, EOT-padded
    prompt_lengths: np.ndarray   # (n,)
    lengths: np.ndarray          # (n,)


class TeacherForced:
    """KL(teacher || student) at T = 1 and CE per token on each evaluation set's references, on the mesh.

    The sets are read, tokenised and their audio loaded once; each call runs `steps.eval_step` over global
    batches of `global_batch` rows (the last one padded with masked rows) and returns {"SET/kl", "SET/ce",
    "SET/tokens"}. Multi-process: every process reads the sets and feeds its own rows of each global batch."""

    def __init__(self, sets: list[EvalSet], tokenizer, n_mels: int, global_batch: int, steps, max_tokens: int,
                 process_index: int = 0, process_count: int = 1):
        self.steps, self.make = steps, make_decoder_batch
        self.global_batch, self.proc, self.n_proc = global_batch, process_index, process_count
        self.sets = [es for es in sets if es.rows]
        self.tokens = []
        for es in self.sets:
            seqs, prompt_lengths = [], []
            for e in es.rows:
                if tokenizer.is_multilingual:
                    p = tokenizer.sot_sequence(e.language or "en", e.task or "transcribe", False)
                else:
                    p = tokenizer.sot_sequence(None, None, False)
                seqs.append((p + tokenizer.encode(" " + e.text.strip()) + [tokenizer.eot])[: max_tokens + 1])
                prompt_lengths.append(len(p))
            arr = np.full((len(seqs), bucket_length(max(map(len, seqs)), max_tokens + 1, 16)), tokenizer.eot,
                          np.int32)
            for i, seq in enumerate(seqs):
                arr[i, :len(seq)] = seq
            self.tokens.append(_Tokens(arr, np.array(prompt_lengths), np.array([len(q) for q in seqs])))
        self._mel = jax.jit(lambda a: log_mel_spectrogram(a, n_mels=n_mels), in_shardings=steps.batch_sharding,
                            out_shardings=steps.batch_sharding)

    def __call__(self, student_params, teacher_params) -> dict:
        out = {}
        g, local = self.global_batch, self.global_batch // self.n_proc
        for s, t in zip(self.sets, self.tokens):
            n = len(t.seqs)
            pad = (-n) % g
            idx = np.concatenate([np.arange(n), np.zeros(pad, np.int64)])
            valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
            sums = {"kl_sum": 0.0, "ce_sum": 0.0, "n_tokens": 0.0}
            for b in range(0, n + pad, g):
                rows = idx[b + self.proc * local: b + (self.proc + 1) * local]
                keep = valid[b + self.proc * local: b + (self.proc + 1) * local]
                dec = self.make(t.seqs[rows], t.prompt_lengths[rows], t.lengths[rows])
                dec["loss_mask"] = dec["loss_mask"] * keep[:, None]
                put = lambda x: jax.make_array_from_process_local_data(self.steps.batch_sharding, x)  # noqa: E731
                batch = {k: put(v) for k, v in dec.items()}
                audio = np.stack([pad_or_trim(s.audio[r], N_SAMPLES) for r in rows]).astype(np.float32)
                batch["input_features"] = self._mel(put(audio))
                terms = jax.device_get(self.steps.eval_step(student_params, teacher_params, batch))
                for k in sums:
                    sums[k] += float(terms[k])
            n_tok = max(sums["n_tokens"], 1.0)
            out[f"{s.name}/kl"] = sums["kl_sum"] / n_tok
            out[f"{s.name}/ce"] = sums["ce_sum"] / n_tok
            out[f"{s.name}/tokens"] = sums["n_tokens"]
        return out


def mean_student_wer(results: dict) -> float:
    vals = [v for k, v in results.items() if k.endswith("student_wer")]
    return float(np.mean(vals)) if vals else float("nan")
