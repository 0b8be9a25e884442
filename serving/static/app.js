// The demo page: microphone -> /ws (protocol v1, docs/protocol.md) -> streamed reply playback.
//
// Capture: getUserMedia -> AudioContext at the device rate -> capture-worklet.js (resamples to the
// server's rate, PCM16, 20 ms chunks) -> binary frames. Playback: every reply frame becomes an
// AudioBuffer at the server's rate, scheduled at a running play-head so the frames play gaplessly;
// the playback context runs at the server's rate where the browser allows it, so the frames are
// played sample for sample and the browser resamples the output stream once.
//
// Test hooks: window.s2sDemo holds the counters (state, framesReceived, samplesScheduled,
// samplesPlayed, repliesDone, lastFirstAudioMs, errors, ...); the elements have stable ids.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const PLAYBACK_LEAD_S = 0.05;   // cushion before the first frame of a reply (network jitter)
  const STATS_EVERY_MS = 2000;
  const EMOTION_TE = {
    neutral: 'సాధారణం', happy: 'సంతోషం', laugh: 'నవ్వు', excited: 'ఉత్సాహం',
    empathy: 'సానుభూతి', surprise: 'ఆశ్చర్యం', thinking: 'ఆలోచన',
    telugu_heavy_accent: 'బలమైన యాస', telugu_mild_accent: 'తేలికపాటి యాస',
  };

  const demo = window.s2sDemo = {
    state: 'loading', config: null, session: null, speaker: null, emotion: null, voice: null,
    chunksSent: 0, samplesSent: 0, chunksDropped: 0,
    framesReceived: 0, samplesScheduled: 0, samplesPlayed: 0, underruns: 0,
    repliesDone: 0, lastFirstAudioMs: null, lastReplyMetrics: null, lastReplyText: null, stats: null, errors: [],
  };

  let config = null;
  let ws = null;
  let stopping = false;
  let captureCtx = null;
  let playCtx = null;
  let micStream = null;
  let playHead = 0;               // playCtx time at which the next reply frame starts
  let endOfUtteranceAt = null;    // performance.now() of the end of the current utterance
  let awaitingFirstFrame = false;
  let replyStarting = true;       // the next frame is the first of a reply
  let sentThisTurn = 0;           // samples sent since the last end of utterance

  // --- display --------------------------------------------------------------------------------

  function log(text) {
    const item = document.createElement('li');
    item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
    const list = $('log');
    list.prepend(item);
    while (list.children.length > 80) list.lastChild.remove();
  }

  function addError(source, code, message) {
    demo.errors.push({ source, code, message, at: Date.now() });
    const item = document.createElement('li');
    item.textContent = `${code}: ${message}`;
    $('errors').append(item);
    $('no-errors').hidden = true;
    log(`error ${code}: ${message}`);
  }

  const ms = (v) => (typeof v === 'number' && isFinite(v) ? `${v < 10 ? v.toFixed(1) : v.toFixed(0)} ms` : '-');

  function setState(state) {
    demo.state = state;
    $('state').textContent = state;
    const live = ['connecting', 'listening', 'replying', 'playing'].includes(state);
    $('start').disabled = live || !config;
    $('stop').disabled = !live;
    $('server-vad').disabled = live;
    $('token').disabled = live;
    $('end-utterance').disabled = !(state === 'listening' && sentThisTurn > 0);
  }

  // --- voice controls: two radio groups of buttons ---------------------------------------------

  function buildChoices(containerId, kind, names, initial) {
    const box = $(containerId);
    box.replaceChildren();
    for (const name of names) {
      const button = document.createElement('button');
      button.type = 'button';
      button.id = `${kind}-${name}`;
      button.dataset.value = name;
      button.setAttribute('role', 'radio');
      const gloss = kind === 'emotion' && EMOTION_TE[name];
      button.textContent = name.replace(/_/g, ' ');
      if (gloss) {
        const te = document.createElement('span');
        te.lang = 'te';
        te.textContent = ` · ${gloss}`;
        button.append(te);
      }
      button.addEventListener('click', () => choose(kind, name, true));
      button.addEventListener('keydown', (event) => {
        const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
        if (!step) return;
        event.preventDefault();
        const next = names[(names.indexOf(name) + step + names.length) % names.length];
        choose(kind, next, true);
        $(`${kind}-${next}`).focus();
      });
      box.append(button);
    }
    choose(kind, initial, false);
  }

  function choose(kind, name, byUser) {
    demo[kind] = name;
    const box = $(kind === 'speaker' ? 'speakers' : 'emotions');
    for (const button of box.children) {
      const on = button.dataset.value === name;
      button.setAttribute('aria-checked', String(on));
      button.tabIndex = on ? 0 : -1;
    }
    if (byUser && demo.session && ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: 'voice', speaker: demo.speaker, emotion: demo.emotion }));
      log(`voice -> ${demo.speaker} / ${demo.emotion}`);
    }
  }

  // --- configuration and server stats ---------------------------------------------------------

  const tokenQuery = () => {
    const token = $('token').value.trim();
    return config && config.token_required && token ? `?token=${encodeURIComponent(token)}` : '';
  };

  async function loadConfig() {
    try {
      const response = await fetch('/config');
      if (!response.ok) throw new Error(`GET /config: HTTP ${response.status}`);
      config = demo.config = await response.json();
    } catch (err) {
      addError('page', 'config', String(err.message || err));
      setState('idle');
      return;
    }
    buildChoices('speakers', 'speaker', config.speakers,
      config.speakers.includes('female_young') ? 'female_young' : config.speakers[0]);
    buildChoices('emotions', 'emotion', config.emotions,
      config.emotions.includes('neutral') ? 'neutral' : config.emotions[0]);
    $('token-row').hidden = !config.token_required;
    setState('idle');
    pollStats();
    setInterval(pollStats, STATS_EVERY_MS);
  }

  async function pollStats() {
    if (config.token_required && !tokenQuery()) {
      $('stats-sessions').textContent = 'token needed';
      return;
    }
    try {
      const response = await fetch(`/stats${tokenQuery()}`);
      if (!response.ok) {
        $('stats-sessions').textContent = `HTTP ${response.status}`;
        return;
      }
      const stats = demo.stats = await response.json();
      const latency = stats.first_audio_latency_ms || {};
      $('stats-sessions').textContent = `${stats.sessions} live / ${stats.sessions_total}`;
      $('stats-replies').textContent = String(stats.replies_total);
      $('stats-p50').textContent = ms(latency.p50);
      $('stats-p95').textContent = ms(latency.p95);
    } catch (err) {
      $('stats-sessions').textContent = 'server unreachable';
    }
  }

  // --- audio ----------------------------------------------------------------------------------

  function makePlaybackContext(rate) {
    try {
      return new AudioContext({ sampleRate: rate, latencyHint: 'interactive' });
    } catch (err) {  // a browser without the sampleRate option resamples each buffer instead
      return new AudioContext({ latencyHint: 'interactive' });
    }
  }

  async function startAudio() {
    playCtx = makePlaybackContext(config.sample_rate);
    captureCtx = new AudioContext({ latencyHint: 'interactive' });
    await captureCtx.audioWorklet.addModule('/static/capture-worklet.js');
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const source = captureCtx.createMediaStreamSource(micStream);
    const capture = new AudioWorkletNode(captureCtx, 's2s-capture', {
      numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { targetRate: config.sample_rate, chunkMs: 20 },
    });
    const mute = captureCtx.createGain();   // the graph must reach the destination to be pulled
    mute.gain.value = 0;
    source.connect(capture).connect(mute).connect(captureCtx.destination);
    capture.port.onmessage = (event) => onMicChunk(new Int16Array(event.data));
    await Promise.all([captureCtx.resume(), playCtx.resume()]);
    log(`microphone at ${captureCtx.sampleRate} Hz -> ${config.sample_rate} Hz; playback at ${playCtx.sampleRate} Hz`);
  }

  async function stopAudio() {
    if (micStream) micStream.getTracks().forEach((track) => track.stop());
    micStream = null;
    for (const ctx of [captureCtx, playCtx]) if (ctx && ctx.state !== 'closed') await ctx.close().catch(() => {});
    captureCtx = playCtx = null;
  }

  function onMicChunk(chunk) {
    let energy = 0;
    for (let i = 0; i < chunk.length; i++) energy += chunk[i] * chunk[i];
    const dbfs = 10 * Math.log10(energy / Math.max(1, chunk.length) / (32768 * 32768) + 1e-12);
    $('mic-level').value = Math.max(-80, dbfs);

    if (demo.state === 'playing' && playCtx && playCtx.currentTime >= playHead) setState('listening');
    // half duplex: the server ignores audio while it replies, and sending the reply's own sound
    // (from the speakers) after it would start a turn of its own
    if (demo.state !== 'listening' || !ws || ws.readyState !== WebSocket.OPEN) {
      demo.chunksDropped += 1;
      return;
    }
    ws.send(chunk.buffer);
    demo.chunksSent += 1;
    demo.samplesSent += chunk.length;
    sentThisTurn += chunk.length;
    if (sentThisTurn === chunk.length) $('end-utterance').disabled = false;
  }

  function onReplyFrame(buffer) {
    const pcm = new Int16Array(buffer);
    demo.framesReceived += 1;
    $('metric-frames').textContent = String(demo.framesReceived);
    if (awaitingFirstFrame && endOfUtteranceAt !== null) {
      awaitingFirstFrame = false;
      demo.lastFirstAudioMs = performance.now() - endOfUtteranceAt;
      $('metric-first-audio').textContent = ms(demo.lastFirstAudioMs);
    }
    if (!playCtx || pcm.length === 0) return;
    const audio = playCtx.createBuffer(1, pcm.length, config.sample_rate);
    const samples = audio.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    const node = playCtx.createBufferSource();
    node.buffer = audio;
    node.connect(playCtx.destination);
    const now = playCtx.currentTime;
    const firstOfReply = replyStarting;
    replyStarting = false;
    if (playHead < now) {           // a new reply, or the stream fell behind: restart with a cushion
      if (!firstOfReply) {
        demo.underruns += 1;
        $('metric-underruns').textContent = String(demo.underruns);
      }
      playHead = now + PLAYBACK_LEAD_S;
    }
    node.start(playHead);
    playHead += pcm.length / config.sample_rate;
    demo.samplesScheduled += pcm.length;
    node.onended = () => { demo.samplesPlayed += pcm.length; };
  }

  // --- the session ----------------------------------------------------------------------------

  async function start() {
    if (ws || !config) return;
    stopping = false;
    sentThisTurn = 0;
    playHead = 0;                   // a new playback context's clock starts at 0
    endOfUtteranceAt = null;
    awaitingFirstFrame = false;
    replyStarting = true;
    setState('connecting');
    try {
      await startAudio();
    } catch (err) {
      addError('page', 'microphone', `no microphone audio: ${err.message || err}`);
      await stopAudio();
      setState('idle');
      return;
    }
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    ws = new WebSocket(`${scheme}://${location.host}/ws${tokenQuery()}`);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => {
      const vad = $('server-vad').checked ? 'server' : 'client';
      ws.send(JSON.stringify({
        type: 'start', protocol: config.protocol, speaker: demo.speaker, emotion: demo.emotion,
        sample_rate: config.sample_rate, vad,
      }));
      log(`connected; start ${demo.speaker} / ${demo.emotion}, vad ${vad}`);
    };
    ws.onmessage = (event) => {
      if (typeof event.data === 'string') onControl(event.data);
      else onReplyFrame(event.data);
    };
    ws.onclose = async (event) => {
      if (!(stopping && event.code === 1000)) {
        addError('close', `close_${event.code}`, event.reason || 'the connection closed');
      }
      log(`closed ${event.code} ${event.reason}`);
      ws = null;
      demo.session = null;
      await stopAudio();
      setState('closed');
    };
  }

  function onControl(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch (err) {
      addError('page', 'bad_frame', `not JSON from the server: ${text.slice(0, 80)}`);
      return;
    }
    switch (message.type) {
      case 'ready':
        demo.session = message.session;
        demo.voice = { speaker: message.speaker, emotion: message.emotion };
        $('session-info').textContent = `session ${message.session}, ${message.sample_rate} Hz, vad ${message.vad}`;
        $('voice-current').textContent = `${message.speaker} / ${message.emotion}`;
        log(`ready: session ${message.session}`);
        setState('listening');
        break;
      case 'end_of_utterance':
        if (message.source === 'server' || endOfUtteranceAt === null) endOfUtteranceAt = performance.now();
        awaitingFirstFrame = true;
        replyStarting = true;
        sentThisTurn = 0;
        log(`end of utterance (${message.source})`);
        setState('replying');
        break;
      case 'reply_end': {
        const m = demo.lastReplyMetrics = message.metrics || {};
        demo.lastReplyText = message.text || '';
        $('reply-text').textContent = demo.lastReplyText || '-';
        demo.repliesDone += 1;
        endOfUtteranceAt = null;
        awaitingFirstFrame = false;
        $('metric-server-first-audio').textContent = ms(m.first_audio_ms);
        const num = (v, digits, unit) => (typeof v === 'number' ? `${v.toFixed(digits)}${unit}` : '-');
        $('metric-reply-seconds').textContent = num(m.reply_seconds, 2, ' s');
        $('metric-rtf').textContent = num(m.reply_realtime_factor, 1, '×');
        $('metric-replies').textContent = String(demo.repliesDone);
        log(`reply end: ${m.frames} frames, first audio ${ms(m.first_audio_ms)} on the server`);
        setState(playCtx && playHead > playCtx.currentTime ? 'playing' : 'listening');
        break;
      }
      case 'voice':
        demo.voice = { speaker: message.speaker, emotion: message.emotion };
        $('voice-current').textContent = `${message.speaker} / ${message.emotion}`;
        break;
      case 'error':
        addError('server', message.code, message.message);
        if (demo.state === 'connecting') {      // start was refused: nothing more to do here
          stop();
          break;
        }
        if (['empty_utterance', 'utterance_too_long'].includes(message.code)) {  // the turn is over
          endOfUtteranceAt = null;
          awaitingFirstFrame = false;
          if (demo.state === 'replying') setState('listening');
        }
        break;
      default:
        log(`unknown message ${message.type}`);
    }
  }

  function endUtterance() {
    if (!ws || demo.state !== 'listening') return;
    endOfUtteranceAt = performance.now();
    awaitingFirstFrame = true;
    ws.send(JSON.stringify({ type: 'end_of_utterance' }));
    setState('replying');
  }

  function stop() {
    if (!ws) return;
    stopping = true;
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'stop' }));
    else ws.close();
    const socket = ws;
    setTimeout(() => { if (socket.readyState !== WebSocket.CLOSED) socket.close(); }, 2000);
  }

  $('start').addEventListener('click', start);
  $('end-utterance').addEventListener('click', endUtterance);
  $('stop').addEventListener('click', stop);
  window.addEventListener('pagehide', () => { if (ws) { stopping = true; ws.close(1000); } });
  loadConfig();
})();
