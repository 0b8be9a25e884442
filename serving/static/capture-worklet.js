// Microphone capture for the demo page: resample to the server's rate, convert to PCM16, post chunks.
//
// Runs in the AudioWorkletGlobalScope of the capture AudioContext, whose rate (the global
// `sampleRate`, often 48000 or 44100) is the device's. Options (processorOptions):
//   targetRate  the server's sample rate (GET /config: 16000)
//   chunkMs     the size of each posted chunk (20 ms = 320 samples = 640 bytes at 16 kHz)
//
// Resampler: band-limited interpolation with a Blackman-windowed sinc (the classic
// "bandlimited interpolation" of Smith & Gossett). For every output sample at input time t, the
// output is the sum of the input samples x[j] within HALF_ZEROS zero crossings of t, weighted by
//     h(t - j) = 2 fc sinc(2 fc (t - j)) * blackman((t - j) / half)
// with the cutoff fc = 0.5 * min(1, out/in) * ROLLOFF (cycles per input sample), i.e. a low-pass
// at 90% of the lower Nyquist frequency (7.2 kHz for 16 kHz out) applied in the same sum as the
// interpolation, so downsampling does not alias. It works for any ratio (48000 -> 16000 is a
// plain decimation by 3; 44100 -> 16000 has a fractional phase per sample). The kernel is
// tabulated at TABLE_STEPS points per input sample and read with linear interpolation, and each
// output is divided by the sum of its weights (exact unity gain at DC). Cost at 48 kHz: about 100
// multiply-adds per output sample, 1.7 M per second. Equal rates pass straight through.
//
// Chunks are posted as Int16Array buffers (transferred, not copied) in the platform's byte order,
// which is little-endian on every platform a browser runs on; the protocol wants little-endian.

const HALF_ZEROS = 16;   // zero crossings of the sinc on each side of the centre
const ROLLOFF = 0.9;     // cutoff as a fraction of the lower Nyquist frequency
const TABLE_STEPS = 512; // kernel table points per input sample

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.inRate = sampleRate;
    this.outRate = opts.targetRate || 16000;
    this.step = this.inRate / this.outRate;            // input samples per output sample
    this.passThrough = this.inRate === this.outRate;
    this.chunkSize = Math.max(1, Math.round(this.outRate * (opts.chunkMs || 20) / 1000));
    this.chunk = new Int16Array(this.chunkSize);
    this.filled = 0;

    const fc = 0.5 * Math.min(1, this.outRate / this.inRate) * ROLLOFF;
    this.half = HALF_ZEROS / (2 * fc);                 // kernel half-width in input samples
    const size = Math.ceil(this.half * TABLE_STEPS) + 2;
    this.table = new Float32Array(size);
    for (let i = 0; i < size; i++) {
      const x = i / TABLE_STEPS;
      if (x >= this.half) break;                       // the rest stays 0
      const arg = 2 * fc * x;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * arg) / (Math.PI * arg);
      const w = 0.42 + 0.5 * Math.cos(Math.PI * x / this.half) + 0.08 * Math.cos(2 * Math.PI * x / this.half);
      this.table[i] = 2 * fc * sinc * w;
    }
    // input history; the first `pad` samples are silence, so the first output needs no past input
    this.pad = Math.ceil(this.half) + 1;
    this.buf = new Float32Array(8192 + 4 * this.pad);
    this.len = this.pad;
    this.t = this.pad;                                 // time of the next output, in buf samples
  }

  kernel(x) {
    const pos = Math.abs(x) * TABLE_STEPS;
    const i = pos | 0;
    if (i + 1 >= this.table.length) return 0;
    const f = pos - i;
    return this.table[i] + f * (this.table[i + 1] - this.table[i]);
  }

  post() {
    const out = this.chunk.slice(0, this.filled);
    this.port.postMessage(out.buffer, [out.buffer]);
    this.filled = 0;
  }

  emit(value) {
    const s = value > 1 ? 1 : value < -1 ? -1 : value;
    this.chunk[this.filled++] = s < 0 ? Math.round(s * 0x8000) : Math.round(s * 0x7fff);
    if (this.filled === this.chunkSize) this.post();
  }

  append(samples) {
    if (this.len + samples.length > this.buf.length) {
      const bigger = new Float32Array(2 * (this.len + samples.length));
      bigger.set(this.buf.subarray(0, this.len));
      this.buf = bigger;
    }
    this.buf.set(samples, this.len);
    this.len += samples.length;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    let mono = input[0];
    if (input.length > 1) {                           // mix down, should the device be stereo
      mono = new Float32Array(input[0].length);
      for (const channel of input) for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / input.length;
    }
    if (this.passThrough) {
      for (let i = 0; i < mono.length; i++) this.emit(mono[i]);
      return true;
    }
    this.append(mono);
    const half = this.half;
    const buf = this.buf;
    while (this.t + half + 1 < this.len) {
      const t = this.t;
      const first = Math.ceil(t - half);
      const last = Math.floor(t + half);
      let acc = 0;
      let norm = 0;
      for (let j = first; j <= last; j++) {
        const w = this.kernel(t - j);
        acc += buf[j] * w;
        norm += w;
      }
      this.emit(norm > 0 ? acc / norm : 0);
      this.t += this.step;
    }
    // drop the input that no future output reaches
    const drop = Math.floor(this.t - half) - 1;
    if (drop > 0) {
      buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.t -= drop;
    }
    return true;
  }
}

registerProcessor('s2s-capture', CaptureProcessor);
