// Tandem browser client: camera + microphone -> websocket (app/protocol.py) -> reply audio.
// Plain JS, no build step. Test hooks: window.tandemStats.
// URL parameters: token=..., source=demo (the demo scene), seed=N (its scenes), timer=S.
"use strict";

const KIND = { HANDSHAKE: 0, AUDIO_IN: 1, VIDEO_IN: 2, AUDIO_OUT: 3, EVENT: 4, ERROR: 5, VIDEO_OUT: 6 };
const INPUT_RATE = 16000, FRAME_MS = 250, FRAME_W = 320, FRAME_H = 240;
const MAX_BUFFERED = 512 * 1024;   // skip video frames while the socket is this far behind

const $ = (id) => document.getElementById(id);
const enc = new TextEncoder(), dec = new TextDecoder();

// latencies (s): response = end of speech -> first reply sound heard (this browser), server =
// end of speech arrived -> first reply audio sent (server clock), wait = end-of-turn wait,
// compute = compute latency (app/frames.py LATENCY_WORDS; the page's words come from /info)
const stats = window.tandemStats = {
  state: "idle", session: null, outputRate: null, audioBytesSent: 0, framesSent: 0,
  framesSkipped: 0, audioBytes: 0, audioChunks: 0, audioRms: 0, turns: 0,
  lastResponseLatency: null, lastServerLatency: null, lastWait: null, lastComputeLatency: null,
  events: 0, errors: [], underruns: 0, info: null, source: "camera", scene: null, scenes: 0,
  sceneFrames: 0, beeps: 0, lastReply: null,
};
let sumSq = 0, nSamples = 0;
let ctx = null, stream = null, ws = null, capture = null, player = null, sink = null;
let frameTimer = null, samplesSent = 0, sceneTimer = null, sceneUrl = null;
const params = new URLSearchParams(location.search);
let sent = [];                    // [session seconds at chunk end, performance.now()] per chunk
const turns = new Map();          // turn -> {row, speechEnd, capturedAt, heardAt}

function setState(state, text) {
  stats.state = state;
  const el = $("status");
  el.className = "pill " + state;
  el.textContent = text || state;
  $("start").textContent = (state === "idle" || state === "closed" || state === "error") ? "Start" : "Stop";
}

function showError(text) {
  stats.errors.push(text);
  const li = document.createElement("li");
  li.textContent = text;
  $("errors").prepend(li);
  while ($("errors").children.length > 5) $("errors").lastChild.remove();
  $("errors-box").hidden = false;
}

function send(kind, payload) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  const body = payload instanceof ArrayBuffer ? new Uint8Array(payload)
    : payload instanceof Uint8Array ? payload : enc.encode(JSON.stringify(payload));
  const msg = new Uint8Array(body.length + 1);
  msg[0] = kind;
  msg.set(body, 1);
  ws.send(msg.buffer);
  return true;
}

async function start() {
  setState("connecting", "starting…");
  $("errors-box").hidden = true;
  turns.clear(); currentTurn = 0;
  $("chat").replaceChildren(); $("turns").replaceChildren();
  const demo = $("source").value === "demo";
  stats.source = demo ? "demo" : "camera";
  $("source").disabled = true;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      video: demo ? false : { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15 } },
    });
  } catch (e) {
    setState("error", demo ? "no mic" : "no camera/mic");
    showError(`${demo ? "microphone" : "camera/microphone"} unavailable: ${e.message} (allow access, ` +
              "or open the page on localhost/https: browsers only grant it to secure pages)");
    $("source").disabled = false;
    return;
  }
  $("preview").srcObject = demo ? null : stream;
  $("preview").hidden = demo;
  $("scene-view").hidden = !demo;
  ctx = new AudioContext({ latencyHint: "interactive" });
  await ctx.audioWorklet.addModule("/static/worklets.js");
  const token = $("token").value || params.get("token") || undefined;
  const seed = params.get("seed") === null ? null : Number(params.get("seed"));
  const demoScene = demo ? { seed, scene_seconds: Number($("timer").value) } : undefined;
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    setState("connecting", "handshake…");
    send(KIND.HANDSHAKE, { protocol: 1, input_rate: INPUT_RATE, token, demo_scene: demoScene });
  };
  ws.onmessage = (e) => onMessage(new Uint8Array(e.data));
  ws.onerror = () => showError("websocket error (is the server running?)");
  ws.onclose = (e) => {
    if (stats.state !== "idle") setState(stats.state === "error" ? "error" : "closed",
      `closed${e.reason ? ": " + e.reason : ""}`);
    teardown();
  };
}

function onHandshake(h) {
  stats.session = h.session;
  stats.outputRate = h.output_rate;
  $("model").textContent = `${h.model} · session ${h.session}`;
  player = new AudioWorkletNode(ctx, "tandem-player", {
    numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: { inRate: h.output_rate, prebufferMs: 80 },
  });
  player.port.onmessage = (e) => onPlayer(e.data);
  player.connect(ctx.destination);
  capture = new AudioWorkletNode(ctx, "tandem-capture", {
    numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: { outRate: INPUT_RATE, chunkMs: 20 },
  });
  capture.port.onmessage = (e) => {
    if (send(KIND.AUDIO_IN, e.data)) {
      samplesSent += e.data.byteLength / 2;
      stats.audioBytesSent += e.data.byteLength;
      sent.push([samplesSent / INPUT_RATE, performance.now()]);
      if (sent.length > 3000) sent = sent.slice(-1500);
    }
  };
  sink = ctx.createGain();
  sink.gain.value = 0;                              // capture must be pulled, never heard
  ctx.createMediaStreamSource(stream).connect(capture);
  capture.connect(sink).connect(ctx.destination);
  ctx.resume();
  if (stats.source === "demo") sceneTimer = setInterval(showCountdown, 250);
  else frameTimer = setInterval(sendFrame, FRAME_MS);
  setState("live", "live");
}

const canvas = document.createElement("canvas");
canvas.width = FRAME_W; canvas.height = FRAME_H;
function sendFrame() {
  const video = $("preview");
  if (!ws || ws.readyState !== WebSocket.OPEN || video.readyState < 2) return;
  if (ws.bufferedAmount > MAX_BUFFERED) { stats.framesSkipped++; return; }
  const g = canvas.getContext("2d");
  const vw = video.videoWidth, vh = video.videoHeight, s = Math.max(FRAME_W / vw, FRAME_H / vh);
  g.drawImage(video, (FRAME_W - vw * s) / 2, (FRAME_H - vh * s) / 2, vw * s, vh * s);
  canvas.toBlob(async (blob) => {
    if (blob && send(KIND.VIDEO_IN, await blob.arrayBuffer())) stats.framesSent++;
  }, "image/jpeg", 0.75);
}

function onMessage(m) {
  if (m.length === 0) return;
  const kind = m[0];
  if (kind === KIND.AUDIO_OUT) return onAudio(m.slice(1).buffer);
  if (kind === KIND.VIDEO_OUT) return onSceneFrame(m.subarray(1));
  let obj;
  try { obj = JSON.parse(dec.decode(m.subarray(1))); } catch (e) { return showError("bad JSON from server"); }
  if (kind === KIND.HANDSHAKE) onHandshake(obj);
  else if (kind === KIND.EVENT) onEvent(obj);
  else if (kind === KIND.ERROR) {
    showError(`${obj.code}: ${obj.message}`);
    if (obj.code === "unauthorized") $("token").hidden = false;
    if (obj.code === "unauthorized" || obj.code === "busy") setState("error", obj.code);
  }
}

let currentTurn = 0;
function onAudio(buf) {
  const pcm = new Int16Array(buf);
  const f = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) { f[i] = pcm[i] / 32767; sumSq += f[i] * f[i]; }
  nSamples += pcm.length;
  stats.audioBytes += buf.byteLength;
  stats.audioChunks++;
  stats.audioRms = Math.sqrt(sumSq / Math.max(1, nSamples));
  if (player) player.port.postMessage({ type: "pcm", turn: currentTurn, samples: f }, [f.buffer]);
  const t = turns.get(currentTurn);
  if (t && t.receivedAt === undefined) t.receivedAt = performance.now();
}

// --- the demo scene (app/server_scene.py): frames to show, beeps to play, what it shows --------
function sessionNow() { return samplesSent / INPUT_RATE; }   // the server's clock, nearly

function onSceneFrame(jpeg) {
  stats.sceneFrames++;
  const url = URL.createObjectURL(new Blob([jpeg], { type: "image/jpeg" }));
  $("scene-view").src = url;
  if (sceneUrl) URL.revokeObjectURL(sceneUrl);
  sceneUrl = url;
}

function onScene(e) {
  stats.scene = e; stats.scenes++;
  $("scene-box").hidden = false;
  $("scene-desc").textContent = e.description.charAt(0).toUpperCase() + e.description.slice(1);
  $("scene-examples").replaceChildren(...e.examples.map((q) => {
    const li = document.createElement("li"); li.textContent = q; return li;
  }));
  showCountdown();
}

function showCountdown() {
  const e = stats.scene;
  if (!e) return;
  $("scene-next").textContent = e.next_at === null ? "a new scene when you press New scene"
    : `next scene in ${Math.max(0, Math.ceil(e.next_at - sessionNow()))} s (or press New scene)`;
}

function playBeep(e) {                       // a sine as the demo world's: 10 ms fades
  if (!ctx) return;
  const delay = e.t0 - sessionNow();
  if (delay + e.dur <= 0) return;            // too late: it is over
  const start = ctx.currentTime + Math.max(0, delay), dur = e.dur + Math.min(0, delay);
  const osc = ctx.createOscillator(), gain = ctx.createGain(), peak = Math.pow(10, e.level_dbfs / 20);
  osc.frequency.value = e.freq;
  gain.gain.setValueAtTime(0, start);
  gain.gain.linearRampToValueAtTime(peak, start + 0.01);
  gain.gain.setValueAtTime(peak, start + Math.max(0.01, dur - 0.01));
  gain.gain.linearRampToValueAtTime(0, start + dur);
  osc.connect(gain).connect(ctx.destination);
  osc.start(start); osc.stop(start + dur + 0.02);
  stats.beeps++;
}

function onPlayer(m) {
  if (m.type === "started") {
    const t = turns.get(m.turn);
    if (!t || t.heardAt !== undefined || t.capturedAt === undefined) return;
    const ts = ctx.getOutputTimestamp();
    t.heardAt = ts.performanceTime + (m.time - ts.contextTime) * 1000 + (ctx.outputLatency || 0) * 1000;
    stats.lastResponseLatency = (t.heardAt - t.capturedAt) / 1000;
    cell(t, "response", stats.lastResponseLatency);
  } else if (m.type === "drained") {
    stats.underruns = m.underruns;
  }
}

// local time at which session second `s` of the microphone stream was captured
function capturedAt(s) {
  for (const [end, now] of sent) if (end >= s) return now - (end - s) * 1000;
  return undefined;
}

function onEvent(e) {
  stats.events++;
  switch (e.type) {
    case "speech_start": $("listening").classList.add("on"); break;
    case "speech_end": $("listening").classList.remove("on"); break;
    case "transcript": bubble("user", e.text, e.turn).classList.remove("pending"); break;
    case "turn_start": {
      currentTurn = e.turn;
      const row = $("turns").insertRow(0);
      row.innerHTML = `<td>${e.turn}</td><td class="text">…</td><td data-k="response">…</td>` +
        `<td data-k="wait">…</td><td data-k="compute">…</td><td data-k="audio">…</td>` +
        `<td data-k="ended">…</td>`;
      turns.set(e.turn, { row, speechEnd: e.speech_end, capturedAt: capturedAt(e.speech_end) });
      const said = (e.speech_end - e.speech_start).toFixed(1);
      bubble("user", `speech, ${said} s`, e.turn).classList.add("pending");
      bubble("agent", "…", e.turn);
      break;
    }
    case "reply_text": {
      bubble("agent", e.text, e.turn);
      const t = turns.get(e.turn);
      if (t) t.row.querySelector(".text").textContent = e.text.trim();
      break;
    }
    case "interrupt":
      if (player) player.port.postMessage({ type: "clear" });
      $("log").textContent = `turn ${e.turn} interrupted (${e.reason})`;
      break;
    case "turn_end":
      if (player) player.port.postMessage({ type: "end" });
      break;
    case "metrics": {
      stats.turns++;
      stats.lastServerLatency = e.browser_response_latency;
      stats.lastWait = e.end_of_turn_wait;
      stats.lastComputeLatency = e.compute_latency;
      stats.lastReply = e.text;
      const t = turns.get(e.turn);
      if (t) {
        cell(t, "wait", e.end_of_turn_wait);
        cell(t, "compute", e.compute_latency);
        if (e.browser_response_latency !== null && e.browser_response_latency !== undefined)
          t.row.querySelector('[data-k="response"]').title = "first reply audio sent by the server: " +
            `${Math.round(e.browser_response_latency * 1000)} ms after your speech ended`;
        t.row.querySelector('[data-k="audio"]').textContent =
          `${e.reply_seconds.toFixed(1)} s${e.interrupted ? " ✂" : ""}`;
        if (e.turn_end)       // servers before turn taking send no turn_end
          t.row.querySelector('[data-k="ended"]').textContent = e.turn_end.replace("_", " ") +
            (e.discarded_starts ? ` +${e.discarded_starts}` : "");
        if (t.heardAt === undefined) cell(t, "response", null);
        if (e.text) t.row.querySelector(".text").textContent = e.text.trim();
      }
      break;
    }
    case "scene": onScene(e); break;
    case "scene_beep": playBeep(e); break;
    case "shutdown": showError(`server: ${e.message}`); setState("closed", "server stopped"); break;
  }
}

function cell(t, k, seconds) {
  t.row.querySelector(`[data-k="${k}"]`).textContent =
    seconds === null || seconds === undefined ? "–" : `${Math.round(seconds * 1000)} ms`;
}

function bubble(who, text, turn) {
  const id = `${who}-${turn}`;
  let el = document.getElementById(id);
  if (!el) {
    el = document.createElement("div");
    el.id = id;
    el.className = `bubble ${who}`;
    $("chat").append(el);
  }
  el.textContent = text.trim();
  $("chat").scrollTop = $("chat").scrollHeight;
  return el;
}

function teardown() {
  clearInterval(frameTimer); frameTimer = null;
  clearInterval(sceneTimer); sceneTimer = null;
  $("source").disabled = false;
  if (capture) { capture.port.postMessage("stop"); capture.disconnect(); capture = null; }
  if (player) { player.disconnect(); player = null; }
  if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
  if (ctx) { ctx.close(); ctx = null; }
  $("listening").classList.remove("on");
  samplesSent = 0; sent = [];
}

function stop() {
  setState("idle", "stopped");
  if (ws) { ws.onclose = null; ws.close(1000, "stopped by the user"); ws = null; }
  teardown();
}

function control(action) { send(KIND.EVENT, { type: "control", action }); }

$("start").onclick = () => (stats.state === "live" || stats.state === "connecting" ? stop() : start());
$("interrupt").onclick = () => control("interrupt");
$("reset").onclick = () => control("reset");
$("new-scene").onclick = () => control("new_scene");
$("token").value = params.get("token") || "";
$("token").hidden = !$("token").value;

// --- what the model knows and the latency words: GET /info (app/server_scene.py) ---------------
function showSource() {
  const demo = $("source").value === "demo";
  $("new-scene").hidden = !demo; $("timer").hidden = !demo;
  $("view-title").textContent = demo ? "Demo scene: what the agent sees" : "Camera";
  $("source-hint").textContent = demo
    ? "The server renders the demo world (10 frames per second) and mixes its beeps into what " +
      "the agent hears; you hear them too, and your microphone asks (16 kHz)."
    : "Microphone audio streams at 16 kHz, camera frames at 4 per second.";
}
$("source").onchange = showSource;
if (params.get("source") === "demo") $("source").value = "demo";
if (params.get("timer") !== null) {
  const v = String(Number(params.get("timer")));
  if (![...$("timer").options].some((o) => o.value === v)) $("timer").add(new Option(`every ${v} s`, v));
  $("timer").value = v;
}
showSource();

async function loadInfo() {
  try {
    const info = await (await fetch("/info")).json();
    const about = $("about");
    about.replaceChildren(...info.world.map((line) => {
      const p = document.createElement("p"); p.textContent = line; return p;
    }));
    const ul = document.createElement("ul");
    for (const g of info.questions) {
      const li = document.createElement("li");
      const span = document.createElement("span");
      span.textContent = `${g.group}: `;
      li.append(span, g.questions.join(" · "));
      ul.append(li);
    }
    const head = document.createElement("p");
    head.textContent = "The questions it understands (colour, shape, left/middle/right: say one):";
    about.append(head, ul);
    for (const th of document.querySelectorAll("th[data-latency]")) {
      const w = info.latency[th.dataset.latency];
      if (w) th.title = `${w.name}: ${w.text}`;
    }
    $("latency-legend").textContent = Object.values(info.latency)
      .map((w) => `${w.name} = ${w.text}`).join("; ") + ". Hover a response cell for the server's view.";
    stats.info = info;
  } catch (e) {
    showError(`could not load /info: ${e.message}`);
  }
}
loadInfo();
setState("idle", "not connected");
