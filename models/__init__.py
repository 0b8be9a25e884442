"""Torch modules of the pipeline: the TeluCodec codec, its quantizer, the S2S transformer and
their streaming state. Filled by the models issue; nothing here yet, by design of the layout."""
