"""TeluCodec, its quantizer and streaming blocks: shapes, streaming == offline, causality, EMA
codebooks, learning, file checks, config checks. Random-init models on the CPU, seconds in all."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from models.codec import CodecConfig, STFTDiscriminator, TeluCodec, reconstruction_loss, snr_loss
from models.quantizer import ResidualVectorQuantizer, VectorQuantizer
from models.streaming import CausalConv1d, CausalConvTranspose1d, ResidualUnit, StreamingSequential

SR = 16000


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec() -> TeluCodec:
    torch.manual_seed(0)
    return TeluCodec().eval()


def stream(module, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Feed x to module.step in chunks of the given sizes (cycled) and join the outputs."""
    state, outputs, start, i = module.init_state(x.shape[0]), [], 0, 0
    while start < x.shape[-1]:
        y, state = module.step(x[..., start:start + sizes[i % len(sizes)]], state)
        outputs.append(y)
        start += sizes[i % len(sizes)]
        i += 1
    return torch.cat(outputs, dim=-1)


def test_config_hop_frame_rate_and_bitrate(codec: TeluCodec) -> None:
    assert codec.hop_length == 320 and codec.frame_rate == 50.0
    assert codec.bitrate() == 50 * 4 * 8 == 1600
    assert TeluCodec(CodecConfig(n_codebooks=8, codebook_size=1024)).bitrate() == 50 * 8 * 10


def test_shapes_and_padding(codec: TeluCodec) -> None:
    wav = torch.randn(2, 1, 1000) * 0.1
    with torch.no_grad():
        out = codec(wav)
        codes = codec.encode(wav)
    assert out.audio.shape == (2, 1, 1280)                    # 1000 padded up to 4 hops
    assert out.codes.shape == codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert out.commitment_loss.ndim == 0 and torch.isfinite(out.commitment_loss)
    assert torch.equal(out.codes, codes)
    assert codec.decode(codes).shape == (2, 1, 4 * 320)
    assert codec.decode(codes[:, :2]).shape == (2, 1, 4 * 320)  # first k codebooks only
    with pytest.raises(ValueError, match="batch, 1, samples"):
        codec.encode(torch.randn(2, 1000))


@pytest.mark.parametrize("stride,dilation,kernel", [(1, 1, 7), (1, 3, 3), (3, 1, 6), (4, 2, 5)])
def test_causal_conv_step_matches_forward(stride: int, dilation: int, kernel: int) -> None:
    torch.manual_seed(0)
    conv = CausalConv1d(3, 5, kernel, stride=stride, dilation=dilation)
    x = torch.randn(2, 3, 60)
    with torch.no_grad():
        full = conv(x)
        assert full.shape[-1] == 60 // stride
        assert torch.allclose(stream(conv, x, [1, 7, 2, 13]), full, atol=1e-6)


@pytest.mark.parametrize("kernel,stride", [(10, 5), (6, 2), (7, 3), (4, 4), (3, 1)])
def test_conv_transpose_and_residual_step_match_forward(kernel: int, stride: int) -> None:
    """Single frames (the vector-matrix path, whether the tail is shorter than, as long as or
    longer than a frame's output) and longer chunks (the transposed conv) join up the same."""
    torch.manual_seed(0)
    up = CausalConvTranspose1d(4, 3, kernel_size=kernel, stride=stride)
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        full = up(x)
        assert full.shape[-1] == 12 * stride
        assert torch.allclose(stream(up, x, [1, 3, 0, 2]), full, atol=1e-6)
        assert torch.allclose(stream(up, x, [1]), full, atol=1e-6)
        block = StreamingSequential(ResidualUnit(4, 3, dilation=3), torch.nn.ELU(), CausalConv1d(4, 4, 4, stride=2))
        x = torch.randn(2, 4, 40)
        assert torch.allclose(stream(block, x, [5, 1, 9]), block(x), atol=1e-6)


def test_streaming_decode_equals_full_decode(codec: TeluCodec) -> None:
    codes = torch.randint(0, 256, (2, 4, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = codec.decode(codes)
        state, frames = codec.init_decoder_state(2), []
        for f in range(codes.shape[-1]):
            audio, state = codec.decode_step(codes[..., f:f + 1], state)
            assert audio.shape == (2, 1, 320)
            frames.append(audio)
    torch.testing.assert_close(torch.cat(frames, dim=-1), full, atol=1e-5, rtol=0)


def test_onnx_streaming_decode_equals_full_decode(codec: TeluCodec) -> None:
    """The ONNX Runtime decoder (exported from the model) gives the same samples, at any batch."""
    from models.codec_onnx import OnnxStreamingDecoder

    decoder = OnnxStreamingDecoder(codec, batch=None)
    codes = torch.randint(0, 256, (3, 4, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = codec.decode(codes).numpy()
    state, frames = decoder.init_state(3), []
    for f in range(codes.shape[-1]):
        audio, state = decoder.step(codes[..., f:f + 1], state)
        assert audio.shape == (3, 1, 320)
        frames.append(audio)
    np.testing.assert_allclose(np.concatenate(frames, axis=-1), full, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expected codes \(batch, 4, 1\), got \(3, 4, 2\)"):
        decoder.step(codes[..., :2], state)
    with pytest.raises(ValueError, match="make it with init_state"):
        decoder.step(codes[:1, :, :1], state)

    single = OnnxStreamingDecoder(codec, batch=1)  # static shapes: one live stream
    state, frames = single.init_state(), []
    for f in range(codes.shape[-1]):
        audio, state = single.step(codes[1:2, :, f:f + 1], state)
        frames.append(audio)
    np.testing.assert_allclose(np.concatenate(frames, axis=-1), full[1:2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exported for batch 1"):
        single.init_state(3)


def test_onnx_bound_state_decode_equals_full_decode(codec: TeluCodec) -> None:
    """`step_bound` (state in buffers bound to the session, advanced in place) gives the samples
    of `decode` over many frames, keeps each stream's state apart, and hands its state over to and
    from the functional `step`."""
    from models.codec_onnx import OnnxStreamingDecoder

    codes = torch.randint(0, 256, (2, 4, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = codec.decode(codes).numpy()
    single = OnnxStreamingDecoder(codec, batch=1)
    first, second = single.init_bound_state(), single.init_bound_state()  # two streams, one decoder
    frames: list[list[np.ndarray]] = [[], []]
    for f in range(codes.shape[-1]):
        audio = single.step_bound(codes[0:1, :, f:f + 1], first)
        assert audio.shape == (1, 1, 320) and audio.dtype == np.float32
        frames[0].append(audio)
        frames[1].append(single.step_bound(codes[1:2, :, f:f + 1].numpy().astype(np.int16), second))
    assert not np.shares_memory(frames[0][-1], frames[0][-2])  # each frame's audio is the caller's
    for b in range(2):
        np.testing.assert_allclose(np.concatenate(frames[b], axis=-1), full[b:b + 1], atol=1e-5, rtol=0)

    # bound -> functional -> bound, halfway through: the same samples
    resumed, tail = single.init_bound_state(), []
    for f in range(30):
        single.step_bound(codes[0:1, :, f:f + 1], resumed)
    arrays = resumed.arrays()
    for f in range(30, 45):
        audio, arrays = single.step(codes[0:1, :, f:f + 1], arrays)
        tail.append(audio)
    resumed = single.init_bound_state(state=arrays)
    tail += [single.step_bound(codes[0:1, :, f:f + 1], resumed) for f in range(45, 60)]
    np.testing.assert_allclose(np.concatenate(tail, axis=-1), full[0:1, :, 30 * 320:], atol=1e-5, rtol=0)

    batched = OnnxStreamingDecoder(codec, batch=None)  # a dynamic batch binds per state's batch
    state = batched.init_bound_state(2)
    audio = np.concatenate([batched.step_bound(codes[..., f:f + 1], state) for f in range(5)], axis=-1)
    np.testing.assert_allclose(audio, full[..., :5 * 320], atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="state is for batch 2, got codes of batch 1"):
        batched.step_bound(codes[:1, :, :1], state)
    with pytest.raises(ValueError, match="belongs to another decoder"):
        single.step_bound(codes[:1, :, :1], batched.init_bound_state(1))
    with pytest.raises(ValueError, match=r"expected codes \(batch, 4, 1\)"):
        single.step_bound(codes[:1, :, :2], first)
    with pytest.raises(ValueError, match="make it with init_state"):
        single.init_bound_state(state=batched.init_state(2))
    with pytest.raises(ValueError, match="exported for batch 1"):
        single.init_bound_state(2)


def test_streaming_encode_equals_full_encode(codec: TeluCodec) -> None:
    wav = torch.randn(1, 1, 320 * 6) * 0.1
    with torch.no_grad():
        state, codes, start = codec.init_encoder_state(1), [], 0
        for size in (100, 320, 7, 533, 960):    # packets need not align with frames
            c, state = codec.encode_step(wav[..., start:start + size], state)
            codes.append(c)
            start += size
        assert torch.equal(torch.cat(codes, dim=-1), codec.encode(wav))


def test_encoder_and_decoder_are_causal(codec: TeluCodec) -> None:
    torch.manual_seed(2)
    wav = torch.randn(1, 1, 320 * 6) * 0.1
    changed = wav.clone()
    changed[..., 3 * 320 + 17:] = torch.randn(1, 1, 320 * 3 - 17)
    with torch.no_grad():
        z, z_changed = codec.encoder(wav), codec.encoder(changed)
        assert torch.equal(z[..., :3], z_changed[..., :3])
        assert not torch.allclose(z[..., 3:], z_changed[..., 3:])
        assert torch.equal(codec.encode(wav)[..., :3], codec.encode(changed)[..., :3])
        codes = codec.encode(wav)
        other = codes.clone()
        other[..., 4:] = (other[..., 4:] + 1) % 256
        a, b = codec.decode(codes), codec.decode(other)
        assert torch.equal(a[..., :4 * 320], b[..., :4 * 320])


def test_ema_moves_codes_toward_data() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=2, decay=0.8, dead_code_steps=100)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    vq.embed_sum.copy_(vq.codebook)
    target = torch.tensor([1.0, -1.0])
    x = target + 0.01 * torch.randn(64, 2)                       # all nearest to code 0
    before = (vq.codebook[0] - target).norm()
    for _ in range(20):
        vq.update(x, vq.encode(x))
    assert (vq.codebook[0] - target).norm() < 0.1 * before
    assert torch.allclose(vq.codebook[1], torch.tensor([5.0, 5.0]), atol=1e-2)  # unused, not dead: kept


def test_dead_codes_are_restarted_from_batch_vectors() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=2, codebook_size=4, dead_code_steps=2)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0], [50.0, -50.0]]))
    vq.embed_sum.copy_(vq.codebook)
    x = torch.randn(32, 2) * 0.1                                 # every vector picks code 0
    vq.update(x, vq.encode(x))
    assert torch.allclose(vq.codebook[1:].abs(), torch.tensor(50.0), atol=1e-3)  # unused once: kept
    vq.update(x, vq.encode(x))
    restarted = vq.codebook[1:]
    distance_to_batch = torch.cdist(restarted, x).min(dim=1).values
    assert torch.all(distance_to_batch < 1e-6) and vq.steps_unused.sum() == 0


def test_rvq_seeds_from_data_and_trains_straight_through() -> None:
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(dim=8, n_codebooks=3, codebook_size=16, dropout=1.0).train()
    z = (torch.randn(4, 8, 10) + 3.0).requires_grad_()
    out = rvq(z)
    assert all(bool(layer.initialized) for layer in rvq.layers)
    assert out.codes.shape == (4, 3, 10) and out.quantized.shape == z.shape
    (out.quantized.sum() + out.commitment_loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    rvq.eval()
    error = [(rvq.decode(rvq.encode(z)[:, :k]) - z).pow(2).mean() for k in (1, 2, 3)]
    assert error[0] > error[1] > error[2]                       # each codebook refines the last


def test_overfits_one_example() -> None:
    torch.manual_seed(0)
    model = TeluCodec(CodecConfig(channels=8, latent_dim=32)).train()   # narrow: seconds, not minutes
    t = torch.arange(SR // 2) / SR
    wav = (0.4 * torch.sin(2 * math.pi * 220 * t) + 0.02 * torch.randn(SR // 2)).view(1, 1, -1)
    identical = reconstruction_loss(wav, wav)
    assert set(identical) == {"stft", "mel", "total"} and identical["total"] < 1e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        out = model(wav)
        loss = reconstruction_loss(out.audio, wav)["total"] + out.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.7 * losses[0], losses


def test_snr_loss_on_known_cases() -> None:
    """-SNR in dB: silence as the estimate is 0 dB, noise 20 dB below the signal is -20 dB, the
    signal itself is limited by the floor, and shrinking an uncorrelated estimate cannot beat 0."""
    torch.manual_seed(0)
    signal = 0.1 * torch.sin(2 * math.pi * 200 * torch.arange(SR) / SR).view(1, 1, -1).repeat(2, 1, 1)
    noise = torch.randn_like(signal)
    noise *= signal.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() / 10      # 20 dB below
    assert abs(float(snr_loss(torch.zeros_like(signal), signal))) < 1e-3
    assert abs(float(snr_loss(signal + noise, signal)) + 20.0) < 0.1
    assert float(snr_loss(signal, signal)) < -40.0   # floor 1e-7 against power 5e-3: -47 dB
    unrelated = 0.1 * torch.randn_like(signal)
    assert all(float(snr_loss(g * unrelated, signal)) > 0 for g in (0.1, 0.5, 1.0))
    pred = (signal + noise).requires_grad_()
    snr_loss(pred, signal).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_stft_discriminator_losses() -> None:
    torch.manual_seed(0)
    disc = STFTDiscriminator(channels=8)
    real = torch.randn(2, 1, 4000) * 0.1
    fake = (torch.randn(2, 1, 4000) * 0.1).requires_grad_()
    d_loss = disc.discriminator_loss(real, fake)
    d_loss.backward()
    assert fake.grad is None and torch.isfinite(d_loss)
    g = disc.generator_losses(real, fake)
    (g["adversarial"] + g["feature_matching"]).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def write(path, data: np.ndarray, rate: int = SR):
    sf.write(str(path), data, rate, subtype="PCM_16")
    return path


def test_file_round_trip(codec: TeluCodec, tmp_path) -> None:
    audio = (0.3 * np.sin(2 * np.pi * 300 * np.arange(5000) / SR)).astype(np.float32)
    path = write(tmp_path / "in.wav", audio)
    codes = codec.encode_file(path, chunk_seconds=0.05)        # several chunks of 2 frames
    read, _ = sf.read(str(path), dtype="float32")
    assert codes.shape == (4, 16)
    assert torch.equal(codes, codec.encode(torch.from_numpy(read).view(1, 1, -1))[0])
    out = tmp_path / "out.wav"
    codec.decode_to_file(codes, out)
    info = sf.info(str(out))
    assert info.samplerate == SR and info.channels == 1 and info.frames == 16 * 320
    with pytest.raises(ValueError, match=r"integers in \[0, 256\)"):
        codec.decode_to_file(codes + 256, out)


def test_file_errors(codec: TeluCodec, tmp_path) -> None:
    second = np.zeros(SR, dtype=np.float32)
    with pytest.raises(ValueError, match="expected 16000 Hz, got 44100 Hz"):
        codec.encode_file(write(tmp_path / "rate.wav", np.zeros(44100, dtype=np.float32), 44100))
    with pytest.raises(ValueError, match="expected mono, got 2 channels"):
        codec.encode_file(write(tmp_path / "stereo.wav", np.stack([second, second], axis=1)))
    with pytest.raises(ValueError, match="no audio"):
        codec.encode_file(write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32)))
    with pytest.raises(ValueError, match="longer than max_seconds=0.5"):
        codec.encode_file(write(tmp_path / "long.wav", second), max_seconds=0.5)


def test_config_round_trip_and_mismatch(codec: TeluCodec) -> None:
    saved = json.loads(json.dumps(codec.config_dict()))
    rebuilt = TeluCodec.from_config_dict(saved)
    assert rebuilt.config == codec.config
    rebuilt.load_checkpoint_state(codec.state_dict(), saved)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), codec.state_dict().values()))
    rebuilt.check_compatible({**saved, "quantizer_dropout": 0.5})  # training-only: fine
    with pytest.raises(ValueError, match=r"channels \(checkpoint 16, model 32\).*n_codebooks"):
        rebuilt.load_checkpoint_state(codec.state_dict(), {**saved, "channels": 16, "n_codebooks": 8})
    with pytest.raises(ValueError, match="unknown codec config fields: chanels"):
        TeluCodec.from_config_dict({"chanels": 16})
