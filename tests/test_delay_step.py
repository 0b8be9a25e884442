"""The delay/EOS step rule (models.delay_step) on hand-made logits: which column each step writes,
which frame it completes, when a reply ends, and that rows at different steps do not interact."""

from __future__ import annotations

import torch
from torch import Tensor

from models.delay_step import DelayState, DelayStepper, StepOutput
from models.s2s_transformer import S2SConfig, undelay

LAYOUT = S2SConfig(n_codebooks=3, codebook_size=8, d_model=8, n_layers=1, n_heads=2, max_len=64)
K, PAD, EOS, V = LAYOUT.n_codebooks, LAYOUT.pad_id, LAYOUT.eos_id, LAYOUT.vocab_size


def favour(tokens: Tensor) -> Tensor:
    """Logits (B, K, V) whose argmax is `tokens` (B, K)."""
    return torch.nn.functional.one_hot(tokens, V).float() * 10


def run(state: DelayState, choose, steps: int) -> list[StepOutput]:
    """Greedy steps where choose(step) (B, K) is the token each codebook prefers at that step."""
    stepper = DelayStepper(LAYOUT)
    return [stepper.step(state, favour(choose(s)), 0.0, None, None) for s in range(steps)]


def reply_of(outputs: list[StepOutput], row: int = 0) -> Tensor:
    """The frames (K, T) a row emitted."""
    return torch.stack([o.frames[row] for o in outputs if o.emitted[row]], dim=1)


def started(rows: int, min_frames: int, max_frames: int) -> DelayState:
    state = DelayState.empty(rows, K)
    state.begin(slice(None), min_frames, max_frames)
    return state


def test_codebooks_are_delayed_and_eos_follows_codebook_0():
    codes = torch.arange(1, 5)  # frame f is code f + 1 in every codebook; codebook 0 says EOS at frame 4
    state = started(1, 0, 10)
    outputs = run(state, lambda s: torch.tensor([[EOS if s == 4 else codes[min(s, 3)]] + [codes[min(s - k, 3)]
                                                 for k in range(1, K)]]), 7)
    columns = torch.stack([o.tokens[0] for o in outputs], dim=1)  # (K, steps): the delayed layout
    assert columns.tolist() == [[1, 2, 3, 4, EOS, PAD, PAD],
                                [PAD, 1, 2, 3, 4, EOS, PAD],
                                [PAD, PAD, 1, 2, 3, 4, EOS]]
    assert torch.equal(reply_of(outputs), codes.expand(K, -1))
    assert torch.equal(undelay(columns[:, : 4 + K - 1]), reply_of(outputs))
    # frame f is complete at step f + K - 1; the reply ends with the step that completes its last frame
    assert [bool(o.emitted[0]) for o in outputs] == [False, False, True, True, True, True, False]
    assert [bool(o.ended[0]) for o in outputs] == [False, False, False, False, False, True, True]
    assert int(state.step[0]) == 7 and int(state.eos_frame[0]) == 4


def test_only_codebook_0_may_end_and_never_before_min_frames():
    state = started(1, 3, 10)
    outputs = run(state, lambda s: torch.full((1, K), EOS), 3 + K)  # every codebook wants EOS at once
    assert reply_of(outputs).shape == (K, 3), "EOS held back for 3 frames, then taken"
    assert ((reply_of(outputs) >= 0) & (reply_of(outputs) < LAYOUT.codebook_size)).all()
    assert [bool(o.ended[0]) for o in outputs] == [False] * 4 + [True] * 2, "ends with its last frame (step 4)"


def test_max_frames_ends_a_reply_that_never_says_eos():
    state = started(1, 0, 4)
    outputs = run(state, lambda s: torch.full((1, K), 5), 4 + K - 1)
    assert torch.equal(reply_of(outputs), torch.full((K, 4), 5))
    assert outputs[-1].ended[0] and not outputs[-2].ended[0]


def test_an_eos_at_the_first_frame_is_an_empty_reply():
    outputs = run(started(1, 0, 4), lambda s: torch.full((1, K), EOS), K)
    assert not any(bool(o.emitted[0]) for o in outputs)
    assert [bool(o.ended[0]) for o in outputs] == [False] * (K - 1) + [True], "ended when frame 0 would be out"


def test_rows_at_different_steps_equal_rows_stepped_alone():
    """The engine's case: a row that starts later, in the same state and batch, gets what it
    would get alone (the batched-equals-one-by-one contract, at the level of the rule)."""
    def choose(row: int):
        return lambda s: torch.tensor([[EOS if (row, s) == (0, 5) else (s + row) % 8] * K])

    alone = [reply_of(run(started(1, 0, 6), choose(row), 6 + K), 0) for row in (0, 1)]
    stepper = DelayStepper(LAYOUT)
    state = DelayState.empty(2, K)
    state.begin(0, 0, 6)
    got: list[list[Tensor]] = [[], []]
    for tick in range(6 + K + 2):
        if tick == 2:
            state.begin(1, 0, 6)  # row 1 joins two steps later
        live = slice(0, 1) if tick < 2 else slice(0, 2)
        steps = state.step[live].tolist()
        tokens = torch.cat([choose(row)(s) for row, s in enumerate(steps)])
        out = stepper.step(state.rows(live), favour(tokens), 0.0, None, None)
        for row in range(len(steps)):
            if out.emitted[row]:
                got[row].append(out.frames[row])
    assert alone[0].shape[1] == 5 and alone[1].shape[1] == 6  # one ends at its EOS, one at max_frames
    assert all(torch.equal(torch.stack(frames, dim=1), want) for frames, want in zip(got, alone))


def test_move_row_carries_a_reply_in_progress():
    state = started(2, 1, 5)
    run(state, lambda s: torch.tensor([[1] * K, [2] * K]), 2)
    state.move_row(1, 0)
    assert int(state.step[0]) == 2 and torch.equal(state.ring[0], state.ring[1])


def test_top_k_sampling_draws_the_masked_distribution():
    """Drawing among the k best ids gives what masking the others gives: never an id outside the
    top k, and each of those at its renormalised probability."""
    import torch

    from models.delay_step import sample

    logits = torch.randn(20, generator=torch.Generator().manual_seed(4))
    expected = torch.softmax(torch.where(logits >= logits.topk(5).values[-1], logits / 0.7, -float("inf")), -1)
    draws = sample(logits.expand(4000, 5, 20), 0.7, 5, torch.Generator().manual_seed(5))
    assert draws.shape == (4000, 5)
    counts = torch.bincount(draws.flatten(), minlength=20).double() / draws.numel()
    assert set(draws.unique().tolist()) <= set(logits.topk(5).indices.tolist())
    assert torch.allclose(counts, expected.double(), atol=0.01), (counts, expected)
    assert torch.equal(sample(logits[None], 0.0, 5, None), logits.argmax()[None])
