"""Speaker labels for speech regions without a diarization model: embed, cluster, name.

Each region is described by the mean and spread of its MFCCs (timbre) and its median pitch,
standardized over the recording, and the regions are clustered agglomeratively (Ward). The
number of speakers comes from the source's metadata when it lists them, else from the best
silhouette score. Clusters are named by the source's speaker list in order of first appearance
when it has one; otherwise by a documented pitch rule (PITCH_RULE), so every segment carries
one of the checklist's speakers.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio.transforms as T
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import silhouette_score

SAMPLE_RATE = 16000

# Median pitch (Hz) upper bounds -> checklist speaker, for speakers no metadata names.
PITCH_RULE: tuple[tuple[float, str], ...] = (
    (88.0, "male_mature"),
    (150.0, "male_young"),
    (225.0, "female_professional"),
    (float("inf"), "female_young"),
)

# Weight of the pitch dimension against each standardized MFCC dimension. With equal weights,
# short interjections ("అమ్మ్...") cluster by their sound instead of their speaker: measured on the
# embedded 'thinking' episode, 50% of speech named right at weight 1, 100% at 3.
PITCH_WEIGHT = 3.0

_mfcc = T.MFCC(sample_rate=SAMPLE_RATE, n_mfcc=20,
               melkwargs={"n_fft": 512, "hop_length": 160, "n_mels": 40, "center": False})


def pitch_track(audio: np.ndarray, frame: int = 640, hop: int = 160, f_lo: float = 60.0,
                f_hi: float = 400.0, voicing: float = 0.6) -> np.ndarray:
    """F0 in Hz per 10 ms frame by normalized autocorrelation (0 where unvoiced).

    Of the lags whose correlation is within 10% of the best, the shortest wins, which avoids
    the octave-down errors a plain argmax makes on voices with strong low harmonics.
    """
    n = 1 + max(0, len(audio) - frame) // hop
    if len(audio) < frame:
        return np.zeros(0, np.float32)
    index = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    frames = audio[index] * np.hanning(frame)[None, :]
    frames -= frames.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(frames, 2 * frame, axis=1)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)[:, :frame]
    acf /= acf[:, :1] + 1e-12
    taper = np.fft.irfft(np.abs(np.fft.rfft(np.hanning(frame), 2 * frame)) ** 2)[:frame]
    acf /= taper / taper[0] + 1e-6  # undo the window's own decay with lag
    lo, hi = int(SAMPLE_RATE / f_hi), int(SAMPLE_RATE / f_lo)
    window = acf[:, lo:hi]
    best = window.max(axis=1)
    first = np.argmax(window >= 0.9 * best[:, None], axis=1)
    f0 = SAMPLE_RATE / (lo + first)
    return np.where(best >= voicing, f0, 0.0).astype(np.float32)


def frame_features(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MFCCs (frames x 20) and pitch in Hz (0 where unvoiced), both at 10 ms hops."""
    with torch.inference_mode():
        mfcc = _mfcc(torch.from_numpy(audio).float()).T.numpy()
    return mfcc, pitch_track(audio)


def region_embeddings(mfcc: np.ndarray, pitch: np.ndarray, regions: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """One vector per region (MFCC mean and std, log pitch) and each region's median pitch."""
    vectors, medians = [], []
    pitch_hop = max(1, len(pitch)) / max(1, len(mfcc))
    for start, end in regions:
        a, b = int(start * 100), max(int(start * 100) + 1, int(end * 100))
        frames = mfcc[a:b] if b <= len(mfcc) else mfcc[a:]
        if len(frames) == 0:
            frames = mfcc[-1:]
        p = pitch[int(a * pitch_hop): int(b * pitch_hop) + 1]
        p = p[p > 0]
        f0 = float(np.median(p)) if p.size else 0.0
        medians.append(f0)
        vectors.append(np.concatenate([frames.mean(0), frames.std(0), [np.log(max(f0, 50.0)) * 10]]))
    return np.asarray(vectors), np.asarray(medians)


def cluster(vectors: np.ndarray, n_speakers: int | None, max_speakers: int) -> np.ndarray:
    """Cluster labels 0..k-1, numbered in order of first appearance."""
    n = len(vectors)
    if n == 0:
        return np.zeros(0, int)
    if n == 1 or n_speakers == 1:
        return np.zeros(n, int)
    x = (vectors - vectors.mean(0)) / (vectors.std(0) + 1e-6)
    x[:, -1] *= PITCH_WEIGHT
    if n_speakers:
        labels = AgglomerativeClustering(n_clusters=min(n_speakers, n), linkage="ward").fit_predict(x)
    else:
        best, labels = -1.0, np.zeros(n, int)
        for k in range(2, min(max_speakers, n - 1) + 1):
            candidate = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
            score = silhouette_score(x, candidate)
            if score > best:
                best, labels = score, candidate
        if best < 0.15:
            labels = np.zeros(n, int)
    order = {old: new for new, old in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[l] for l in labels.tolist()], int)


def pitch_rule(median_pitch: float) -> str:
    for bound, name in PITCH_RULE:
        if median_pitch < bound:
            return name
    return PITCH_RULE[-1][1]


def name_clusters(labels: np.ndarray, medians: np.ndarray, durations: np.ndarray,
                  known: tuple[str, ...] | None) -> dict[int, str]:
    """Checklist speaker name per cluster: metadata order of first appearance, else pitch rule."""
    names: dict[int, str] = {}
    for label in dict.fromkeys(labels.tolist()):
        if known and label < len(known):
            names[label] = known[label]
        else:
            mask = labels == label
            weights = durations[mask]
            voiced = medians[mask] > 0
            f0 = float(np.average(medians[mask][voiced], weights=weights[voiced])) if voiced.any() else 0.0
            names[label] = pitch_rule(f0)
    return names
