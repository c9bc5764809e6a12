"""Shared test helpers: reference (transformers) models built from dwjax parameters, random tiny Whisper models,
Whisper's special-token ids per vocabulary size, and synthesised English utterances (flite / espeak-ng).

transformers and torch are imported lazily, inside the functions that need them, so that importing this module is
cheap; a test that calls them fails (not skips) when they are missing: they are the independent reference.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from dwjax.decoding.rules import DecodeSpec
from dwjax.models.configs import WhisperConfig
from dwjax.weights import names

REPO = Path(__file__).resolve().parent.parent
REAL_MANIFEST = REPO.parent / "shared" / "data" / "real" / "manifest.tsv"

# ---------------------------------------------------------------------------------------------------------------
# special tokens
# ---------------------------------------------------------------------------------------------------------------


def special_ids(vocab_size: int) -> dict:
    """Whisper's special-token ids for a vocabulary size (51864 English-only, 51865 multilingual, 51866 large-v3):
    eot, sot, the language tokens, translate, transcribe, startoflm, startofprev, nospeech, notimestamps and the
    first timestamp; the 1501 timestamps end the vocabulary."""
    eot = 50256 if vocab_size == 51864 else 50257
    n_langs = 100 if vocab_size >= 51866 else 99
    sot = eot + 1
    ids = dict(eot=eot, sot=sot, langs=list(range(sot + 1, sot + 1 + n_langs)))
    nxt = sot + 1 + n_langs
    for i, key in enumerate(("translate", "transcribe", "sot_lm", "sot_prev", "no_speech", "no_timestamps")):
        ids[key] = nxt + i
    ids["timestamp_begin"] = ids["no_timestamps"] + 1
    assert ids["timestamp_begin"] + 1501 == vocab_size, vocab_size
    return ids


# OpenAI's non-speech symbols of the English-only tokenizer (a fixed sample is enough for random models)
_SUPPRESS_SAMPLE = (1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 357, 366,
                    438, 532, 685, 705, 796, 930, 1058, 1220, 1267, 1279, 1303, 1343, 1377, 1391, 1635, 1782, 1875)


def random_spec(vocab_size: int, timestamps: bool = False, extra_suppress=()) -> DecodeSpec:
    """A DecodeSpec like a real model's (symbols + special tokens suppressed; blank and EOT at the start)."""
    ids = special_ids(vocab_size)
    suppress = set(_SUPPRESS_SAMPLE) | set(extra_suppress) | {ids[k] for k in (
        "translate", "transcribe", "sot", "sot_prev", "sot_lm", "no_speech")}
    return DecodeSpec(eot=ids["eot"], sot=ids["sot"], no_speech=ids["no_speech"], no_timestamps=ids["no_timestamps"],
                      timestamp_begin=ids["timestamp_begin"], vocab_size=vocab_size, suppress=tuple(sorted(suppress)),
                      begin_suppress=(220, ids["eot"]), timestamps=timestamps)


def prompt_for(vocab_size: int, timestamps: bool, language_index: int = 0) -> list[int]:
    """The decoder prompt: [sot] (+ <|lang|> <|transcribe|> when multilingual) (+ <|notimestamps|>)."""
    ids = special_ids(vocab_size)
    p = [ids["sot"]]
    if vocab_size >= 51865:
        p += [ids["langs"][language_index], ids["transcribe"]]
    if not timestamps:
        p.append(ids["no_timestamps"])
    return p


# ---------------------------------------------------------------------------------------------------------------
# transformers reference models
# ---------------------------------------------------------------------------------------------------------------


def hf_config(cfg: WhisperConfig):
    from transformers import WhisperConfig as HFWhisperConfig
    ids = special_ids(cfg.vocab_size)
    return HFWhisperConfig(
        vocab_size=cfg.vocab_size, num_mel_bins=cfg.n_mels, d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.encoder_heads, decoder_attention_heads=cfg.decoder_heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
        max_source_positions=cfg.n_audio_ctx, max_target_positions=cfg.n_text_ctx,
        decoder_start_token_id=ids["sot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"],
        pad_token_id=ids["eot"], dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        median_filter_width=7, use_cache=True)


def hf_from_dwjax(params, cfg: WhisperConfig):
    """A transformers WhisperForConditionalGeneration (fp32, eval, eager attention) holding dwjax `params`."""
    import torch
    from transformers import WhisperForConditionalGeneration
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(hf_config(cfg)).eval()
    model.config._attn_implementation = "eager"
    tensors = names.from_dwjax(jax_to_numpy(params), cfg, "hf")
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not missing, missing
    return model


def jax_to_numpy(params):
    import jax
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def random_hf_model(cfg: WhisperConfig, seed: int = 0, embed_std: float = 0.02, eot_scale: float | None = None):
    """A random transformers Whisper model whose every tensor (biases, layer norms, positions too) is random, and
    the same weights as a dwjax parameter tree. `embed_std` sets the token embedding scale (the tied output
    projection: larger means peakier logits); `eot_scale` makes the EOT logit swing widely with the hidden state so
    that some sequences end early and others do not."""
    import torch
    from transformers import WhisperForConditionalGeneration
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(hf_config(cfg)).eval()
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed + 1)
    ids = special_ids(cfg.vocab_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "proj_out.weight":
                continue  # tied to the token embedding
            if "layer_norm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or "layer_norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
                if eot_scale is not None:
                    p[ids["eot"]] = eot_scale * torch.randn(p.shape[1], generator=g) / np.sqrt(p.shape[1])
            elif "embed_positions" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] * (p.shape[2] if p.ndim == 3 else 1)
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
        # HF keeps the encoder positions as a (frozen) parameter; make sure it is random too
        model.model.encoder.embed_positions.weight.copy_(
            0.3 * torch.randn(model.model.encoder.embed_positions.weight.shape, generator=g))
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    params = names.to_dwjax(state, cfg, "hf")
    return model, params


def hf_generation_config(spec: DecodeSpec, vocab_size: int, max_initial_timestamp_index: int | None = 50):
    """transformers' generation config matching a DecodeSpec (the same suppress lists and special ids)."""
    from transformers import GenerationConfig
    ids = special_ids(vocab_size)
    kw = dict(decoder_start_token_id=spec.sot, eos_token_id=spec.eot, pad_token_id=spec.eot,
              bos_token_id=spec.eot, suppress_tokens=list(spec.suppress),
              begin_suppress_tokens=list(spec.begin_suppress), no_timestamps_token_id=spec.no_timestamps,
              is_multilingual=vocab_size >= 51865, max_initial_timestamp_index=max_initial_timestamp_index,
              max_length=448)
    if vocab_size >= 51865:
        from dwjax.text.languages import LANGUAGES
        codes = list(LANGUAGES)[:len(ids["langs"])]
        kw["lang_to_id"] = {f"<|{c}|>": i for c, i in zip(codes, ids["langs"])}
        kw["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    return GenerationConfig(**kw)


def hf_generate(model, mel, spec: DecodeSpec, vocab_size: int, max_new_tokens: int, timestamps: bool,
                num_beams: int = 1, prompt_len: int | None = None) -> list[list[int]]:
    """transformers' Whisper generate on (b, n_mels, frames) features; returns the generated ids per row with the
    prompt and everything from EOT on removed."""
    import torch
    gen = hf_generation_config(spec, vocab_size)
    kw = dict(return_timestamps=timestamps, max_new_tokens=max_new_tokens, generation_config=gen,
              num_beams=num_beams, return_dict_in_generate=True)
    if vocab_size >= 51865:
        kw.update(language="en", task="transcribe")
    if prompt_len is None:
        prompt_len = len(prompt_for(vocab_size, timestamps))
    with torch.no_grad():
        out = model.generate(torch.as_tensor(np.asarray(mel, np.float32)), **kw)
    # The raw sequences (prompt + generated + EOT padding). Whisper's own post-processing splits rows into
    # segments at tokens >= timestamp_begin and, without return_dict_in_generate, cuts rows of random models that
    # emit such tokens in no-timestamp mode; with timestamps the raw rows are in segments[i][0]["result"].
    segments = out.get("segments") if hasattr(out, "get") else None
    raw = []
    for i in range(len(mel)):
        if segments is not None and segments[i]:
            raw.append(segments[i][0]["result"]["sequences"].tolist())
        else:
            raw.append(out["sequences"][i].tolist())
    rows = []
    for row in raw:
        assert row[0] == spec.sot, row
        row = row[prompt_len:]
        cut = row.index(spec.eot) if spec.eot in row else len(row)
        rows.append(row[:cut])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# synthesised speech
# ---------------------------------------------------------------------------------------------------------------

FLITE_VOICES = ("kal", "awb", "rms", "slt")
ESPEAK_VOICES = ("en-us", "en-gb-x-rp", "en+f3", "en-us+m3")

SENTENCES = (
    "The morning train to the coast was late again today.",
    "Please put the blue folder on the second shelf.",
    "My brother plays the violin every Sunday evening.",
    "We should plant tomatoes before the weather turns warm.",
    "The library closes at nine o'clock on weekdays.",
    "She bought three apples and a loaf of fresh bread.",
    "Turn left at the old church and follow the river.",
    "The children painted a large map of the world.",
    "Our meeting has been moved to Thursday afternoon.",
    "He forgot his umbrella and got soaked in the rain.",
    "A small boat drifted slowly across the quiet lake.",
    "The doctor said I need to drink more water.",
    "They watched the stars from the roof of the house.",
    "Could you send me the report by tomorrow morning?",
    "The cat jumped onto the table and knocked over a cup.",
    "Every winter the birds fly south to find food.",
    "The engineer checked the bridge for any cracks.",
    "I have never seen such a beautiful sunset before.",
    "The museum has a new exhibit about ancient Egypt.",
    "Remember to lock the door when you leave the office.",
    "The farmer sold fresh milk at the market on Saturday.",
    "Music was playing softly in the next room.",
    "The pilot announced that we would land in twenty minutes.",
    "Good books can take you to places you have never been.",
    "The garden was full of roses and tall sunflowers.",
    "We ran all the way to the station and still missed the bus.",
    "The teacher wrote the answer on the board.",
    "A strong wind blew the leaves across the yard.",
    "He opened the window to let in some fresh air.",
    "The soup needs a little more salt and pepper.",
    "Scientists study the ocean to learn about climate.",
    "The old clock in the hall stopped at midnight.",
)


def _synth_one(text: str, engine: str, voice: str, path: Path) -> None:
    if engine == "flite":
        cmd = ["flite", "-voice", voice, "-t", text, "-o", str(path)]
    else:
        cmd = ["espeak-ng", "-v", voice, "-s", "160", "-w", str(path), text]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


def synthesize(directory, n: int) -> list[tuple[str, np.ndarray]]:
    """`n` English utterances (sentence, 16 kHz float32 audio), alternating flite (kal awb rms slt) and espeak-ng
    voices; files are written under `directory` (synthesised in parallel)."""
    import concurrent.futures as cf
    from dwjax.audio import load_audio
    for tool in ("flite", "espeak-ng"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install flite espeak-ng)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        if i % 2 == 0:
            engine, voice = "flite", FLITE_VOICES[(i // 2) % len(FLITE_VOICES)]
        else:
            engine, voice = "espeak-ng", ESPEAK_VOICES[(i // 2) % len(ESPEAK_VOICES)]
        jobs.append((text, engine, voice, directory / f"utt{i:03d}.wav"))
    with cf.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(lambda j: _synth_one(*j), jobs))
    return [(text, load_audio(path)) for text, _, _, path in jobs]


def real_clips(n: int) -> list[tuple[str, np.ndarray]]:
    """The first `n` clips of ../shared/data/real/manifest.tsv (transcript, audio), or [] if it is absent."""
    from dwjax.audio import load_audio
    if not REAL_MANIFEST.exists():
        return []
    lines = REAL_MANIFEST.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]
    # spread over the sources (the manifest is grouped by source)
    step = max(1, len(rows) // n)
    picked = rows[::step][:n]
    base = REAL_MANIFEST.parent.parent  # paths are relative to shared/data
    return [(r["transcript"], load_audio(base / r["path"])) for r in picked]


def long_recording(n_clips: int = 52) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """(clips, audio): `n_clips` real clips (synthesised speech where ../shared is absent) joined with 0.4 s
    pauses into one long recording (52 real clips: ~200 s); each clip is (transcript, audio)."""
    from dwjax.audio import SAMPLE_RATE
    clips = real_clips(n_clips)
    if len(clips) < n_clips:
        import tempfile
        clips = synthesize(tempfile.mkdtemp(), n_clips)
    pause = np.zeros(int(0.4 * SAMPLE_RATE), np.float32)
    return clips, np.concatenate([np.concatenate([a, pause]) for _, a in clips])


# ---------------------------------------------------------------------------------------------------------------
# random models that end some sequences early
# ---------------------------------------------------------------------------------------------------------------


def calibrate_eot(hf_model, gen, mel, prompt, max_new_tokens: int, ends=None, margin: float = 1.0):
    """Rewrite the EOT embedding row (in `gen.params` and in `hf_model`, whose output projection is tied) so that
    greedy decoding of `mel` (no timestamps) emits EOT as generated token `ends[i]` in row i (None: never, the row
    runs to `max_new_tokens`). Default ends: [2, None, max_new_tokens // 2, None, 3, ...]. `gen` is a dwjax
    Generator (its compiled functions are reused).

    The greedy trajectories cannot change before EOT is emitted (EOT is never fed before), so each decision is
    known in advance: EOT wins where e . h > the chosen token's logit. `e` solves e . h = chosen logit -/+ `margin`
    exactly (minimum-norm least squares; there are fewer decisions than model dimensions). Returns the smallest
    |EOT logit - chosen logit| over those decisions."""
    import jax
    import jax.numpy as jnp
    import torch

    spec = gen.spec
    b, p = len(mel), len(prompt)
    if ends is None:
        ends = [(2, None, max_new_tokens // 2, None, 3)[i % 5] for i in range(b)]
    enc = gen.encode(mel)
    out = gen.generate(enc, prompt, max_new_tokens=max_new_tokens, timestamps=False)
    toks = np.concatenate([np.broadcast_to(np.asarray(prompt), (b, p)), out.tokens], axis=1)
    logits, _, hidden = gen.model.apply({"params": gen.params}, jnp.asarray(toks), enc, None, True, method="decode")
    logits, hidden = np.asarray(logits, np.float64), np.asarray(hidden, np.float64)
    rows_h, rows_t = [], []
    for i in range(b):
        last = ends[i] if ends[i] is not None else max_new_tokens - 1
        for j in range(1, last + 1):                      # the decision for generated token j, at position p-1+j
            chosen = logits[i, p - 1 + j, out.tokens[i, j]]
            rows_h.append(hidden[i, p - 1 + j])
            rows_t.append(chosen + (margin if j == ends[i] else -margin))
    Hm, target = np.stack(rows_h), np.asarray(rows_t)
    assert Hm.shape[0] <= Hm.shape[1], "too many decisions for an exact fit; use fewer rows or steps"
    e = np.linalg.lstsq(Hm, target, rcond=None)[0].astype(np.float32)
    achieved = margin - float(np.max(np.abs(Hm @ e.astype(np.float64) - target)))
    params = jax.tree_util.tree_map(lambda x: np.array(x, np.float32), gen.params)
    params["decoder"]["embed_tokens"]["embedding"][spec.eot] = e
    gen.params = params
    with torch.no_grad():
        hf_model.model.decoder.embed_tokens.weight[spec.eot] = torch.from_numpy(e)
    assert hf_model.proj_out.weight.data_ptr() == hf_model.model.decoder.embed_tokens.weight.data_ptr()
    return achieved


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def tiny_loaded_model(seed: int = 0, decoder_layers: int = 3):
    """A tiny random-weight LoadedModel (d_model 32, every leaf random) with builtin:whisper-tiny.en's tokenizer
    and generation settings: small enough to save, export and load in a fraction of a second."""
    import json

    import jax

    from dwjax.models.whisper import init_params
    from dwjax.text.tokenizer import WhisperTokenizer
    from dwjax.weights.loading import LoadedModel, _builtin
    cfg = WhisperConfig(n_mels=80, n_audio_ctx=8, n_text_ctx=16, d_model=32, encoder_layers=2,
                        decoder_layers=decoder_layers, encoder_heads=2, decoder_heads=4, ffn_dim=128,
                        vocab_size=51864)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                    init_params(cfg, jax.random.PRNGKey(seed)))
    directory, _ = _builtin("builtin:whisper-tiny.en")
    generation = json.loads((directory / "config.json").read_text())
    return LoadedModel(cfg, params, WhisperTokenizer.from_dir(directory, vocab_size=cfg.vocab_size), generation,
                       f"tiny-random-{seed}")
