"""Training the served models: the codec (train_codec), the codec tokens (tokenize_corpus) and the
S2S transformer (train_s2s), with what they share split by job (device, rng, cost, provenance,
stage_cache, tracker)."""
