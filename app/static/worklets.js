// Tandem AudioWorklets: microphone capture (-> 16 kHz PCM16 messages) and reply playback
// (a jitter buffer resampled to the AudioContext's rate). Loaded with
// audioContext.audioWorklet.addModule("/static/worklets.js").

// Streaming band-limited resampler (windowed sinc, Blackman window). Chunked input gives
// the same output as one long input; output lags input by `half` input samples.
class SincResampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate;                      // input samples per output sample
    this.fc = Math.min(1, outRate / inRate) * 0.92;    // cutoff, relative to input Nyquist
    this.half = Math.ceil(8 / this.fc);                // kernel half-width (input samples)
    this.phases = 128;                                 // tabulated fractional positions
    const taps = 2 * this.half;
    this.table = new Float32Array((this.phases + 1) * taps);
    for (let p = 0; p <= this.phases; p++) {
      const frac = p / this.phases;
      let sum = 0;
      for (let k = 0; k < taps; k++) {
        const t = k - this.half + 1 - frac;            // tap k holds x[i0 - half + 1 + k]
        const x = Math.PI * this.fc * t;
        const sinc = t === 0 ? 1 : Math.sin(x) / x;
        const w = Math.abs(t) >= this.half ? 0
          : 0.42 + 0.5 * Math.cos(Math.PI * t / this.half) + 0.08 * Math.cos(2 * Math.PI * t / this.half);
        const v = this.fc * sinc * w;
        this.table[p * taps + k] = v;
        sum += v;
      }
      for (let k = 0; k < taps; k++) this.table[p * taps + k] /= sum;   // unity DC gain
    }
    this.taps = taps;
    this.buf = new Float32Array(4096);
    this.len = this.half - 1;                          // starts with half-1 zeros of history
    this.pos = this.half - 1;                          // next output position in buf
  }

  // Appends `input` (Float32Array); returns the output samples now computable.
  push(input) {
    if (this.len + input.length > this.buf.length) {
      const keep = Math.floor(this.pos) - this.half + 1;    // first sample still needed
      const rest = this.buf.subarray(keep, this.len);
      const size = Math.max(this.buf.length, 2 * (rest.length + input.length));
      const nb = new Float32Array(size);
      nb.set(rest);
      this.buf = nb; this.len = rest.length; this.pos -= keep;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const n = Math.max(0, Math.ceil((this.len - this.half - this.pos) / this.step));  // i0 + half < len
    const out = new Float32Array(n);
    const { buf, table, taps, phases, half, step } = this;
    let pos = this.pos;
    for (let j = 0; j < n; j++) {
      const i0 = Math.floor(pos);
      const p = Math.round((pos - i0) * phases);
      const base = p * taps, start = i0 - half + 1;
      let acc = 0;
      for (let k = 0; k < taps; k++) acc += buf[start + k] * table[base + k];
      out[j] = acc;
      pos += step;
    }
    this.pos = pos;
    return out;
  }

  flush() { return this.push(new Float32Array(this.half + 1)); }
}

// Microphone -> 16 kHz PCM16, posted as ArrayBuffers of `chunk` samples (20 ms).
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.outRate = o.outRate || 16000;
    this.chunk = Math.round(this.outRate * (o.chunkMs || 20) / 1000);
    this.rs = new SincResampler(sampleRate, this.outRate);
    this.pcm = new Int16Array(this.chunk);
    this.fill = 0;
    this.running = true;
    this.port.onmessage = (e) => { if (e.data === "stop") this.running = false; };
  }

  process(inputs) {
    const input = inputs[0];
    if (!this.running) return false;
    if (!input || input.length === 0) return true;
    let mono = input[0];
    if (input.length > 1) {
      mono = new Float32Array(input[0].length);
      for (const ch of input) for (let i = 0; i < ch.length; i++) mono[i] += ch[i] / input.length;
    }
    const y = this.rs.push(mono);
    for (let i = 0; i < y.length; i++) {
      const v = Math.max(-1, Math.min(1, y[i]));
      this.pcm[this.fill++] = Math.round(v * 32767);
      if (this.fill === this.chunk) {
        this.port.postMessage(this.pcm.buffer, [this.pcm.buffer]);
        this.pcm = new Int16Array(this.chunk);
        this.fill = 0;
      }
    }
    return true;
  }
}

// Reply playback: a queue of PCM chunks (already resampled to the context rate), played
// back to back. It starts once `prebufferMs` is queued (or the turn's audio has ended),
// re-buffers after an underrun (and buffers 40 ms more from then on, up to 240 ms: enough
// for network jitter; a generator slower than real time cannot be hidden by buffering), and
// is emptied by "clear" (interrupt / barge-in).
class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.inRate = o.inRate || 16000;
    this.prebuffer = Math.round(sampleRate * (o.prebufferMs || 80) / 1000);
    this.prebufferStep = Math.round(sampleRate * 0.04);
    this.maxPrebuffer = Math.round(sampleRate * 0.24);
    this.rs = new SincResampler(this.inRate, sampleRate);
    this.queue = []; this.head = 0; this.queued = 0;
    this.playing = false; this.ended = false; this.turn = 0; this.startedTurn = 0;
    this.underruns = 0; this.played = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.type === "pcm") {
      if (m.turn !== this.turn) { this.turn = m.turn; this.ended = false; }
      this.enqueue(this.rs.push(m.samples));
    } else if (m.type === "end") {             // no more audio for this turn: play it all out
      this.enqueue(this.rs.flush());
      this.rs = new SincResampler(this.inRate, sampleRate);
      this.ended = true;
    } else if (m.type === "clear") {
      this.queue = []; this.head = 0; this.queued = 0; this.playing = false;
      this.rs = new SincResampler(this.inRate, sampleRate);
      this.port.postMessage({ type: "cleared" });
    }
  }

  enqueue(y) {
    if (y.length) { this.queue.push(y); this.queued += y.length; }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    out.fill(0);
    if (!this.playing && this.queued > 0 && (this.queued >= this.prebuffer || this.ended)) {
      this.playing = true;
      if (this.startedTurn !== this.turn) {
        this.startedTurn = this.turn;
        this.port.postMessage({ type: "started", turn: this.turn, time: currentTime });
      }
    }
    if (!this.playing) return true;
    let i = 0;
    while (i < out.length && this.queue.length) {
      const c = this.queue[0];
      const n = Math.min(out.length - i, c.length - this.head);
      out.set(c.subarray(this.head, this.head + n), i);
      i += n; this.head += n; this.queued -= n;
      if (this.head === c.length) { this.queue.shift(); this.head = 0; }
    }
    this.played += i;
    if (this.queued === 0) {
      this.playing = false;
      if (i < out.length && !this.ended) {      // ran dry mid-reply: buffer more next time
        this.underruns++;
        this.prebuffer = Math.min(this.maxPrebuffer, this.prebuffer + this.prebufferStep);
      }
      this.port.postMessage({ type: "drained", turn: this.turn, underruns: this.underruns });
    }
    return true;
  }
}

registerProcessor("tandem-capture", CaptureProcessor);
registerProcessor("tandem-player", PlayerProcessor);
