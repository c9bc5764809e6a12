"""Distillation losses vs a float64 numpy reference, with temperature, padding and prompt masks."""
import numpy as np
import pytest

from dwjax import losses
from dwjax.config import LossConfig


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _batch(seed=0, b=4, t=10, vocab=37):
    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, vocab, (b, t + 1))
    prompt = np.array([1, 3, 4, 2])[:b]          # SOT only; SOT lang task; SOT lang task notimestamps; ...
    length = np.array([11, 9, 5, 8])[:b]         # row 0 fills the width, the others are padded
    batch = losses.make_decoder_batch(seqs, prompt, length)
    teacher = rng.normal(0, 3, (b, t, vocab)).astype(np.float32)
    student = rng.normal(0, 3, (b, t, vocab)).astype(np.float32)
    return seqs, prompt, length, batch, teacher, student


def test_batch_layout_masks_prompt_and_padding():
    seqs, prompt, length, batch, _, _ = _batch()
    np.testing.assert_array_equal(batch["decoder_input_ids"], seqs[:, :-1])
    np.testing.assert_array_equal(batch["labels"], seqs[:, 1:])
    # row 1: 3 prompt tokens (SOT lang task), 9 real -> targets seq[3..8] at positions 2..7
    np.testing.assert_array_equal(batch["loss_mask"][1], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    # row 0: SOT only, no padding -> every target learned
    np.testing.assert_array_equal(batch["loss_mask"][0], np.ones(10))
    # row 2: 4 prompt tokens, 5 real -> only the EOT target (seq[4]) at position 3
    np.testing.assert_array_equal(batch["loss_mask"][2], [0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    assert batch["loss_mask"].sum() == sum(l - p for p, l in zip(prompt, length))
    with pytest.raises(ValueError):
        losses.make_decoder_batch(seqs, [0, 1, 1, 1], length)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_sum_matches_float64_reference(temperature):
    _, _, _, batch, teacher, student = _batch()
    mask = batch["loss_mask"]
    lt, ls = _log_softmax64(teacher / temperature), _log_softmax64(student / temperature)
    ref = ((np.exp(lt) * (lt - ls)).sum(-1) * mask).sum()
    got = float(losses.kl_sum(teacher, student, mask, temperature))
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    # masked positions contribute nothing, whatever their logits
    wild = np.where(mask[..., None] > 0, student, 1e4).astype(np.float32)
    np.testing.assert_allclose(float(losses.kl_sum(teacher, wild, mask, temperature)), ref, rtol=2e-5)
    assert float(losses.kl_sum(teacher, teacher, mask, temperature)) == pytest.approx(0.0, abs=1e-4)


def test_ce_sum_matches_float64_reference():
    _, _, _, batch, _, student = _batch(seed=1)
    labels, mask = batch["labels"].copy(), batch["loss_mask"]
    ls = _log_softmax64(student)
    ref = -(np.take_along_axis(ls, labels[..., None], -1)[..., 0] * mask).sum()
    labels[mask == 0] = -100          # ignored ids at masked positions are allowed
    np.testing.assert_allclose(float(losses.ce_sum(student, labels, mask)), ref, rtol=1e-5)


def test_mse_sum_and_terms():
    rng = np.random.default_rng(2)
    _, _, _, batch, teacher, student = _batch(seed=2)
    mask = batch["loss_mask"]
    th, sh = rng.normal(size=(4, 10, 8)).astype(np.float32), rng.normal(size=(4, 10, 8)).astype(np.float32)
    ref = (((th.astype(np.float64) - sh) ** 2).mean(-1) * mask).sum()
    np.testing.assert_allclose(float(losses.mse_sum(th, sh, mask)), ref, rtol=1e-5)
    terms = losses.distill_loss_terms(teacher, student, batch["labels"], mask, 2.0, th, sh)
    assert float(terms["n_tokens"]) == mask.sum()
    cfg = LossConfig(kl_weight=0.7, ce_weight=0.3, temperature=2.0, mse_weight=0.5)
    want = (0.7 * 4.0 * terms["kl_sum"] + 0.3 * terms["ce_sum"] + 0.5 * terms["mse_sum"]) / mask.sum()
    np.testing.assert_allclose(float(losses.total_loss(terms, cfg)), float(want), rtol=1e-6)


def test_sums_add_over_splits_then_divide_once():
    """Splitting a batch (devices, microbatches) and adding the sums gives the full-batch loss exactly once divided."""
    _, _, _, batch, teacher, student = _batch(seed=3)
    cfg = LossConfig()
    full = losses.distill_loss_terms(teacher, student, batch["labels"], batch["loss_mask"], 2.0)
    parts = [losses.distill_loss_terms(teacher[i:i + 1], student[i:i + 1], batch["labels"][i:i + 1],
                                       batch["loss_mask"][i:i + 1], 2.0) for i in range(4)]
    summed = {k: sum(float(p[k]) for p in parts) for k in full}
    np.testing.assert_allclose(float(losses.total_loss(summed, cfg)), float(losses.total_loss(full, cfg)), rtol=1e-5)
    # a mean of per-row means would differ (rows have different token counts)
    per_row = np.mean([float(losses.total_loss(p, cfg)) for p in parts])
    assert abs(per_row - float(losses.total_loss(full, cfg))) > 1e-3
