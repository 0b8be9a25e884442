"""Torch modules of the pipeline: the TeluCodec codec (codec, quantizer, streaming convolutions,
its ONNX streaming decoder), the S2S transformer, the evaluators' networks (CTC recognizer,
utterance classifiers) and the audio metrics. They know tensors and checkpoint files (core/),
nothing of how they are trained, served or released."""
