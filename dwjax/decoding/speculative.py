"""Speculative (assisted) greedy decoding: a small assistant drafts, the main model verifies (paper §7).

Each round, per row:
  1. the assistant drafts `k` tokens greedily (with the same logit rules as the main model);
  2. the main model scores `last committed token + k drafts` in ONE forward of k+1 positions;
  3. the longest prefix of drafts equal to the main model's (rule-masked) argmax is accepted, plus the main model's
     own token at the first mismatch (or a bonus token when all k drafts were accepted);
  4. both KV caches are rolled back per row by setting `cache["index"]` (rows stand at different positions).
The output is the main model's own greedy output (the main model decides every token; drafts only save forwards).

Everything runs in one jitted `lax.while_loop` over rounds with static shapes: the caches hold
prompt + max_new_tokens + k + 1 positions. Encoder: a student made by `models/student.py` keeps the teacher's
encoder, so the encoder runs once and its output feeds both decoders; a student with a different encoder gets its
own encoder pass.

    from dwjax.decoding.transcribe import Transcriber
    from dwjax.decoding.speculative import SpeculativeTranscriber
    fast = SpeculativeTranscriber(Transcriber("builtin:whisper-base"), "runs/student", k=5)
    texts = [t.text for t in fast.transcribe(audios)]
    fast.stats  # acceptance rate, draft tokens, teacher / assistant forwards
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dwjax.decoding.generate import GenerateOutput, Generator
from dwjax.decoding.rules import DecodeSpec, apply_rules, jax_log_softmax
from dwjax.decoding.transcribe import Transcriber, transcribe_all
from dwjax.errors import UserError
from dwjax.models.whisper import init_cache


# ---------------------------------------------------------------------------------------------------------------
# the jitted loop
# ---------------------------------------------------------------------------------------------------------------


def _rules_rows(spec: DecodeSpec, logits, g, seq, p: int):
    """Apply the logit rules to `logits` (n, v), row i predicting generated index g[i] of sequence seq[i]
    (prompt of length p, then generated tokens). Returns the masked logits (n, v)."""
    n, total = seq.shape
    tb = spec.timestamp_begin
    prev = jnp.take_along_axis(seq, jnp.clip(p + g - 1, 0, total - 1)[:, None], axis=1)[:, 0]
    prev2 = jnp.take_along_axis(seq, jnp.clip(p + g - 2, 0, total - 1)[:, None], axis=1)[:, 0]
    last = jnp.where(g >= 1, prev, -1)
    penult = jnp.where(g >= 2, prev2, -1)
    # the most recent generated timestamp before index g
    pos = jnp.arange(total)[None, :]
    gen = (pos >= p) & (pos < (p + g)[:, None]) & (seq >= tb)
    where_ts = jnp.max(jnp.where(gen, pos, -1), axis=1)
    last_ts = jnp.where(where_ts >= 0,
                        jnp.take_along_axis(seq, jnp.clip(where_ts, 0, total - 1)[:, None], axis=1)[:, 0], -1)

    def one(lg, step, la, pe, lt):
        return apply_rules(spec, lg[None], step, la[None], pe[None], lt[None])[0]

    return jax.vmap(one)(logits, g, last, penult, last_ts)


def speculative_loop(t_model, s_model, spec: DecodeSpec, t_params, s_params, t_enc, s_enc, prompt,
                     max_new_tokens: int, k: int, adaptive: bool = False, sot_index: int = 0):
    """Pure function (jit it). prompt: (b, p) int32, the same layout per row. Returns a dict of arrays:
    tokens (b, max_new_tokens), lengths, sum_logprob, no_speech_prob (as `decode_loop`) and per-row counters
    drafted, accepted, rounds, plus the batch-level number of rounds `batch_rounds`."""
    b, p = prompt.shape
    L, K = max_new_tokens, k
    eot = spec.eot
    max_len = p + L + K + 1
    t_cache = init_cache(t_model.cfg, b, max_len, t_enc.dtype)
    s_cache = init_cache(s_model.cfg, b, max_len, s_enc.dtype)
    t_logits, t_cache = t_model.apply({"params": t_params}, prompt, t_enc, t_cache, method="decode")
    _, s_cache = s_model.apply({"params": s_params}, prompt, s_enc, s_cache, method="decode")
    no_speech = jax.nn.softmax(t_logits[:, sot_index].astype(jnp.float32), axis=-1)[:, spec.no_speech]

    seq = jnp.concatenate([prompt.astype(jnp.int32), jnp.full((b, L + K + 1), eot, jnp.int32)], axis=1)
    zeros = jnp.zeros((b,), jnp.int32)
    masked = _rules_rows(spec, t_logits[:, -1], zeros, seq, p)
    tok = jnp.argmax(masked, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(jax_log_softmax(masked), tok[:, None], axis=-1)[:, 0]
    seq = seq.at[:, p].set(tok)
    rows = jnp.arange(b)

    state = dict(seq=seq, n=jnp.ones((b,), jnp.int32), t_cache=t_cache, s_cache=s_cache,
                 done=(tok == eot) | (L <= 1), sum_lp=lp, kcur=jnp.int32(min(K, 5) if adaptive else K),
                 drafted=zeros, accepted=zeros, rounds=zeros, batch_rounds=jnp.int32(0),
                 batch_drafts=jnp.int32(0))

    def write_row(buf, vals, start):
        return jax.vmap(lambda r, v, s: jax.lax.dynamic_update_slice(r, v, (s,)))(buf, vals, start)

    def cond(s):
        return ~jnp.all(s["done"]) & (s["batch_rounds"] <= L)

    def body(s):
        seq, n, done, kcur = s["seq"], s["n"], s["done"], s["kcur"]
        active = ~done
        # ---- assistant drafts kcur tokens. First step re-feeds the token before the last committed one, so the
        # assistant's cache is complete whether or not it saw the previous round's last draft.
        start = p + n - 2
        two = jax.vmap(lambda r, i: jax.lax.dynamic_slice(r, (i,), (2,)))(seq, start)
        sc = dict(s["s_cache"], index=start)
        sl, sc = s_model.apply({"params": s_params}, two, None, sc, method="decode")
        d = jnp.argmax(_rules_rows(spec, sl[:, -1], n, seq, p), axis=-1).astype(jnp.int32)
        seq_d = seq.at[rows, p + n].set(jnp.where(active, d, seq[rows, p + n]))

        def draft(j, carry):
            seq_d, sc = carry
            cur = seq_d[rows, p + n - 1 + j]
            sl, sc = s_model.apply({"params": s_params}, cur[:, None], None, sc, method="decode")
            d = jnp.argmax(_rules_rows(spec, sl[:, 0], n + j, seq_d, p), axis=-1).astype(jnp.int32)
            seq_d = seq_d.at[rows, p + n + j].set(jnp.where(active, d, seq_d[rows, p + n + j]))
            return seq_d, sc

        seq_d, sc = jax.lax.fori_loop(1, kcur, draft, (seq_d, sc))
        # ---- the main model scores the last committed token + K draft slots in one forward
        window = jax.vmap(lambda r, i: jax.lax.dynamic_slice(r, (i,), (K + 1,)))(seq_d, p + n - 1)
        tc = dict(s["t_cache"], index=p + n - 1)
        tl, tc = t_model.apply({"params": t_params}, window, None, tc, method="decode")
        j = jnp.arange(K + 1)
        g = (n[:, None] + j[None, :]).reshape(-1)
        seq_rep = jnp.repeat(seq_d, K + 1, axis=0)
        m = _rules_rows(spec, tl.reshape(b * (K + 1), -1), g, seq_rep, p)
        y = jnp.argmax(m, axis=-1).astype(jnp.int32)
        lps = jnp.take_along_axis(jax_log_softmax(m), y[:, None], axis=-1)[:, 0].reshape(b, K + 1)
        y = y.reshape(b, K + 1)
        # ---- accept the longest matching prefix (only among the kcur drafts), then the main model's token
        match = (window[:, 1:] == y[:, :K]) & (j[None, :K] < kcur)
        a = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)
        new_ok = j[None, :] <= a[:, None]                         # y_0..y_a are the new tokens
        is_eot = (y == eot) & new_ok
        before_eot = jnp.cumsum(is_eot.astype(jnp.int32), axis=1) - is_eot.astype(jnp.int32) == 0
        counted = new_ok & before_eot & ((n[:, None] + j[None, :]) < L) & active[:, None]
        seq_new = write_row(seq_d, y, p + n)     # y_0..y_a are the new tokens; later slots are overwritten later
        seq_new = jnp.where(active[:, None], seq_new, seq)
        n_new = jnp.where(active, n + a + 1, n)
        done_new = done | jnp.any(is_eot, axis=1) | (n_new >= L)
        tc = dict(tc, index=jnp.where(active, p + n_new - 1, s["t_cache"]["index"]))
        all_full = jnp.all(jnp.where(active, a >= kcur, True))
        kcur_new = jnp.where(all_full, jnp.minimum(kcur + 2, K), jnp.maximum(kcur - 1, 1)) if adaptive else kcur
        act = active.astype(jnp.int32)
        return dict(seq=seq_new, n=n_new, t_cache=tc, s_cache=sc, done=done_new,
                    sum_lp=s["sum_lp"] + jnp.sum(jnp.where(counted, lps, 0.0), axis=1), kcur=kcur_new,
                    drafted=s["drafted"] + act * kcur, accepted=s["accepted"] + act * a,
                    rounds=s["rounds"] + act, batch_rounds=s["batch_rounds"] + 1,
                    batch_drafts=s["batch_drafts"] + kcur)

    s = jax.lax.while_loop(cond, body, state)
    tokens = s["seq"][:, p: p + L]
    tokens = jnp.where(jnp.arange(L)[None, :] < s["n"][:, None], tokens, eot)
    lengths = jnp.argmax(jnp.concatenate([tokens, jnp.full((b, 1), eot, jnp.int32)], 1) == eot, axis=1)
    tokens = jnp.where(jnp.arange(L)[None, :] < lengths[:, None], tokens, eot)
    return dict(tokens=tokens, lengths=lengths, sum_logprob=s["sum_lp"], no_speech_prob=no_speech,
                drafted=s["drafted"], accepted=s["accepted"], rounds=s["rounds"], batch_rounds=s["batch_rounds"],
                batch_drafts=s["batch_drafts"])


# ---------------------------------------------------------------------------------------------------------------
# host-side wrappers
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SpeculativeStats:
    """Counters summed over calls. Per-row counters: `draft_tokens` proposed, `accepted_tokens` of them kept,
    `row_rounds` (one main-model verification per row and round). Batch counters: `teacher_forwards` (prefill +
    one per round), `assistant_forwards` (prefill + drafting steps), `generated_tokens`."""
    draft_tokens: int = 0
    accepted_tokens: int = 0
    row_rounds: int = 0
    teacher_forwards: int = 0
    assistant_forwards: int = 0
    generated_tokens: int = 0
    calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        """α: the fraction of drafted tokens the main model accepted."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted_tokens + self.row_rounds) / self.row_rounds if self.row_rounds else float("nan")

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), acceptance_rate=self.acceptance_rate,
                    tokens_per_round=self.tokens_per_round)


def _same_tree(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b) or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x is y:
            continue
        if x.shape != y.shape or not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True


class SpeculativeGenerator:
    """Pairs a main-model `Generator` with an assistant `Generator` (same vocabulary, each on one device);
    compiles per bucket."""

    def __init__(self, main: Generator, assistant: Generator, k: int = 5, adaptive: bool = False,
                 share_encoder: Optional[bool] = None):
        if main.mesh is not None or assistant.mesh is not None:
            raise UserError("speculative decoding runs on one device; build the transcribers without a mesh")
        if main.model.cfg.vocab_size != assistant.model.cfg.vocab_size:
            raise UserError(f"the assistant's vocabulary ({assistant.model.cfg.vocab_size}) differs from the main "
                            f"model's ({main.model.cfg.vocab_size}); speculative decoding needs the same tokenizer")
        if k < 1:
            raise UserError("speculative decoding needs k >= 1 draft tokens")
        self.main, self.assistant, self.k, self.adaptive = main, assistant, int(k), bool(adaptive)
        if share_encoder is None:
            share_encoder = (main.model.cfg.n_mels == assistant.model.cfg.n_mels
                             and main.model.cfg.d_model == assistant.model.cfg.d_model
                             and _same_tree(main.params["encoder"], assistant.params["encoder"]))
        self.share_encoder = bool(share_encoder)
        self.compilations = 0
        self._loop = jax.jit(self._loop_impl, static_argnames=("spec", "max_new_tokens", "k", "adaptive",
                                                               "sot_index"))

    def _loop_impl(self, t_params, s_params, t_enc, s_enc, prompt, *, spec, max_new_tokens, k, adaptive,
                   sot_index):
        self.compilations += 1
        return speculative_loop(self.main.model, self.assistant.model, spec, t_params, s_params, t_enc, s_enc,
                                prompt, max_new_tokens, k, adaptive, sot_index)

    def encode(self, mel):
        """(main encoder output, assistant encoder output): one encoder pass when the encoder is shared."""
        t_enc = self.main.encode(mel)
        return t_enc, (t_enc if self.share_encoder else self.assistant.encode(mel))

    def generate(self, t_enc, s_enc, prompt, max_new_tokens: int = 224, timestamps: Optional[bool] = None,
                 sot_index: Optional[int] = None, k: Optional[int] = None,
                 adaptive: Optional[bool] = None) -> tuple[GenerateOutput, dict]:
        prompt = np.asarray(prompt, np.int32)
        if prompt.ndim == 1:
            prompt = np.broadcast_to(prompt, (t_enc.shape[0], prompt.shape[0]))
        k = self.k if k is None else int(k)
        adaptive = self.adaptive if adaptive is None else bool(adaptive)
        spec = self.main.spec if timestamps is None else dataclasses.replace(self.main.spec,
                                                                              timestamps=bool(timestamps))
        n_ctx = min(self.main.model.cfg.n_text_ctx, self.assistant.model.cfg.n_text_ctx)
        # the same cap as plain greedy; positions past the context (only reachable within k of it) are avoided by
        # capping once more (documented edge: a row that never ends stops k + 1 tokens earlier than greedy would)
        max_new_tokens = min(max_new_tokens, n_ctx - prompt.shape[1])
        max_new_tokens = max(1, min(max_new_tokens, n_ctx - prompt.shape[1] - k - 1))
        if sot_index is None:
            sot_index = int(np.argmax(prompt[0] == spec.sot))
        out = self._loop(self.main.params, self.assistant.params, t_enc, s_enc, jnp.asarray(prompt), spec=spec,
                         max_new_tokens=max_new_tokens, k=k, adaptive=adaptive, sot_index=sot_index)
        out = jax.device_get(out)
        gen = GenerateOutput(tokens=out["tokens"], lengths=out["lengths"], sum_logprob=out["sum_logprob"],
                             no_speech_prob=out["no_speech_prob"])
        stats = {key: out[key] for key in ("drafted", "accepted", "rounds", "batch_rounds", "batch_drafts")}
        return gen, stats


class SpeculativeTranscriber:
    """`Transcriber` API (`transcribe`, `transcribe_batch`) with greedy speculative decoding.

    `transcriber`: the main model's `Transcriber`. `assistant`: a model name/path, a `LoadedModel` or a
    `Transcriber` (the student). Sampling (temperature > 0) and beam search fall back to the main model alone.
    Other attributes (tokenizer, cfg, batch_size, features, ...) are the main transcriber's.
    """

    def __init__(self, transcriber, assistant, k: int = 5, adaptive: bool = False):
        self.transcriber = transcriber
        if not isinstance(assistant, Transcriber):
            dtype = "bfloat16" if transcriber.dtype == jnp.bfloat16 else "float32"
            assistant = Transcriber(assistant, dtype=dtype, batch_size=transcriber.batch_size)
        if assistant.tokenizer.is_multilingual != transcriber.tokenizer.is_multilingual:
            raise UserError("the assistant and the main model use different tokenizers (English-only vs "
                            "multilingual)")
        self.assistant = assistant
        self.engine = SpeculativeGenerator(transcriber.generator, assistant.generator, k=k, adaptive=adaptive)
        self.stats = SpeculativeStats()

    def __getattr__(self, name):   # tokenizer, cfg, batch_size, features, prompt, spec, generator, ...
        if name == "transcriber":
            raise AttributeError(name)
        return getattr(self.transcriber, name)

    def reset_stats(self) -> None:
        self.stats = SpeculativeStats()

    def generate(self, mel_or_enc, prompts, max_new_tokens: int = 224, timestamps: bool = False,
                 sot_index: Optional[int] = None, encoded: Optional[tuple] = None) -> GenerateOutput:
        """Greedy speculative generation on features `mel_or_enc` (or on `encoded` = (main, assistant) encoder
        outputs); updates `stats`."""
        t_enc, s_enc = encoded if encoded is not None else self.engine.encode(mel_or_enc)
        out, st = self.engine.generate(t_enc, s_enc, prompts, max_new_tokens=max_new_tokens, timestamps=timestamps,
                                       sot_index=sot_index)
        b = int(np.asarray(prompts).shape[0]) if np.asarray(prompts).ndim == 2 else t_enc.shape[0]
        rounds = int(st["batch_rounds"])
        self.stats.draft_tokens += int(st["drafted"][:b].sum())
        self.stats.accepted_tokens += int(st["accepted"][:b].sum())
        self.stats.row_rounds += int(st["rounds"][:b].sum())
        self.stats.teacher_forwards += rounds + 1
        self.stats.assistant_forwards += 1 + int(st["batch_drafts"])
        self.stats.generated_tokens += int(out.lengths[:b].sum())
        self.stats.calls += 1
        return out

    def transcribe_batch(self, audios: Sequence[np.ndarray], language: Optional[str] = None,
                         task: str = "transcribe", timestamps: bool = False, max_new_tokens: int = 224,
                         temperature: float = 0.0, seed: int = 0, num_beams: int = 1, **_):
        if temperature > 0 or num_beams > 1:
            return self.transcriber.transcribe_batch(audios, language=language, task=task, timestamps=timestamps,
                                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                                     seed=seed, num_beams=num_beams)
        tr = self.transcriber
        padded = tr.pad(audios)
        t_enc, s_enc = self.engine.encode(tr.features(padded))
        langs = tr._languages(t_enc, language, len(padded))
        prompts = np.array([tr.prompt(lang, task, timestamps) for lang in langs], np.int32)
        out = self.generate(None, prompts, max_new_tokens=max_new_tokens, timestamps=timestamps,
                            encoded=(t_enc, s_enc))
        return tr.transcripts(out, audios, langs, timestamps)

    def transcribe(self, audios: Sequence[np.ndarray], progress=None, chunk_length=None, long_form="chunked",
                   **kw):
        """Any number of clips (long ones chunked through this object's `transcribe_batch`)."""
        return transcribe_all(self, self.transcriber.batch_size, audios, progress, chunk_length, long_form, **kw)
