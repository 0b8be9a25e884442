"""The S2S transformer: delay pattern, training layout, KV cache, streaming generation, errors.
Tiny configs on the CPU: the whole file runs in seconds."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from models.s2s_transformer import (
    S2SConfig,
    S2STransformer,
    build_training_example,
    collate_examples,
    delay,
    undelay,
)

TINY = S2SConfig(n_codebooks=4, codebook_size=256, d_model=64, n_layers=2, n_heads=4, max_len=128)


def tiny_model(seed: int = 0) -> S2STransformer:
    torch.manual_seed(seed)
    return S2STransformer(TINY).eval()


def random_codes(*shape: int, seed: int = 0) -> Tensor:
    return torch.randint(0, TINY.codebook_size, shape, generator=torch.Generator().manual_seed(seed))


def ids(*values: int) -> Tensor:
    return torch.tensor(values)


def bias_eos(model: S2STransformer, bias_at_call: Callable[[int], Tensor]) -> None:
    """Add bias_at_call(n) (B,) to codebook 0's EOS logit at the n-th head call (0 is the prompt,
    n is reply step n), to make or forbid an end at a chosen frame."""
    calls = iter(range(10**6))

    def hook(module: torch.nn.Module, inputs: tuple[Tensor], output: Tensor) -> Tensor:
        output = output.clone()
        output[..., TINY.eos_id] += bias_at_call(next(calls)).view(-1, *[1] * (output.dim() - 2))
        return output

    model.heads[0].register_forward_hook(hook)


def test_delay_undelay_roundtrip():
    codes = random_codes(3, 4, 7)
    delayed = delay(codes, TINY.pad_id)
    assert delayed.shape == (3, 4, 10)
    for k in range(4):
        assert torch.equal(delayed[:, k, k : k + 7], codes[:, k])
        assert (delayed[:, k, :k] == TINY.pad_id).all() and (delayed[:, k, k + 7 :] == TINY.pad_id).all()
    assert torch.equal(undelay(delayed), codes)
    one = random_codes(1, 5)
    assert torch.equal(delay(one, 0), one)  # one codebook: no delay


def test_training_example_layout_and_mask():
    config = S2SConfig(n_codebooks=3, codebook_size=10, d_model=32, n_layers=1, n_heads=2, max_len=64)
    P, B, E = config.pad_id, config.bos_id, config.eos_id
    user, reply = torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([[7, 8], [9, 0], [1, 2]])
    inputs, targets, mask = build_training_example(user, reply, config)
    # slot | user delayed | BOS | reply + EOS frame delayed; inputs drop the last token
    sequence = torch.tensor([
        [P, 1, 2, P, P, B, 7, 8, E, P, P],
        [P, P, 3, 4, P, B, P, 9, 0, E, P],
        [P, P, P, 5, 6, B, P, P, 1, 2, E],
    ])
    assert inputs.shape == targets.shape == mask.shape == (3, config.sequence_length(2, 2))
    assert torch.equal(inputs, sequence[:, :-1])
    expected = sequence[:, 1:].clone()
    expected[:, :5] = P  # the user turn and BOS are never targets
    assert torch.equal(targets, expected)
    assert torch.equal(mask, expected != P)
    assert mask.sum() == 3 * (2 + 1)  # every codebook: the reply's codes and its EOS
    assert torch.equal(undelay(targets[:, 5:])[:, :2], reply)

    batch = collate_examples([build_training_example(user, reply, config),
                              build_training_example(user[:, :1], reply[:, :1], config)], config)
    assert [t.shape for t in batch] == [(2, 3, 10)] * 3
    assert torch.equal(batch[0][0], inputs) and (batch[0][1, :, 8:] == P).all()
    assert (batch[1][1, :, 8:] == P).all() and not batch[2][1, :, 8:].any()
    assert batch[2].sum() == 3 * (2 + 1) + 3 * (1 + 1)


def test_kv_cache_matches_full_forward():
    model = tiny_model()
    inputs, _, _ = build_training_example(random_codes(4, 9), random_codes(4, 6, seed=1), TINY)
    tokens = torch.stack([inputs, inputs.flip(-1).clamp(max=TINY.codebook_size)])
    speaker, emotion = ids(1, 3), ids(0, 8)
    with torch.no_grad():
        full = model(tokens, speaker, emotion)
        cache = model.init_cache(2)
        steps = [model(tokens[..., i : i + 1], speaker, emotion, cache) for i in range(tokens.shape[2])]
        stepped = torch.cat(steps, dim=2)
        assert cache.length == tokens.shape[2]
        cache = model.init_cache(2, max_len=tokens.shape[2])
        chunks = tokens.split([11, 3, 1, tokens.shape[2] - 15], dim=2)  # a prefill, then chunks of any size
        chunked = torch.cat([model(chunk, speaker, emotion, cache) for chunk in chunks], 2)
        cache = model.init_cache(2)
        prefilled = [model(tokens[..., :11], speaker, emotion, cache)]  # a prefill, then steps
        prefilled += [model(tokens[..., i : i + 1], speaker, emotion, cache) for i in range(11, tokens.shape[2])]
    assert full.shape == (2, 4, tokens.shape[2], TINY.vocab_size)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(prefilled, dim=2), full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full[0], full[1, :, :, :])  # conditioning and tokens matter


def test_untrained_perplexity_is_near_vocab_size():
    model = tiny_model()
    pairs = [(random_codes(4, 20, seed=s), random_codes(4, 15, seed=s + 9)) for s in range(4)]
    batch = collate_examples([build_training_example(user, reply, TINY) for user, reply in pairs], TINY)
    with torch.no_grad():
        perplexity = math.exp(model.loss(model(batch[0], ids(0, 1, 2, 3), ids(0, 4, 8, 2)), batch[1]).item())
    assert 0.85 * TINY.vocab_size < perplexity < 1.15 * TINY.vocab_size


@pytest.fixture(scope="module")
def overfit() -> tuple[S2STransformer, Tensor, Tensor, list[float]]:
    """A tiny model trained on one pair until it knows the reply by heart; with its loss curve."""
    model = tiny_model(seed=1).train()
    user, reply = random_codes(4, 6, seed=2), random_codes(4, 5, seed=3)
    inputs, targets, _ = build_training_example(user, reply, TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model.loss(model(inputs[None], ids(1), ids(5)), targets[None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), user, reply, losses


def test_adam_steps_reduce_the_loss(overfit):
    losses = overfit[3]
    assert losses[5] < losses[0] - 0.5
    assert losses[-1] < 0.05


def test_overfit_reply_is_spoken_and_ends_at_eos(overfit):
    model, user, reply, _ = overfit
    frames = list(model.generate(user[None], ids(1), ids(5), max_frames=30, temperature=0))
    assert len(frames) == reply.shape[1]  # it stopped at EOS, well before max_frames
    assert torch.equal(torch.cat(frames, dim=2)[0], reply)


def test_generation_respects_max_frames_and_streams():
    model = tiny_model()
    bias_eos(model, lambda call: torch.tensor(-1e4))  # never ends by itself
    calls = []
    model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    generation = model.generate(random_codes(1, 4, 8), ids(2), ids(7), max_frames=6, top_k=20,
                                generator=torch.Generator().manual_seed(0))
    first = next(generation)
    assert len(calls) == TINY.n_codebooks  # the prompt, then K-1 steps: frame 0 is out at once
    frames = [first, *generation]
    assert len(frames) == 6 and all(f.shape == (1, 4, 1) for f in frames)
    assert all(((f >= 0) & (f < TINY.codebook_size)).all() for f in frames)
    assert len(calls) == TINY.n_codebooks + 5  # no step beyond the last frame


def test_generation_stops_each_sequence_at_its_eos():
    model = tiny_model()
    ends = torch.tensor([2, 5])  # reply lengths: codebook 0 says EOS at these steps
    bias_eos(model, lambda call: torch.where(ends == call, 1e4, -1e4))
    frames = list(model.generate(random_codes(2, 4, 5), ids(0, 3), ids(1, 2), max_frames=10, temperature=0))
    assert len(frames) == 5
    reply = torch.cat(frames, dim=2)
    assert (reply[0, :, :2] < TINY.codebook_size).all() and (reply[0, :, 2:] == TINY.pad_id).all()
    assert (reply[1] < TINY.codebook_size).all()


def test_greedy_is_deterministic_and_batches_shape():
    model = tiny_model()
    user = random_codes(4, 4, 10)
    speaker, emotion = ids(0, 1, 2, 3), ids(0, 3, 6, 8)

    def run(**sampling) -> Tensor:
        return torch.cat(list(model.generate(user, speaker, emotion, max_frames=8, **sampling)), dim=2)

    greedy = run(temperature=0)
    assert greedy.shape[:2] == (4, 4) and 1 <= greedy.shape[2] <= 8
    assert torch.equal(greedy, run(temperature=0)) and torch.equal(greedy, run(top_k=1))
    seeded = run(temperature=0.9, top_k=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seeded, run(temperature=0.9, top_k=50, generator=torch.Generator().manual_seed(3)))
    assert ((seeded >= 0) & (seeded <= TINY.pad_id)).all()  # codes, or PAD after a sequence's end


def test_invalid_inputs_raise_clear_errors():
    model = tiny_model()
    user = random_codes(2, 4, 5)

    def generate(user=user, speaker=ids(0, 1), emotion=ids(0, 1), max_frames=4) -> None:
        next(model.generate(user, speaker, emotion, max_frames))

    with pytest.raises(ValueError, match="speaker id 4 is out of range"):
        generate(speaker=ids(0, 4))
    with pytest.raises(ValueError, match="emotion id 9 is out of range"):
        generate(emotion=ids(9, 1))
    with pytest.raises(ValueError, match="emotion id -1"):
        model(build_training_example(user[0], user[0], TINY)[0][None], ids(0), ids(-1))
    with pytest.raises(ValueError, match="speaker must have shape"):
        generate(speaker=ids(0))
    with pytest.raises(ValueError, match=r"user_codes must lie in \[0, 256\)"):
        generate(user=user.clone().fill_(256))
    with pytest.raises(ValueError, match="4 codebooks"):
        generate(user=user[:, :3])
    with pytest.raises(ValueError, match="the user turn is too long"):
        generate(user=random_codes(2, 4, 125))
    with pytest.raises(ValueError, match="at most 115 reply frames fit"):
        generate(max_frames=200)
    with pytest.raises(ValueError, match="more than max_len"):
        build_training_example(random_codes(4, 100), random_codes(4, 50), TINY)


def test_default_config_size():
    model = S2STransformer(S2SConfig())
    assert model.config.vocab_size == 259 and model.config.eos_id == 258
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert 3_000_000 < model.num_parameters() < 5_000_000


@pytest.mark.parametrize(("dropout", "attention_dropout"), [(0.3, 0.0), (0.0, 0.3)])
def test_each_dropout_acts_in_training_only(dropout: float, attention_dropout: float):
    """Residual and attention dropout are separate settings (attention dropout is slow on the CPU):
    each alone makes training passes random, and neither touches evaluation."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = S2STransformer(replace(TINY, dropout=dropout, attention_dropout=attention_dropout))
    inputs, _, _ = build_training_example(random_codes(4, 9), random_codes(4, 6, seed=1), TINY)
    tokens, speaker, emotion = inputs[None], ids(1), ids(2)
    model.train()
    assert not torch.allclose(model(tokens, speaker, emotion), model(tokens, speaker, emotion))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, speaker, emotion), model(tokens, speaker, emotion))
    attention = model.blocks[0].attn
    assert attention.dropout == attention_dropout


GUIDABLE = S2SConfig(n_codebooks=4, codebook_size=256, d_model=64, n_layers=2, n_heads=4, max_len=128,
                     conditioning="every_step")


def test_every_step_conditioning_reaches_each_position_the_same_way_in_every_path():
    torch.manual_seed(0)
    model = S2STransformer(GUIDABLE).eval()
    user, speaker, emotion = random_codes(1, 4, 9), ids(2), ids(5)
    tokens = random_codes(1, 4, 3, seed=3)
    with torch.inference_mode():
        slots = model.init_slots(2)
        model.prefill_row(slots, 1, user, speaker, emotion)
        by_row = [model.step_rows(slots, slice(1, 2), tokens[..., i: i + 1]) for i in range(3)]
        cache = model.init_cache(1)
        pad, bos = GUIDABLE.pad_id, GUIDABLE.bos_id
        prompt = torch.cat([torch.full((1, 4, 1), pad), delay(user, pad), torch.full((1, 4, 1), bos)], dim=2)
        model(prompt, speaker, emotion, cache)
        by_cache = [model._hidden(tokens[..., i: i + 1], speaker, emotion, cache) for i in range(3)]
        other = model.init_cache(1)
        model(prompt, speaker, ids(6), other)
        other_emotion = model._hidden(tokens[..., :1], speaker, ids(6), other)
    for a, b in zip(by_row, by_cache):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(other_emotion, by_cache[0], atol=1e-3)   # the step itself hears the emotion


def test_guidance_needs_a_guidable_model_and_changes_greedy_replies():
    torch.manual_seed(0)
    model = S2STransformer(GUIDABLE).eval()
    user, speaker, emotion = random_codes(2, 4, 6), ids(0, 3), ids(1, 8)

    def reply(guidance: float) -> Tensor:
        return torch.cat(list(model.generate(user, speaker, emotion, max_frames=6, temperature=0,
                                             guidance=guidance)), dim=2)

    plain = reply(1.0)
    assert plain.shape == (2, 4, 6)
    with torch.no_grad():
        model.speaker_embedding.weight.mul_(20)   # make the condition matter for this random model
    assert not torch.equal(reply(1.0), reply(4.0))
    assert model.generate(user, ids(4, 4), ids(9, 9), max_frames=2) is not None   # null ids are valid here
    with pytest.raises(ValueError, match="guidance 2.0 needs a model trained with conditioning 'every_step'"):
        next(tiny_model().generate(user, speaker, emotion, max_frames=2, guidance=2.0))
    with pytest.raises(ValueError, match="speaker id 4 is out of range"):
        next(tiny_model().generate(user, ids(4, 0), emotion, max_frames=2))
    with pytest.raises(ValueError, match="conditioning must be 'slot' or 'every_step'"):
        S2SConfig(conditioning="film")
