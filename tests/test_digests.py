"""The corpus's per-file digest list and the pinned numerics the corpus is computed with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.data import digests, pinned_numerics


def test_a_changed_byte_names_its_file(tmp_path: Path):
    data = tmp_path / "data"
    (data / "segments").mkdir(parents=True)
    (data / "manifest.csv").write_text("a,b\n1,2.5\n")
    (data / "segments" / "x.wav").write_bytes(b"RIFF" + bytes(100))
    listing = digests.write(tmp_path / "data.digests", digests.tree_digests(data))
    assert digests.compare(digests.read(listing), digests.tree_digests(data)) == []
    assert "# tool ffmpeg:" in listing.read_text()

    (data / "manifest.csv").write_text("a,b\n1,2.51\n")  # one byte more, as on the other machine
    (data / "segments" / "x.wav").unlink()
    (data / "extra.json").write_text("{}")
    assert [line.split(" (")[0] for line in digests.compare(digests.read(listing), digests.tree_digests(data))] == [
        "unexpected: extra.json", "differs: manifest.csv", "missing: segments/x.wav"]
    assert "(10 -> 11 bytes" in digests.compare(digests.read(listing), digests.tree_digests(data))[1]


def test_a_malformed_listing_is_refused_by_line(tmp_path: Path):
    with pytest.raises(ValueError, match="line 2: expected 'sha256 size path'"):
        digests.parse("# header\nnot a digest line\n")


def _child_numerics() -> tuple[str, int, str]:
    import torch

    return torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), os.environ.get("MKL_CBWR", "")


def test_the_corpus_numerics_run_capped_at_avx2_and_one_thread():
    if not pinned_numerics.has_avx2():
        pytest.skip("no AVX2 here: the steps run unpinned (documented)")
    capability, threads, mkl = pinned_numerics.run_pinned(_child_numerics)
    assert capability == "AVX2" and threads == 1 and mkl == "AVX2"
    assert "S2S_PINNED_NUMERICS" not in os.environ, "the parent's environment is left as it was"
