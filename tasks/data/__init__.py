"""Building the corpus: sources, download, normalize, segment (VAD, speakers), segment checks,
transcripts, splits, pairs and the DVC version. Run in that order by flows/data_flow.py."""
