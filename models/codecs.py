"""Which codec a checkpoint holds, from the "kind" in its config: TeluCodec v2 ("mel") or v1 ("conv").

Both kinds share one interface (encode/decode, encode_step/decode_step with explicit state,
hop_length, frame_rate, bitrate, delay_samples, config_dict), so tokenizing, bundles, serving and
benchmarks take either. v1 checkpoints predate the "kind" key: a config without it is "conv".
"""

from __future__ import annotations

from typing import Any

from models.codec import CodecConfig, TeluCodec
from models.mel_codec import MelCodec, MelCodecConfig

Codec = TeluCodec | MelCodec
CODEC_KINDS = ("mel", "conv")


def codec_from_config(config: dict[str, Any]) -> Codec:
    """A new (untrained) codec of the kind and shape `config` describes."""
    kind = config.get("kind", "conv")
    fields = {k: v for k, v in config.items() if k != "kind"}
    if kind == "mel":
        return MelCodec(MelCodecConfig.from_dict(fields))
    if kind == "conv":
        return TeluCodec(CodecConfig.from_dict(fields))
    raise ValueError(f"unknown codec kind {kind!r}: expected one of {', '.join(CODEC_KINDS)}")
