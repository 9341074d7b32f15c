// The page: records the microphone, streams it as 16-bit PCM to v1/stream, and shows what comes back:
// finals as the lines of a transcript, the utterance still being spoken as its committed words followed
// by its tentative ones. The protocol is the README's "Streaming protocol".
import { startPipelinePanel } from './pipeline.js';

const SAMPLE_RATE = 16000; // what the model hears; a browser that cannot capture at it sends its own rate, resampled by the server
const FRAME_S = 0.1; // audio per WebSocket message: 10 messages a second, far below the server's limit of 200
const KEY_STORAGE = 'asr.apiKey';

const $ = (id) => document.getElementById(id);
const ui = {
  key: $('api-key'), start: $('start'), stop: $('stop'), model: $('model'), level: $('level'), clock: $('clock'),
  status: $('status'), session: $('session'), transcript: $('transcript'), finals: $('finals'), empty: $('empty'),
  stable: $('partial').querySelector('.stable'), tentative: $('partial').querySelector('.tentative'),
};

/** The microphone as 16-bit PCM blocks, through the AudioWorklet in pcm-worklet.js. */
class Microphone {
  onpcm = null; // called with an Int16Array of each 128-sample block

  constructor(media, context, node) {
    this.media = media;
    this.context = context;
    this.node = node;
    node.port.onmessage = (event) => this.onpcm?.(event.data);
  }

  get sampleRate() {
    return this.context.sampleRate;
  }

  static async open() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error('this browser lends its microphone only to https:// pages and to localhost');
    }
    // the model wants the voice as it is: no echo cancellation, noise suppression or gain riding
    const media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    let context = new AudioContext({ sampleRate: SAMPLE_RATE }); // Chrome resamples the microphone to it
    try {
      let source;
      try {
        source = context.createMediaStreamSource(media);
      } catch {
        // Firefox cannot feed a microphone into a context of another rate: capture at the device's rate
        await context.close();
        context = new AudioContext();
        source = context.createMediaStreamSource(media);
      }
      await context.audioWorklet.addModule(new URL('pcm-worklet.js', import.meta.url));
      const node = new AudioWorkletNode(context, 'pcm-s16le', { channelCount: 1, channelCountMode: 'explicit' });
      // the graph runs only what leads to its destination; the node's output is silence
      source.connect(node).connect(context.destination);
      await context.resume(); // an autoplay policy may have started it suspended
      return new Microphone(media, context, node);
    } catch (error) {
      media.getTracks().forEach((track) => track.stop());
      if (context.state !== 'closed') context.close();
      throw error;
    }
  }

  close() {
    this.onpcm = null;
    this.node.disconnect();
    this.media.getTracks().forEach((track) => track.stop()); // the browser's recording indicator goes off
    this.context.close();
  }
}

/** One session of v1/stream: microphone blocks batched into frames of FRAME_S, server events to the handlers. */
class LiveStream {
  #socket;
  #microphone;
  #rate;
  #frame;
  #filled = 0;
  #queued = []; // frames recorded while the handshake is still going on
  #sentSamples = 0;
  #opened = false;
  #stopRequested = false;
  #closedReason = null;

  constructor({ onMessage, onAudio, onEnd }) {
    this.onMessage = onMessage; // each JSON event
    this.onAudio = onAudio; // (level 0..1, seconds sent) once a frame
    this.onEnd = onEnd; // ({ opened, code, reason }) once the socket has closed
  }

  async start({ apiKey, model }) {
    this.#microphone = await Microphone.open();
    this.#rate = this.#microphone.sampleRate;
    this.#frame = new Int16Array(Math.round(this.#rate * FRAME_S));
    const url = new URL('v1/stream', location.href); // same origin, so it also works behind TLS or a path prefix
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('sample_rate', this.#rate);
    if (apiKey) url.searchParams.set('api_key', apiKey); // a browser's WebSocket cannot send an Authorization header
    if (model) url.searchParams.set('model', model);
    const socket = (this.#socket = new WebSocket(url));
    socket.onopen = () => {
      this.#opened = true;
      this.#queued.forEach((frame) => socket.send(frame));
      this.#queued = [];
      if (this.#stopRequested) this.#finish();
    };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === 'closed') this.#closedReason = message.reason;
      this.onMessage(message);
    };
    socket.onclose = (event) => {
      this.#release();
      this.onEnd({ opened: this.#opened, code: event.code, reason: this.#closedReason });
    };
    this.#microphone.onpcm = (pcm) => this.#push(pcm);
  }

  /** Stop recording; the server sends the final of what it got, then closes. */
  stop() {
    this.#release();
    if (this.#filled) this.#sendFrame();
    if (this.#socket.readyState === WebSocket.OPEN) this.#finish();
    else this.#stopRequested = true;
  }

  #finish() {
    this.#socket.send(JSON.stringify({ type: 'finalize' }));
    this.#socket.send(JSON.stringify({ type: 'close' }));
  }

  #release() {
    this.#microphone?.close();
    this.#microphone = null;
  }

  #push(pcm) {
    for (let offset = 0; offset < pcm.length;) {
      const n = Math.min(pcm.length - offset, this.#frame.length - this.#filled);
      this.#frame.set(pcm.subarray(offset, offset + n), this.#filled);
      this.#filled += n;
      offset += n;
      if (this.#filled === this.#frame.length) this.#sendFrame();
    }
  }

  #sendFrame() {
    const frame = this.#frame.slice(0, this.#filled);
    this.#filled = 0;
    this.#sentSamples += frame.length;
    this.onAudio(level(frame), this.#sentSamples / this.#rate);
    if (this.#socket.readyState === WebSocket.OPEN) this.#socket.send(frame);
    else if (this.#socket.readyState === WebSocket.CONNECTING) this.#queued.push(frame);
  }
}

/** Loudness of 16-bit samples on a 0..1 scale that spans -60 to 0 dBFS. */
function level(samples) {
  let sum = 0;
  for (const s of samples) sum += s * s;
  const rms = Math.sqrt(sum / samples.length) / 32768;
  return Math.max(0, Math.min(1, 1 + (20 * Math.log10(rms || 1e-9)) / 60));
}

function formatClock(seconds) {
  const s = Math.floor(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

function setStatus(text, kind = 'info') {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind; // info | live | error
}

function authHeaders() {
  const key = ui.key.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The model chosen in the picker, or null for the server's default (the picker shows only when there is a choice). */
function chosenModel() {
  return ui.model.hidden ? null : ui.model.value;
}

let live = null; // the stream being recorded or finishing
let sessionModel = null; // the model the last session's ready event named
let sessionSeconds = 0;
let lastError = null; // the last error event of the session: the reason a closing stream gives

/** Apply a change to the transcript; it follows the newest words unless the reader has scrolled up. */
function updateTranscript(change) {
  const box = ui.transcript;
  const following = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  change();
  if (following) box.scrollTop = box.scrollHeight;
}

function showPartial({ text, stable }) {
  updateTranscript(() => {
    const committed = text.startsWith(stable) ? stable : '';
    ui.stable.textContent = committed;
    ui.tentative.textContent = text.slice(committed.length);
    ui.empty.hidden = true;
  });
}

function addFinal({ text, start, end, reason }) {
  updateTranscript(() => {
    ui.stable.textContent = ui.tentative.textContent = '';
    if (!text.trim()) return; // a finalize with nothing said since the last final
    const time = document.createElement('time');
    time.textContent = formatClock(start);
    time.title = `${start.toFixed(2)}–${end.toFixed(2)} s of the stream, ended by ${reason}`;
    const words = document.createElement('span');
    words.textContent = text.trim();
    const line = document.createElement('li');
    line.append(time, words);
    ui.finals.append(line);
    ui.empty.hidden = true;
  });
}

function onMessage(message) {
  switch (message.type) {
    case 'ready':
      sessionModel = message.model;
      ui.session.textContent = `model ${message.model} · session ${message.session_id}`;
      setStatus('Listening: speak now.', 'live');
      break;
    case 'partial':
      showPartial(message);
      break;
    case 'final':
      addFinal(message);
      break;
    case 'error': // the stream goes on unless a limit was hit; then it closes right after
      lastError = `${message.code}: ${message.message}`;
      setStatus(lastError, 'error');
      break;
  }
}

function onAudio(loudness, seconds) {
  ui.level.style.width = `${Math.round(loudness * 100)}%`;
  ui.clock.textContent = formatClock(seconds);
  sessionSeconds = seconds;
}

async function onEnd({ opened, code, reason }) {
  live = null;
  ui.start.disabled = false;
  ui.stop.disabled = true;
  ui.level.style.width = '0';
  if (!opened) {
    setStatus(await explainRefusal(), 'error');
  } else if (code === 1000) {
    const count = ui.finals.children.length;
    setStatus(`Stopped: ${count} utterance${count === 1 ? '' : 's'} from ${formatClock(sessionSeconds)} of audio.`);
  } else if (reason === 'server_shutdown') {
    setStatus('The server is shutting down (server_shutdown): press Start to reconnect.', 'error');
  } else {
    setStatus(`The stream ended: ${lastError ?? reason ?? 'the connection was lost'} (close code ${code}).`, 'error');
  }
}

/** A browser never sees why a WebSocket handshake was refused; ask the server's HTTP side instead. */
async function explainRefusal() {
  try {
    const ready = await fetch('readyz', { cache: 'no-store' });
    if (!ready.ok) {
      const body = await ready.json().catch(() => null);
      return `The server is not ready: ${body?.error?.message ?? `HTTP ${ready.status}`}.`;
    }
    const auth = await fetch('v1/pipeline', { headers: authHeaders(), cache: 'no-store' });
    if (auth.status === 401) return 'The server needs an API key: enter a valid one above.';
  } catch {
    return 'The server cannot be reached.';
  }
  return 'The server refused the stream: all its stream slots may be taken. Try again in a few seconds.';
}

async function start() {
  ui.start.disabled = true;
  ui.finals.replaceChildren();
  ui.stable.textContent = ui.tentative.textContent = '';
  ui.empty.hidden = false;
  ui.clock.textContent = formatClock(0);
  ui.session.textContent = '';
  lastError = null;
  setStatus('Waiting for the microphone…');
  const stream = new LiveStream({ onMessage, onAudio, onEnd });
  try {
    await stream.start({ apiKey: ui.key.value.trim(), model: chosenModel() });
  } catch (error) {
    setStatus(`No microphone: ${error.message || error.name}.`, 'error');
    ui.start.disabled = false;
    return;
  }
  live = stream;
  ui.stop.disabled = false;
  setStatus('Connecting…');
}

function stop() {
  ui.stop.disabled = true;
  setStatus('Finishing the last utterance…');
  live.stop();
}

/** Fills the model picker from v1/models; it shows only when the server offers a choice. */
async function loadModels() {
  try {
    const response = await fetch('v1/models', { headers: authHeaders(), cache: 'no-store' });
    if (!response.ok) return; // 401: tried again once a key is entered
    const { data } = await response.json();
    ui.model.replaceChildren(...data.map((model) => new Option(model.id, model.id, model.default, model.default)));
    ui.model.hidden = data.length < 2;
  } catch {
    // the pipeline panel says when the server cannot be reached
  }
}

ui.key.value = localStorage.getItem(KEY_STORAGE) ?? '';
ui.key.addEventListener('change', () => {
  localStorage.setItem(KEY_STORAGE, ui.key.value.trim());
  loadModels();
});
ui.start.addEventListener('click', start);
ui.stop.addEventListener('click', stop);
loadModels();
startPipelinePanel({ headers: authHeaders, model: () => chosenModel() ?? sessionModel });
