"""The CTC recognizer that judges intelligibility: its metric, its vocabulary, that it learns
speech rather than anything else, its checkpoints, and its training task's caching."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from core import atomic
from models.asr import CtcRecognizer, GraphemeVocab, cer, load_recognizer, pad_batch, save_recognizer

from .conftest import speak

SENTENCES = ["నమస్కారం", "ఈ రోజు వర్షం పడుతుంది.", "మీరు ఎలా ఉన్నారు?", "నాకు తెలుగు ఇష్టం."]


def test_cer_known_cases():
    assert cer(["నమస్కారం"], ["నమస్కారం"]) == 0.0
    assert cer(["abcdefghiX"], ["abcdefghij"]) == pytest.approx(0.1)
    assert cer(["", "ab"], ["abcd", "ab"]) == pytest.approx(4 / 6)  # corpus-level, not a mean of rates
    assert cer(["కా"[0]], ["కా"]) == pytest.approx(0.5)  # consonant + vowel sign: two code points
    assert cer(["anything", "ab"], ["", "ab"]) == 0.0  # an empty reference is skipped
    with pytest.raises(ValueError):
        cer(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        cer(["a"], [""])


def test_vocab_round_trip():
    vocab = GraphemeVocab.from_texts(SENTENCES)
    assert GraphemeVocab.BLANK == 0 and 0 not in vocab.encode(SENTENCES[1])
    assert vocab.symbols == sorted(vocab.symbols) and "్" in vocab.symbols and " " in vocab.symbols
    for text in SENTENCES:
        assert vocab.decode(vocab.encode(text)) == text
    assert vocab.decode(vocab.encode("నమ X స్కారం")) == "నమ  స్కారం"  # unknown code points dropped
    restored = GraphemeVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored.encode(SENTENCES[2]) == vocab.encode(SENTENCES[2]) and len(restored) == len(vocab)


@pytest.fixture(scope="module")
def trained(one_thread) -> tuple[CtcRecognizer, list]:
    """A tiny recognizer over-fitted on four espeak-ng utterances (~1-2 s of training)."""
    clips = [speak(text, "male_young") for text in SENTENCES]
    torch.manual_seed(0)
    vocab = GraphemeVocab.from_texts(SENTENCES)
    model = CtcRecognizer(vocab, n_mels=40, channels=64, hidden=128, layers=3, kernel_size=11)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ctc = torch.nn.CTCLoss(zero_infinity=True)
    audio, lengths = pad_batch(clips)
    targets = [torch.tensor(vocab.encode(t)) for t in SENTENCES]
    for _ in range(60):
        log_probs, out_lengths = model(audio, lengths)
        loss = ctc(log_probs, torch.cat(targets), out_lengths, torch.tensor([len(t) for t in targets]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), clips


def test_recognizer_learns_the_speech_it_hears(trained):
    model, clips = trained
    hyps = model.transcribe(clips, batch_size=3)  # two batches, padded
    right = cer(hyps, SENTENCES)
    shuffled = cer(hyps, SENTENCES[1:] + SENTENCES[:1])
    assert right < 0.2 and right < 0.5 * shuffled, (hyps, right, shuffled)
    assert model.transcribe([clips[2]]) == [hyps[2]]  # the same alone as in a batch


def test_save_load_round_trip_and_foreign_files(trained, tmp_path: Path):
    model, clips = trained
    path = save_recognizer(tmp_path / "asr" / "recognizer.pt", model, model.vocab, {"lr": 0.003})
    loaded = load_recognizer(path)
    assert not loaded.training and loaded.vocab.symbols == model.vocab.symbols
    assert loaded.transcribe(clips) == model.transcribe(clips)

    torch.save({"model": model.state_dict()}, tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for foreign in ("other.pt", "notes.txt"):
        with pytest.raises(ValueError, match="not a recognizer checkpoint"):
            load_recognizer(tmp_path / foreign)
    with pytest.raises(FileNotFoundError, match="no recognizer checkpoint"):
        load_recognizer(tmp_path / "missing.pt")


def test_batch_plan_takes_every_utterance_once_grouped_by_length():
    from tasks.evaluation.train_asr import batch_plan

    lengths = [16000 * (1 + i % 7) + i for i in range(50)]
    plan = batch_plan(lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(i for batch in plan for i in batch) == list(range(50))
    spread = max(max(lengths[i] for i in b) / min(lengths[i] for i in b) for b in plan)
    assert spread < 2.0  # random batches of 8 would almost surely mix 1 s and 7 s clips


def test_train_asr_scores_unseen_sentences_and_reuses_a_finished_run(project_root: Path, one_thread):
    from core.config import load_params
    from tasks.evaluation.train_asr import train_asr

    data = project_root / "data"
    layout = [("train", text, speaker) for text in SENTENCES for speaker in ("male_young", "female_young")]
    layout += [("val", SENTENCES[0], "male_mature"), ("test", SENTENCES[1], "male_mature"),
               ("test", "ఇది కొత్త వాక్యం.", "male_mature"), ("test", "", "male_mature")]
    rows = []
    for i, (split, text, speaker) in enumerate(layout):
        path = f"segments/s/{i:04d}.wav"
        atomic.write_wav(data / path, speak(text or SENTENCES[3], speaker), 16000)
        rows.append({"segment_id": f"s--{i:04d}", "path": path, "split": split, "speaker": speaker,
                     "emotion": "neutral", "text": text or None})  # None: an unknown transcript
    pd.DataFrame(rows).to_csv(data / "manifest.csv", index=False)
    params = load_params("smoke", {"evaluation": {"asr": {"n_mels": 40, "channels": 32, "hidden": 64, "layers": 2,
                                                          "batch_size": 4, "max_steps": 30}}})

    result = train_asr(params, use_mlflow=False)
    metrics = result.metrics
    assert not result.cached and result.steps == 30 and Path(result.checkpoint).is_file()
    assert metrics["items_train"] == 8 and metrics["items_val"] == 1 and metrics["items_val_unseen"] == 0
    assert metrics["items_test"] == 2 and metrics["items_test_unseen"] == 1  # the unknown text is not scored
    assert {"cer_val", "cer_test", "cer_test_unseen", "cer_train"} <= set(metrics)
    assert "cer_val_unseen" not in metrics  # no unseen val item: omitted, not NaN
    saved = json.loads((project_root / "artifacts/evaluation/asr/result.json").read_text())
    assert saved["metrics"] == metrics

    again = train_asr(params, use_mlflow=False)
    assert again.cached and again.metrics == metrics
    assert not train_asr(params, force=True, use_mlflow=False).cached
