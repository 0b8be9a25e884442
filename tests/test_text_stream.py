"""The text stream ("inner monologue"): frame alignments of transcripts by a CTC forced aligner,
the S2S layout and step rule with text in front of the codebooks, a tiny model that learns to say
its text, and the reply's text through the serving paths (engine, session, WebSocket)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.alignment import BLANK, align_frames, fit_frames
from models.asr import CtcRecognizer, GraphemeVocab, pad_batch
from models.delay_step import TEXT_PAD, DelayState, DelayStepper
from models.s2s_transformer import S2SConfig, S2STransformer, build_training_example, collate_examples
from serving.bundle import load_bundle
from serving.engine import Engine
from serving.session import GenerationSettings, ReplySession

from .conftest import SENTENCES, run_engine, speak
from .live_server import LiveServer

TEXT = S2SConfig(n_codebooks=2, codebook_size=16, d_model=32, n_layers=1, n_heads=2, max_len=128,
                 text_stream=True, text_symbols="అబక")
GREEDY = GenerationSettings(temperature=0.0, top_k=None, max_reply_seconds=0.5, min_reply_seconds=0.1)


def collapse(labels: list[int]) -> list[int]:
    return [x for i, x in enumerate(labels) if x != BLANK and (i == 0 or labels[i - 1] != x)]


def test_forced_alignment_of_telugu_speech_is_monotone_and_covers_the_text(one_thread):
    clips = [speak(t, speaker) for t in SENTENCES[:3] for speaker in ("male_young", "female_young")]
    texts = [t for t in SENTENCES[:3] for _ in range(2)]
    vocab = GraphemeVocab.from_texts(texts)
    torch.manual_seed(0)
    model = CtcRecognizer(vocab, n_mels=40, channels=32, hidden=64, layers=1, subsample=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    audio, lengths = pad_batch(clips)
    targets = [torch.tensor(vocab.encode(t)) for t in texts]
    losses = []
    for _ in range(40):
        log_probs, frames = model(audio, lengths)
        loss = torch.nn.functional.ctc_loss(log_probs, torch.cat(targets), frames,
                                            torch.tensor([len(t) for t in targets]), zero_infinity=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], "the aligner learns"
    model.eval()
    with torch.no_grad():
        log_probs, frames = model(audio, lengths)
    for row, (clip, ids) in enumerate(zip(clips, targets)):
        assert int(frames[row]) == pytest.approx(len(clip) / 320, abs=2), "20 ms frames: the codec's rate"
        labels = align_frames(log_probs[: int(frames[row]), row], ids.tolist())
        assert labels.shape == (int(frames[row]),)
        assert collapse(labels.tolist()) == ids.tolist(), "every character, in order, once"
        starts = [i for i in range(len(labels)) if labels[i] != BLANK and (i == 0 or labels[i - 1] != labels[i])]
        assert starts == sorted(starts) and len(set(starts)) == len(ids), "monotone: one start frame each"
    assert fit_frames(labels, 5).shape == (5,) and fit_frames(labels, len(labels) + 3)[-3:].eq(BLANK).all()
    with pytest.raises(ValueError, match="do not fit"):
        align_frames(log_probs[:3, 0], ids.tolist())
    assert align_frames(log_probs[:10, 0], []).eq(BLANK).all(), "no text: no characters"


def test_align_corpus_aligns_every_transcribed_segment_and_skips_one_without_text(tiny_corpus: Path):
    import pandas as pd

    from core.config import load_params
    from tasks.training.align_corpus import align_corpus, load_alignments

    manifest = pd.read_csv(tiny_corpus / "manifest.csv")
    manifest.loc[manifest["segment_id"] == "s1--0001", "text"] = ""   # a source without a transcript
    manifest.to_csv(tiny_corpus / "manifest.csv", index=False)
    params = load_params("smoke", {"align": {"channels": 16, "hidden": 16, "layers": 1, "batch_size": 4,
                                             "max_steps": 6}})
    result = align_corpus(params, use_mlflow=False)
    assert result.metrics["segments_without_text"] == 1 and result.metrics["segments_aligned"] == 17
    vocab = GraphemeVocab(list(result.symbols))
    texts = dict(zip(manifest["segment_id"], manifest["text"].fillna("")))
    for split in ("train", "val", "test"):
        aligned = load_alignments(Path(result.out_dir), split)
        for segment_id, labels in aligned.items():
            assert collapse(labels.tolist()) == vocab.encode(texts[segment_id]), segment_id
    assert "s1--0001" not in load_alignments(Path(result.out_dir), "train")
    assert align_corpus(params, use_mlflow=False).cached, "the same corpus is not aligned twice"


def test_the_layout_puts_text_first_and_the_codebooks_one_step_later():
    user, reply = torch.randint(16, (2, 3)), torch.randint(16, (2, 4))
    text = torch.tensor([1, 1, 0, 2])
    inputs, targets, mask = build_training_example(user, reply, TEXT, text)
    none, pad, bos, eos = TEXT.text_none_id, TEXT.pad_id, TEXT.bos_id, TEXT.eos_id
    start = 1 + 3 + 3 - 1   # slot, user turn delayed over 3 streams: the BOS column
    assert inputs[:, start].tolist() == [none, bos, bos]
    assert inputs[0, 1:4].tolist() == [TEXT_PAD] * 3, "the user's text is pad"
    reply_columns = targets[:, start:]
    assert reply_columns[0].tolist() == [1, 1, 0, 2, TEXT_PAD, none, none], "text at delay 0, pad at EOS"
    assert reply_columns[1].tolist() == [pad, *reply[0].tolist(), eos, pad]
    assert reply_columns[2].tolist() == [pad, pad, *reply[1].tolist(), eos]
    assert not mask[:, :start].any()
    _, untexted, mask = build_training_example(user, reply, TEXT, None)
    assert (untexted[0] == none).all() and not mask[0].any(), "no transcript: no text targets"
    with pytest.raises(ValueError, match="one id per reply frame"):
        build_training_example(user, reply, TEXT, text[:2])


def test_the_step_rule_emits_each_frame_with_its_text():
    stepper, state = DelayStepper(TEXT), DelayState.empty(1, TEXT.n_streams)
    state.begin(0, 0, 10)
    text, codes = [1, 0, 2, 3], [5, 6, 7, 8]
    got_text, got_codes, ended = [], [], False
    for step in range(8):
        wanted = torch.tensor([[text[min(step, 3)], TEXT.eos_id if step == 4 else codes[min(step - 1, 3)],
                                codes[min(step - 2, 3)]]])
        logits = torch.nn.functional.one_hot(wanted, TEXT.logit_width).float() * 10
        out = stepper.step(state, logits, 0.0, None, None)
        if out.emitted[0]:
            got_text.append(int(out.text[0]))
            got_codes.append(out.frames[0].tolist())
        ended = ended or bool(out.ended[0])
    assert got_text == [1, 0, 2] and got_codes == [[5, 5], [6, 6], [7, 7]] and ended, "codebook 0 ended it"
    assert TEXT.spoken_text([1, 1, 0, 1, 2, 2, 0]) == "అఅబ", "CTC-collapsed: repeats once, pad separates"


def test_a_tiny_model_with_a_text_stream_learns_to_say_its_text(one_thread):
    torch.manual_seed(0)
    model = S2STransformer(TEXT)
    user, reply = torch.randint(16, (2, 6)), torch.randint(16, (2, 10))
    text = torch.tensor([0, 1, 1, 0, 2, 0, 3, 3, 0, 0])
    inputs, targets, _ = collate_examples([build_training_example(user, reply, TEXT, text)], TEXT)
    speaker, emotion = torch.tensor([1]), torch.tensor([2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        loss = model.loss(model(inputs, speaker, emotion), targets, [2.0, 2.0, 1.0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.05 * losses[0], "the loss falls"
    model.eval()
    frames = list(model.reply_frames(user[None], speaker, emotion, 16, temperature=0.0))
    said = [int(f.text[0]) for f in frames]
    assert said == text.tolist() and TEXT.spoken_text(said) == "అబక"
    assert torch.equal(torch.cat([f.codes for f in frames], dim=2)[0], reply)
    assert torch.equal(torch.cat(list(model.generate(user[None], speaker, emotion, 16, temperature=0.0)), dim=2)[0],
                       reply), "generate yields the same audio"


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_batched_replies_with_text_equal_one_by_one_replies(text_bundle_dir: Path, guidance: float, one_thread):
    bundle = load_bundle(text_bundle_dir)
    settings = GenerationSettings(temperature=0.0, top_k=None, max_reply_seconds=0.5, min_reply_seconds=0.1,
                                  guidance=guidance)
    utterances = [speak(t) for t in ("నమస్కారం.", "మీరు ఎలా ఉన్నారు?", "అవును.")]
    expected, expected_text = [], []
    for u in utterances:
        session = ReplySession(bundle, "male_mature", "thinking", settings)
        expected.append(session.reply(u))
        expected_text.append(session.reply_text)
    assert any(expected_text) and set("".join(expected_text)) <= set(bundle.s2s.config.text_symbols)
    engine = Engine(bundle, settings, max_sessions=4).start()
    try:
        for stagger in (False, True):
            texts: dict[int, str] = {}
            for got, want in zip(run_engine(engine, utterances, stagger, texts=texts), expected):
                assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
            assert [texts[i] for i in range(len(utterances))] == expected_text
    finally:
        engine.stop()


def test_reply_end_carries_the_reply_text_over_the_websocket(text_bundle_dir: Path, bundle_dir: Path, one_thread):
    import websockets

    speech = speak("ఈ రోజు వాతావరణం చాలా బాగుంది కదా?")
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2")

    async def turn(url: str) -> dict:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "speaker": "female_young", "emotion": "happy",
                                      "sample_rate": 16000}))
            await ws.recv()
            for start in range(0, len(pcm), 320):
                await ws.send(pcm[start: start + 320].tobytes())
            await ws.send(json.dumps({"type": "end_of_utterance"}))
            while True:
                message = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(message, str) and json.loads(message)["type"] in ("reply_end", "error"):
                    return json.loads(message)

    settings = {"max_reply_seconds": 0.5, "min_reply_seconds": 0.1, "temperature": 0.0}
    session = ReplySession(load_bundle(text_bundle_dir), "female_young", "happy", GREEDY)
    session.reply(pcm.astype(np.float32) / 32768.0)   # what the server hears
    with LiveServer(text_bundle_dir, settings) as server:
        end = asyncio.run(turn(server.url))
    assert end["type"] == "reply_end" and end["text"] == session.reply_text != ""
    with LiveServer(bundle_dir, settings) as server:   # a model without a text stream: the field, empty
        assert asyncio.run(turn(server.url))["text"] == ""
