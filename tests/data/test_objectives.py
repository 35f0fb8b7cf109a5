"""Batch construction of each objective on tiny inputs, with the expected output worked out by hand.

The random part of each corruption (a noise mask, a span plan, a sentence order, a split point) is fixed
in the test; what the objective builds from it is checked exactly. The random parts are checked by
their invariants and, where they are a distribution, statistically.
"""

import numpy as np
import pytest

from tests.data.data_testing import CharTokenizer
from jaxllm.config import DataConfig, DenoiserConfig, ObjectiveConfig
from jaxllm.data import denoising, masking
from jaxllm.data.objectives import EncoderDecoderExamples, encoder_decoder_lengths, special_ids

# ------------------------------------------------------------------------------------------ span (T5)


def test_span_corruption_of_the_t5_paper_example():
    # T5 paper, figure 2: "Thank you for inviting me to your party last week ." with "for inviting" and
    # "last" dropped. Inputs keep the rest with one sentinel per dropped span; targets give each dropped
    # span after its sentinel, and (T5's code) a sentinel for the trailing non-noise run "week .".
    words = "Thank you for inviting me to your party last week .".split()
    ids = {w: i + 10 for i, w in enumerate(words)}
    tokens = np.array([ids[w] for w in words], np.int32)
    noise = np.array([w in ("for", "inviting", "last") for w in words])
    X, Y, Z = 99, 98, 97  # T5 counts its sentinels down from the top of the vocabulary
    inputs, targets = denoising.span_corruption(tokens, noise, np.array([X, Y, Z]))
    t = ids  # Thank you <X> me to your party <Y> week .  ->  <X> for inviting <Y> last <Z>
    assert inputs.tolist() == [t["Thank"], t["you"], X, t["me"], t["to"], t["your"], t["party"], Y, t["week"], t["."]]
    assert targets.tolist() == [X, t["for"], t["inviting"], Y, t["last"], Z]


def test_spans_to_mask_alternates_starting_with_non_noise():
    # non-noise spans [2, 1], noise spans [1, 3]: 2 kept, 1 noise, 1 kept, 3 noise.
    mask = denoising.spans_to_mask(np.array([2, 1]), np.array([1, 3]))
    assert mask.tolist() == [False, False, True, False, True, True, True]


def test_span_counts_use_t5_rounding():
    # 568 tokens: round(568 * 0.15) = round(85.2) = 85 noise tokens in round(85 / 3) = round(28.3) = 28
    # spans; encoder 568 - 85 + 28 + EOS = 512, decoder 85 + 28 + EOS = 114.
    assert denoising.span_counts(568, 0.15, 3.0) == (85, 28)
    assert denoising.span_lengths(568, 0.15, 3.0) == (512, 114)
    # 10 tokens at density 0.25: 2.5 rounds half to even, 2 noise tokens; 2 / 3 rounds to 1 span.
    assert denoising.span_counts(10, 0.25, 3.0) == (2, 1)
    # Degenerate lengths are clamped as in T5: at least one noise token and one kept, at least one span.
    assert denoising.span_counts(2, 0.01, 3.0) == (1, 1)
    assert denoising.span_lengths(1, 0.15, 3.0) == (2, 2)  # [t, EOS], [sentinel, EOS]


def test_derived_lengths_match_t5_random_spans_helper():
    # t5.data.preprocessors.random_spans_helper(inputs_length=512, 0.15, 3, 1, 1) == (568, 114).
    lengths = encoder_decoder_lengths(DataConfig(seq_len=512, objective=ObjectiveConfig(name="span")))
    assert (lengths.encoder, lengths.decoder, lengths.chunk, lengths.spans) == (512, 114, 568, 28)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 20, 141, 568])
def test_random_spans_noise_mask_invariants(length):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mask = denoising.random_spans_noise_mask(length, 0.15, 3.0, rng)
        noise, spans = denoising.span_counts(length, 0.15, 3.0)
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        if length > 1:  # (a single token is never noise: T5 pads it to 2 and cuts the mask back)
            assert (mask.sum(), starts.sum()) == (noise, spans)
            assert not mask[0] and mask[-1]  # non-noise first, noise last
        tokens = np.arange(length, dtype=np.int32)
        inputs, targets = denoising.span_corruption(tokens, mask, np.arange(1000, 1100))
        assert (len(inputs) + 1, len(targets) + 1) == denoising.span_lengths(length, 0.15, 3.0)


def test_span_examples_frame_with_eos_and_shift_the_decoder(monkeypatch):
    cfg = DataConfig(seq_len=64, objective=ObjectiveConfig(name="span"))  # room for 3 spans
    tok = CharTokenizer()  # EOS = 2, pad (the decoder start) = 2 as well: no pad token, so EOS
    ids = special_ids(cfg, tok)
    s0, s1 = ids.sentinels[:2]
    # Fix the noise mask: a b [c d] e [f]
    monkeypatch.setattr(denoising, "random_spans_noise_mask", lambda n, d, m, rng: np.array([0, 0, 1, 1, 0, 1], bool))
    make = EncoderDecoderExamples(cfg, tok, ids, encoder_decoder_lengths(cfg), process_index=0)
    a, b, c, d, e, f = map(ord, "abcdef")
    example = make(0, np.array([a, b, c, d, e, f], np.int32))
    assert example["encoder_inputs"].tolist() == [a, b, s0, e, s1, 2]
    assert example["decoder_targets"].tolist() == [s0, c, d, s1, f, 2]
    assert example["decoder_inputs"].tolist() == [ids.decoder_start, s0, c, d, s1, f]
    assert {v.dtype for v in example.values()} == {np.dtype(np.int32)}


# ------------------------------------------------------------------------------------------------- MLM


def test_apply_mlm_by_hand():
    tokens = np.array([2, 10, 11, 12, 13, 3], np.int32)  # BOS a b c d EOS
    N, M, R, K = masking.NOT_SELECTED, masking.MASK, masking.RANDOM, masking.KEEP
    actions = np.array([N, M, N, R, K, N])
    random_tokens = np.array([0, 0, 0, 99, 0, 0])
    # a -> mask 50, c -> the random 99, d selected but kept.
    assert masking.apply_mlm(tokens, actions, random_tokens, 50).tolist() == [2, 50, 11, 99, 13, 3]


def test_mlm_plan_selects_round_of_maskable_and_never_others():
    maskable = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)  # 9 candidates between BOS and EOS
    rng = np.random.default_rng(0)
    # 9 * 0.15 = 1.35 -> 1; 9 * 0.5 = 4.5 -> 4 (half to even); all become MASK when mask_token_prob = 1.
    assert (masking.mlm_plan(maskable, 0.15, 1.0, 0.0, rng) == masking.MASK).sum() == 1
    actions = masking.mlm_plan(maskable, 0.5, 1.0, 0.0, rng)
    assert (actions == masking.MASK).sum() == 4 and (actions[~maskable] == 0).all()
    # A row with 2 candidates still predicts one (BERT's max(1, ...)); none without candidates.
    assert (masking.mlm_plan(np.array([0, 1, 1, 0], bool), 0.15, 0.8, 0.1, rng) > 0).sum() == 1
    assert (masking.mlm_plan(np.zeros(4, bool), 0.15, 0.8, 0.1, rng) == 0).all()


def test_mlm_split_is_80_10_10():
    rng = np.random.default_rng(1)
    actions = np.concatenate([masking.mlm_plan(np.ones(200, bool), 0.15, 0.8, 0.1, rng) for _ in range(1000)])
    selected = actions[actions > 0]
    assert len(selected) == 1000 * 30  # exactly round(200 * 0.15) per row
    shares = [np.mean(selected == a) for a in (masking.MASK, masking.RANDOM, masking.KEEP)]
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=0.01)  # 30000 draws: std <= 0.0023


def _mask_rows(seed=0, **probs):
    probs = {"mask_prob": 0.5, "mask_token_prob": 0.0, "random_token_prob": 1.0, **probs}
    # The only ordinary token is 7: every random replacement is 7.
    return masking.MaskRows(seed, 0, mask_id=50, ordinary_ids=np.array([7]), no_predict={0, 2, 3}, **probs)


ROW = {  # two documents [BOS a b c EOS] [BOS d e EOS] and one pad
    "tokens": np.array([2, 10, 11, 12, 3, 2, 20, 21, 3, 0], np.int32),
    "tokens_segment_ids": np.array([1, 1, 1, 1, 1, 2, 2, 2, 2, 0], np.int32),
    "tokens_positions": np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 0], np.int32),
}


def test_mask_rows_tiny_example():
    out = _mask_rows()(5, ROW)
    # 5 maskable tokens (a b c d e), 5 * 0.5 = 2.5 -> 2 selected, each replaced by the random token 7.
    selected = out["loss_mask"] == 1
    assert selected.sum() == 2 and np.isin(ROW["tokens"][selected], [10, 11, 12, 20, 21]).all()
    np.testing.assert_array_equal(out["inputs"], np.where(selected, 7, ROW["tokens"]))
    np.testing.assert_array_equal(out["targets"], ROW["tokens"])  # the original at every position
    np.testing.assert_array_equal(out["segment_ids"], ROW["tokens_segment_ids"])
    np.testing.assert_array_equal(out["positions"], ROW["tokens_positions"])
    assert out["loss_mask"].dtype == np.float32 and out["inputs"].dtype == np.int32
    # With every selected token masked instead: the same positions (same seed and index) become 50.
    masked = _mask_rows(mask_token_prob=1.0, random_token_prob=0.0)(5, ROW)
    np.testing.assert_array_equal(masked["inputs"], np.where(selected, 50, ROW["tokens"]))


def test_mask_rows_depend_on_seed_and_row_index_only():
    def selected(seed, index):
        return tuple(_mask_rows(seed)(index, ROW)["loss_mask"].tolist())

    assert selected(0, 5) == selected(0, 5)
    assert len({selected(0, i) for i in range(20)}) > 3  # another row index: other masks
    assert len({selected(s, 5) for s in range(20)}) > 3  # another seed: other masks


# ------------------------------------------------------------------------------------------------ BART


def test_sentence_bounds_and_permutation_by_hand():
    tok = CharTokenizer()
    tokens = np.array(tok.encode("Ab. Cd!\nEf"), np.int32)
    ends = denoising.SentenceEnds(tok.decode)(tokens)
    # Sentences: "Ab." | " Cd!\n" (the "!" and newline end it together) | "Ef" (the unfinished tail).
    bounds = denoising.sentence_bounds(ends)
    assert bounds.tolist() == [0, 3, 8, 10]
    assert tok.decode(denoising.permute_sentences(tokens, bounds, np.array([2, 0, 1]))) == "EfAb. Cd!\n"


def test_infill_by_hand():
    tokens = np.arange(10, 20, dtype=np.int32)  # 10 11 ... 19
    # (1, 2): 11 12 -> one mask; (5, 0): a mask inserted before 15; (7, 3): 17 18 19 -> one mask.
    out = denoising.infill(tokens, [(1, 2), (5, 0), (7, 3)], mask_id=50)
    assert out.tolist() == [10, 50, 13, 14, 50, 15, 16, 50]


def test_infilling_plan_covers_the_ratio_with_poisson_spans():
    rng = np.random.default_rng(0)
    for _ in range(50):
        spans = denoising.infilling_plan(40, 0.3, 3.0, rng)
        assert sum(n for _, n in spans) == 12  # round(40 * 0.3)
        ends = [s + n for s, n in spans]
        assert all(0 <= s <= 40 for s, _ in spans) and ends[-1] <= 40
        assert all(e <= s for e, (s, _) in zip(ends, spans[1:]))  # sorted, never overlapping
    lengths = [n for _ in range(20) for _, n in denoising.infilling_plan(10_000, 0.3, 3.0, rng)]
    assert 2.8 < np.mean(lengths) < 3.2  # Poisson(3), the rare trimmed last span aside
    assert 0.03 < np.mean(np.array(lengths) == 0) < 0.07  # P(0) = e^-3 = 0.05: insertions
    # Insertions beyond max_spans spans are dropped; spans that cover tokens never are.
    capped = denoising.infilling_plan(10_000, 0.3, 0.5, rng, max_spans=0)
    assert sum(n for _, n in capped) == 3000 and all(n > 0 for _, n in capped)


def test_bart_example_permutes_then_infills(monkeypatch):
    cfg = DataConfig(seq_len=32, objective=ObjectiveConfig(name="bart", mask_ratio=0.0))
    tok = CharTokenizer()  # BOS 1, EOS 2
    ids = special_ids(cfg, tok)
    chunk = np.array(tok.encode("Ab.Cd!Ef"), np.int32)
    make = EncoderDecoderExamples(cfg, tok, ids, encoder_decoder_lengths(cfg), process_index=0)
    orders = set()
    for index in range(40):
        example = make(index, chunk)
        # [BOS] + a permutation of the sentences "Ab." "Cd!" "Ef" + [EOS]; nothing masked at ratio 0.
        encoder = example["encoder_inputs"]
        assert encoder[0] == 1 and encoder[-1] == 2
        orders.add(tok.decode(encoder))
        assert example["decoder_targets"].tolist() == [1, *chunk, 2]  # the original text
        assert example["decoder_inputs"].tolist() == [2, 1, *chunk]  # BART starts the decoder with EOS
    assert orders == {"Ab.Cd!Ef", "Ab.EfCd!", "Cd!Ab.Ef", "Cd!EfAb.", "EfAb.Cd!", "EfCd!Ab."}
    # A fixed plan: order [2, 0, 1] gives "EfAb.Cd!"; then span (1, 2) covers "fA" and (6, 0) inserts a
    # mask before "d": E <mask> b . C <mask> d !
    plan = (np.array([2, 0, 1]), [(1, 2), (6, 0)])
    monkeypatch.setattr(denoising, "bart_plan", lambda *args: plan)
    E, b, dot, C, d, bang = map(ord, "Eb.Cd!")
    m = ids.mask
    assert make(0, chunk)["encoder_inputs"].tolist() == [1, E, m, b, dot, C, m, d, bang, 2]


# ------------------------------------------------------------------------------------------------- UL2


def _ul2(*denoisers, seq_len=32):
    cfg = DataConfig(seq_len=seq_len, objective=ObjectiveConfig(name="ul2", denoisers=list(denoisers)))
    tok = CharTokenizer()
    ids = special_ids(cfg, tok)
    return EncoderDecoderExamples(cfg, tok, ids, encoder_decoder_lengths(cfg), 0), ids


def test_ul2_s_denoiser_splits_into_prefix_and_suffix():
    make, ids = _ul2(DenoiserConfig(kind="prefix_lm", mode_token="[S]"))
    chunk = np.array(CharTokenizer().encode("abcdefgh"), np.int32)
    splits = set()
    for index in range(60):
        example = make(index, chunk)
        encoder, targets = example["encoder_inputs"], example["decoder_targets"]
        split = len(encoder) - 2  # [S] prefix EOS
        assert 1 <= split <= 7
        assert encoder.tolist() == [ids.modes["[S]"], *chunk[:split], 2]
        assert targets.tolist() == [*chunk[split:], 2]
        splits.add(split)
    assert splits == set(range(1, 8))  # every split point occurs: uniform over 1..n-1


def test_ul2_r_denoiser_is_span_corruption_behind_its_mode_token(monkeypatch):
    monkeypatch.setattr(denoising, "random_spans_noise_mask", lambda n, d, m, rng: np.array([0, 1, 0, 1], bool))
    make, ids = _ul2(DenoiserConfig(mode_token="[R]"))
    a, b, c, d = map(ord, "abcd")
    s0, s1 = ids.sentinels[:2]
    example = make(0, np.array([a, b, c, d], np.int32))
    assert example["encoder_inputs"].tolist() == [ids.modes["[R]"], a, s0, c, s1, 2]
    assert example["decoder_targets"].tolist() == [s0, b, s1, d, 2]


def test_ul2_chooses_denoisers_by_weight_and_shares_mode_tokens():
    make, ids = _ul2(
        DenoiserConfig(mode_token="[R]", weight=3.0),
        DenoiserConfig(mean_span_length=8.0, noise_density=0.5, mode_token="[X]", weight=1.0),
        DenoiserConfig(noise_density=0.5, mode_token="[X]", weight=1.0),
    )
    assert list(ids.modes) == ["[R]", "[X]"]  # one id per distinct mode token
    chunk = np.arange(100, 120, dtype=np.int32)
    modes = [make(i, chunk)["encoder_inputs"][0] for i in range(2000)]
    share_r = np.mean(np.array(modes) == ids.modes["[R]"])
    assert abs(share_r - 0.6) < 0.04  # 3 / (3 + 1 + 1); 2000 draws: std 0.011
    assert make(7, chunk)["encoder_inputs"].tolist() == make(7, chunk)["encoder_inputs"].tolist()
