"""A small CTC recognizer of Telugu script, the pipeline's judge of intelligibility (CER).

    audio (B, samples) 16 kHz -> log-mel (B, n_mels, frames), 10 ms hop, normalised per utterance
    -> two stride-2 convs (40 ms per output frame) -> depthwise-conv blocks -> linear
    -> log-probs over code points, decoded greedily (best path)

It is trained per corpus version (tasks/evaluation/train_asr.py) on the corpus's own transcripts, so its CER
on generated replies says how much of the Telugu a listener trained on that corpus would recover.
Why code points as units: Telugu syllables (aksharas) are consonant + virama + consonant + vowel
sign clusters; code points need no segmentation rules, a vocabulary of ~60 covers the corpus, and
the CER over them is the usual CER of Indic ASR papers (Unicode-level). At 40 ms per frame the
densest corpus segment needs ~0.8 labels per frame, within what CTC can emit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import Tensor, nn

from core.checkpoints import save_checkpoint
from models.features import HOP, LogMel

FORMAT = "telugu-ctc-recognizer/1"  # marks a file as save_recognizer's, so a wrong file fails clearly


class GraphemeVocab:
    """CTC blank at index 0, then the sorted code points seen in the training texts.

    Units are Unicode code points (consonants, independent vowels, vowel signs, virama, anusvara,
    space and punctuation each count as one), and the CER of this module is over code points too.
    A code point absent from the training texts cannot be emitted; encode() drops it.
    """

    BLANK = 0

    def __init__(self, symbols: Sequence[str]) -> None:
        if any(len(s) != 1 for s in symbols) or len(set(symbols)) != len(symbols):
            raise ValueError("a vocabulary is a list of distinct single code points")
        self.symbols = list(symbols)
        self.index = {s: i + 1 for i, s in enumerate(self.symbols)}

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> GraphemeVocab:
        return cls(sorted(set("".join(texts))))

    def __len__(self) -> int:
        """Output size of the recognizer: the symbols plus the blank."""
        return len(self.symbols) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.symbols[i - 1] for i in ids if 0 < i <= len(self.symbols))

    def to_dict(self) -> dict[str, Any]:
        return {"symbols": self.symbols}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GraphemeVocab:
        return cls(values["symbols"])


def frame_lengths(samples: Tensor) -> Tensor:
    """Log-mel frames of clips of `samples` samples (centered STFT, as LogMel.frames)."""
    return torch.div(samples, HOP, rounding_mode="floor") + 1


class ConvBlock(nn.Module):
    """Depthwise conv over time, then a per-frame MLP (ConvNeXt in 1-D), residual and masked.

    Masking after every block keeps padded frames at zero, so a clip's valid frames see the same
    zeros beyond its end whether it is batched alone or with longer clips.
    """

    def __init__(self, channels: int, hidden: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up = nn.Linear(channels, hidden)
        self.down = nn.Linear(hidden, channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.norm(self.depthwise(x).transpose(1, 2))
        y = self.down(self.dropout(F.gelu(self.up(y)))).transpose(1, 2)
        return (x + self.dropout(y)) * mask


class CtcRecognizer(nn.Module):
    """Log-mel -> x4 conv subsampling -> `layers` ConvBlocks -> per-frame log-probs over the vocabulary.

    `subsample` 2 keeps 20 ms output frames (the second conv has stride 1): the rate of the codec,
    which the text stream's aligner (tasks/training/align_corpus.py) labels frame by frame.

    Why convolutions and not a BiGRU: on one CPU thread a 2-layer BiGRU (hidden 192) took 0.5 s
    per batch of 16 utterances, almost all of it in the sequential recurrence; this conv stack of
    the same size takes ~0.3 s and reached a lower CER in the same wall time. Its receptive field
    (+-0.3 s per block at kernel 11) is far wider than a Telugu syllable needs.
    """

    def __init__(self, vocab: GraphemeVocab, n_mels: int = 80, channels: int = 192, hidden: int = 384,
                 layers: int = 5, kernel_size: int = 11, dropout: float = 0.0, subsample: int = 4) -> None:
        super().__init__()
        if subsample not in (2, 4):
            raise ValueError(f"subsample must be 2 (20 ms frames) or 4 (40 ms), got {subsample}")
        self.vocab = vocab
        self.config = {"n_mels": n_mels, "channels": channels, "hidden": hidden, "layers": layers,
                       "kernel_size": kernel_size, "dropout": dropout, "subsample": subsample}
        self.strides = (2, subsample // 2)
        self.front = LogMel(n_mels)
        self.subsample = nn.Sequential(
            nn.Conv1d(n_mels, channels, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(channels, channels, 5, stride=self.strides[1], padding=2), nn.GELU())
        self.blocks = nn.ModuleList(ConvBlock(channels, hidden, kernel_size, dropout) for _ in range(layers))
        self.head = nn.Linear(channels, len(vocab))

    def features(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, samples) padded audio -> (B, n_mels, frames) log-mel normalised per utterance and
        mel bin over its own frames (so level and channel do not shift it), zero past its end."""
        frames = frame_lengths(lengths.to(audio.device))
        feats = self.front(audio.float())
        valid = (torch.arange(feats.shape[-1], device=feats.device)[None] < frames[:, None])[:, None].float()
        count = frames[:, None, None].float()
        mean = (feats * valid).sum(-1, keepdim=True) / count
        var = ((feats - mean).square() * valid).sum(-1, keepdim=True) / count
        return (feats - mean) / (var + 1e-5).sqrt() * valid, frames

    def encode(self, feats: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """(B, n_mels, frames) features -> ((T, B, V) log-probs, (B,) output lengths)."""
        x = self.subsample(feats)
        out_lengths = frames
        for stride in self.strides:  # a conv with kernel 5 and padding 2 gives ceil(n / stride) frames
            out_lengths = torch.div(out_lengths + stride - 1, stride, rounding_mode="floor")
        out_lengths = out_lengths.clamp(1, x.shape[-1])
        mask = (torch.arange(x.shape[-1], device=x.device)[None] < out_lengths[:, None])[:, None].to(x.dtype)
        x = x * mask
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x.transpose(1, 2)).log_softmax(-1).transpose(0, 1), out_lengths

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, samples) padded 16 kHz audio and its lengths -> ((T, B, V) log-probs, (B,) lengths)."""
        return self.encode(*self.features(audio, lengths))

    def greedy(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        """Best path: the argmax per frame, repeats merged, blanks removed."""
        best = log_probs.argmax(-1).T.cpu()  # (B, T)
        texts = []
        for row, n in zip(best, lengths.tolist()):
            ids = torch.unique_consecutive(row[:n]).tolist()
            texts.append(self.vocab.decode([i for i in ids if i != GraphemeVocab.BLANK]))
        return texts

    @torch.inference_mode()
    def transcribe(self, clips: Sequence[np.ndarray], batch_size: int = 16) -> list[str]:
        """Greedy transcripts of float32 16 kHz clips, batched by length (order kept)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        texts: list[str] = [""] * len(clips)
        for start in range(0, len(order), batch_size):
            picks = order[start: start + batch_size]
            audio, lengths = pad_batch([clips[i] for i in picks])
            log_probs, out_lengths = self(audio.to(device), lengths.to(device))
            for i, text in zip(picks, self.greedy(log_probs, out_lengths)):
                texts[i] = text
        self.train(was_training)
        return texts


def pad_batch(clips: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Zero-padded (B, samples) float batch and the clips' lengths (an empty clip counts as 1)."""
    lengths = torch.tensor([max(1, len(c)) for c in clips])
    audio = torch.zeros(len(clips), int(lengths.max()))
    for row, clip in enumerate(clips):
        audio[row, : len(clip)] = torch.as_tensor(np.asarray(clip, dtype=np.float32))
    return audio, lengths


def cer(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Character error rate over code points: total edit distance / total reference length.

    Pairs whose reference is empty are skipped (nothing to recover); a corpus-level ratio rather
    than a mean of per-item rates, so long items weigh by their length. ValueError when the lists
    differ in length or no reference is left (a rate over nothing is not 0).
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    errors = total = 0
    for hyp, ref in zip(hyps, refs):
        if ref:
            errors += AF.edit_distance(list(ref), list(hyp))
            total += len(ref)
    if total == 0:
        raise ValueError("no non-empty reference to score against")
    return errors / total


def save_recognizer(path: Path, model: CtcRecognizer, vocab: GraphemeVocab, config: dict[str, Any]) -> Path:
    """Atomically write weights, vocabulary, architecture and the training `config` (a record)."""
    if len(vocab) != model.head.out_features:
        raise ValueError(f"a vocabulary of {len(vocab)} outputs for a model of {model.head.out_features}")

    return save_checkpoint(Path(path), format=FORMAT, model=model.state_dict(), vocab=vocab.to_dict(),
                           architecture=model.config, config=dict(config))


def load_recognizer(path: Path, device: str | torch.device = "cpu") -> CtcRecognizer:
    """The recognizer save_recognizer wrote, in eval mode with its vocabulary attached."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recognizer checkpoint at {path}: train it with tasks.evaluation.train_asr")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path} is not a recognizer checkpoint (unreadable: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a recognizer checkpoint (no {FORMAT!r} marker)")
    model = CtcRecognizer(GraphemeVocab.from_dict(state["vocab"]), **state["architecture"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()
