"""Logit controls (spec/controls.py): each control as TensorRT-LLM's penalty kernel and bad-word ban define it,
and the rule that makes them lossless under speculation: a verify pass controls row j with the history that
includes the drafts before it, i.e. exactly as plain decoding controls that position."""
import pytest
import torch

from dspark_trt.spec.controls import History, LogitControls, apply_controls
from dspark_trt.spec.sampling import warp_probs

V = 8
INF = float("inf")


def one_step(logits: torch.Tensor, history: History, temperature: float = 1.0) -> torch.Tensor:
    """A plain decoding step: one row, no drafts."""
    return apply_controls(logits.reshape(1, -1), torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long),
                          [history], torch.tensor([temperature]))[0]


def tensorrt_llm_penalties(logits, counts, temperature, repetition, presence, frequency):
    """batchApplyPenalty's order, written out: divide by the temperature, then penalise seen tokens."""
    x = logits / temperature
    seen = counts > 0
    x = torch.where(seen, torch.where(x < 0, x * repetition, x / repetition), x)
    return x - seen * presence - frequency * counts


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_penalties_give_tensorrt_llms_distribution(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 3
    tokens = [1, 1, 2, 5, 1, 6]  # prompt and generated tokens alike count as seen
    counts = torch.bincount(torch.tensor(tokens), minlength=V).float()
    controls = LogitControls(repetition_penalty=1.8, presence_penalty=0.7, frequency_penalty=0.4)
    ours = warp_probs(one_step(logits, History(tokens, 2, controls), temperature).reshape(1, -1), temperature)
    expected = torch.softmax(tensorrt_llm_penalties(logits, counts, temperature, 1.8, 0.7, 0.4), -1)
    torch.testing.assert_close(ours[0], expected)
    # greedy takes the argmax of the logits penalised at temperature 1 (TensorRT-LLM's top-k 1 at T = 1)
    greedy = one_step(logits, History(tokens, 2, controls), 0.0).argmax()
    assert greedy == tensorrt_llm_penalties(logits, counts, 1.0, 1.8, 0.7, 0.4).argmax()


def test_repetition_divides_positive_and_multiplies_negative_logits_of_seen_tokens_once():
    logits = torch.tensor([2.0, -1.0, 3.0, -2.0, 1.0, 0.0, 4.0, -3.0])
    out = one_step(logits, History([0, 1, 1, 1, 5], 0, LogitControls(repetition_penalty=2.0)))
    assert out.tolist() == [1.0, -2.0, 3.0, -2.0, 1.0, 0.0, 4.0, -3.0]
    assert one_step(logits, History([0, 1], 0, LogitControls(repetition_penalty=0.5))).tolist()[:2] == [4.0, -0.5]


def test_min_tokens_masks_the_end_ids_until_enough_tokens_were_generated():
    logits = torch.zeros(V)
    controls = LogitControls(min_tokens=3, end_ids=(4, 7))
    for generated, masked in ((0, True), (2, True), (3, False), (5, False)):
        out = one_step(logits, History([1] * (generated + 2), generated, controls))
        assert (out[[4, 7]] == -INF).all() == masked and (out[:4] == 0).all()
    assert not LogitControls(min_tokens=3).active  # nothing to mask: no end id


def test_bad_words_mask_a_words_last_token_after_its_prefix():
    controls = LogitControls(bad_words=((3,), (5, 6), (1, 2, 4)))

    def masked(tokens):
        return set((one_step(torch.zeros(V), History(tokens, 0, controls)) == -INF).nonzero().flatten().tolist())

    assert masked([0]) == {3}  # one-token words everywhere
    assert masked([0, 5]) == {3, 6}
    assert masked([5, 0]) == {3}
    assert masked([1, 2]) == {3, 4} and masked([7, 2]) == {3}
    assert masked([2]) == {3}  # a prefix longer than the history never matches
    long_word = LogitControls(bad_words=((1, 2, 4), (5, 5, 5, 5, 6)))  # a longer word than the history
    assert (one_step(torch.zeros(V), History([0, 1, 2], 0, long_word)) == -INF).nonzero().flatten().tolist() == [4]


def test_rows_without_controls_are_left_as_they_are():
    logits = torch.randn(5, V)
    offsets = torch.tensor([0, 2, 3, 5])
    drafts = torch.tensor([1, 2, 3])
    assert apply_controls(logits, offsets, drafts, [None, None, None], torch.ones(3)) is logits
    neutral = History([1, 2], 1, LogitControls())
    out = apply_controls(logits, offsets, drafts, [None, History([1], 0, LogitControls(presence_penalty=1.0)),
                                                   neutral], torch.ones(3))
    assert torch.equal(out[[0, 1, 3, 4]], logits[[0, 1, 3, 4]]) and not torch.equal(out[2], logits[2])


def test_a_verify_pass_controls_each_row_as_plain_decoding_controls_that_position():
    """Row j of a request after [history, d_0 .. d_{j-1}]: penalties count the drafts, min_tokens counts them
    as generated, a bad word's prefix may end in them. Random ragged passes, every control at once."""
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        n_req = int(torch.randint(1, 5, (1,), generator=g))
        ells = torch.randint(0, 6, (n_req,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), (ells + 1).cumsum(0)])
        logits = torch.randn(int(offsets[-1]), V, generator=g) * 2
        drafts = torch.randint(0, V, (int(ells.sum()),), generator=g)
        temperature = torch.rand(n_req, generator=g) * 1.5
        histories = []
        for r in range(n_req):
            tokens = torch.randint(0, V, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            own = drafts[int(offsets[r]) - r: int(offsets[r + 1]) - 1 - r].tolist()
            words = ((int(torch.randint(0, V, (1,), generator=g)),), tuple((tokens + own)[-2:]) + (7,),
                     tuple(own[:1]) + (6,))
            controls = LogitControls(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2,
                                     min_tokens=int(torch.randint(0, 8, (1,), generator=g)), end_ids=(0, 3),
                                     bad_words=words)
            histories.append(History(tokens, int(torch.randint(0, len(tokens) + 1, (1,), generator=g)), controls))
        out = apply_controls(logits, offsets, drafts, histories, temperature)
        for r, history in enumerate(histories):
            own = drafts[int(offsets[r]) - r: int(offsets[r + 1]) - 1 - r].tolist()
            for j in range(int(ells[r]) + 1):
                plain = History(history.tokens + own[:j], history.generated + j, history.controls)
                row = int(offsets[r]) + j
                torch.testing.assert_close(out[row], one_step(logits[row], plain, float(temperature[r])))
