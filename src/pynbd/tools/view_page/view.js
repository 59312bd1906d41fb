// pynbd view: draws each export as a grid, one cell per block, from the WebSocket /ws.
// Messages are the view filter's (see the view filter's manual page), with "src": the
// panel. The first message, "init", carries each panel as it was at the start of the
// history, and the history; the page replays it, then applies messages as they come.
"use strict";

const COLOURS = { W: [224, 0, 0], R: [0, 0, 0], T: [200, 160, 255], Z: [255, 255, 255],
                  C: [80, 80, 80] };
const HOLE = [200, 200, 200], DATA = [96, 112, 144], BACKGROUND = [245, 245, 245];
const KINDS = { R: "read", W: "write", T: "trim", Z: "zero", C: "cache", F: "flush",
                E: "extents" };
const HISTORY_SECONDS = 300;

const HISTORY_EVENTS = 2000000;
// Frames drawn a second at most (a frame redraws every cell still fading).
const MAX_FPS = 30;
// By a request's kind code: its letter, its colour (drawn kinds only).
const LETTER = [], COLOUR_OF = [];
for (const k in KINDS) LETTER[k.charCodeAt(0)] = k;
for (const k in COLOURS) COLOUR_OF[k.charCodeAt(0)] = COLOURS[k];

const view = window.pynbdView = {
  settings: { fade: 1, zoom: 4 }, panels: [], origin: [], history: [], historyEvents: 0,
  eventsSeen: 0, ready: false, live: true, viewTime: 0, offset: null, latest: 0,
};

function makePanel(p) {
  const nblocks = Math.ceil(p.size / p.block);
  const base = new Uint8Array(nblocks);
  if (p.base) {
    const raw = atob(p.base);
    for (let i = 0; i < Math.min(raw.length, nblocks); i++) base[i] = raw.charCodeAt(i);
  }
  const counters = {};
  for (const k in KINDS) counters[k] = p.counters && p.counters[k] ? p.counters[k].slice() : [0, 0];
  return { name: p.name, size: p.size, block: p.block, nblocks, base,
           kind: new Uint8Array(nblocks), when: new Float64Array(nblocks), counters,
           errors: p.errors || 0, dropped: p.dropped || 0, hot: new Set(), rate: [] };
}

function clonePanel(p) {
  const c = makePanel({ name: p.name, size: p.size, block: p.block, counters: p.counters,
                        errors: p.errors, dropped: p.dropped });
  c.base.set(p.base); c.kind.set(p.kind); c.when.set(p.when);
  return c;
}

function resize(p, size) {
  if (size <= p.size) return;
  const n = Math.ceil(size / p.block);
  for (const key of ["base", "kind", "when"]) {
    const a = new p[key].constructor(n);
    a.set(p[key]);
    p[key] = a;
  }
  p.size = size; p.nblocks = n; p.layoutDirty = true;
}

function range(p, offset, length) {
  return [Math.min(Math.floor(offset / p.block), p.nblocks),
          Math.min(Math.ceil((offset + length) / p.block), p.nblocks)];
}

// Bytes per kind in tenths of a second (the counters' MiB/s over the last second).
function countRate(p, t, code, length) {
  const id = Math.floor(t * 10);
  let r = p.rate[p.rate.length - 1];
  if (!r || r.id !== id) {
    r = { id, bytes: new Float64Array(128) };
    p.rate.push(r);
    if (p.rate.length > 100) p.rate.shift();
  }
  r.bytes[code & 127] += length;
}

// One request (kind: its letter's code; time in µs); no allocation: a busy disk sends
// tens of thousands a second.
function applyOne(p, code, offset, length, err, tus, track) {
  const c = p.counters[LETTER[code]];
  if (!c) return;
  const t = tus / 1e6;
  if (track) {
    view.eventsSeen++;
    countRate(p, t, code, length);
  }
  if (err) { p.errors++; return; }
  c[0]++; c[1] += length;
  if (COLOUR_OF[code] === undefined || length <= 0) return;
  if (offset + length > p.size) resize(p, offset + length);
  const a = Math.min(Math.floor(offset / p.block), p.nblocks);
  const b = Math.min(Math.ceil((offset + length) / p.block), p.nblocks);
  const state = code === 87 ? 1 : (code === 84 || code === 90) ? 0 : -1;
  for (let i = a; i < b; i++) {
    p.kind[i] = code; p.when[i] = t;
    if (state >= 0) p.base[i] = state;
    if (track) p.hot.add(i);
  }
}

// The filter's records: 40 bytes a request, little-endian: kind u8, flags u8, error u16,
// connection u32, offset u64, length u64, time i64, duration i64.
function u64(dv, o) { return dv.getUint32(o, true) + dv.getUint32(o + 4, true) * 4294967296; }
function i64(dv, o) { return dv.getUint32(o, true) + dv.getInt32(o + 4, true) * 4294967296; }

function applyEvents(p, m, track) {
  if (m.dv) {
    const dv = m.dv;
    for (let i = 0, o = 0; i < m.n; i++, o += 40) {
      applyOne(p, dv.getUint8(o), u64(dv, o + 8), u64(dv, o + 16), dv.getUint16(o + 2, true),
               i64(dv, o + 24), track);
    }
    return;
  }
  for (const [kind, offset, length, , err, tus] of m.events) {
    applyOne(p, typeof kind === "string" ? kind.charCodeAt(0) : kind, offset, length, err, tus,
             track);
  }
}

function applyMessage(p, m, track) {
  switch (m.type) {
    case "events": applyEvents(p, m, track); break;
    case "state":
      resize(p, m.size);
      for (const [off, len, typ] of m.extents) {
        const [a, b] = range(p, off, len);
        p.base.fill(typ & 1 ? 0 : 1, a, b);
      }
      p.fullDirty = true;
      break;
    case "open": resize(p, m.size); break;
    case "hello": for (const k in m.exports || {}) resize(p, m.exports[k]); break;
    case "dropped": p.dropped += m.count; break;
  }
}

function eventCount(m) {
  return m.dv ? m.n : (m.events ? m.events.length : 0);
}

function messageTime(m) {
  if (m.dv && m.n) return i64(m.dv, 40 * (m.n - 1) + 24) / 1e6;
  if (m.events && m.events.length) return m.events[m.events.length - 1][5] / 1e6;
  return m.time ? m.time / 1e6 : 0;
}

// ---- drawing --------------------------------------------------------------------------
// Cell i's colour at time `now` into the image data at o (no allocation: a frame may
// redraw every cell of the disk).
function paintCell(d, o, p, i, now, fade) {
  const rest = p.base[i] ? DATA : HOLE;
  let r = rest[0], g = rest[1], b = rest[2];
  const k = p.kind[i];
  const c = k ? COLOUR_OF[k] : undefined;
  if (c !== undefined) {
    if (fade <= 0) {
      r = c[0]; g = c[1]; b = c[2];
    } else {
      const f = (now - p.when[i]) / (k === 82 ? fade / 2 : fade);   // reads flash
      if (f < 1) {
        const h = Math.max(f, 0);
        r = c[0] + (rest[0] - c[0]) * h; g = c[1] + (rest[1] - c[1]) * h;
        b = c[2] + (rest[2] - c[2]) * h;
      }
    }
  }
  d[o] = r; d[o + 1] = g; d[o + 2] = b; d[o + 3] = 255;
}

function layout(p) {
  const zoom = view.settings.zoom;
  const width = Math.max(p.el.clientWidth, zoom);
  p.cols = Math.max(1, Math.floor(width / zoom));
  p.rows = Math.max(1, Math.ceil(p.nblocks / p.cols));
  // One pixel a cell, scaled up by the page (CSS, image-rendering: pixelated): nothing to
  // scale in a frame.
  p.canvas.width = p.cols; p.canvas.height = p.rows;
  p.canvas.style.width = `${p.cols * zoom}px`; p.canvas.style.height = `${p.rows * zoom}px`;
  p.img = p.ctx.createImageData(p.cols, p.rows);
  p.layoutDirty = false; p.fullDirty = true;
  p.title.textContent = `${p.name}  (${mib(p.size)} MiB, ${p.block} bytes a cell)`;
}

function draw(p, now) {
  if (p.layoutDirty || !p.img) layout(p);
  const d = p.img.data, fade = view.settings.fade;
  let changed = false;
  if (p.fullDirty) {
    for (let i = 0; i < p.cols * p.rows; i++) {
      if (i < p.nblocks) paintCell(d, 4 * i, p, i, now, fade);
      else d.set([...BACKGROUND, 255], 4 * i);
    }
    p.fullDirty = false; changed = true;
    p.hot = new Set();
    for (let i = 0; i < p.nblocks; i++) {
      if (p.kind[i] && fade > 0 && now - p.when[i] < fade) p.hot.add(i);
    }
  }
  for (const i of p.hot) {
    paintCell(d, 4 * i, p, i, now, fade);
    changed = true;
    if (fade <= 0 || now - p.when[i] >= fade) p.hot.delete(i);
  }
  if (!changed) return;
  p.ctx.putImageData(p.img, 0, 0);
}

function mib(n) { return (n / 1048576).toFixed(1); }

function showCounters(p, now) {
  const since = Math.floor((now - 1) * 10);
  while (p.rate.length && p.rate[0].id < since) p.rate.shift();
  const lines = [];
  for (const k of ["R", "W", "T", "Z", "F"]) {
    const [n, bytes] = p.counters[k];
    let rate = 0;
    for (const r of p.rate) rate += r.bytes[k.charCodeAt(0)];
    lines.push(`${KINDS[k].padEnd(6)}${String(n).padStart(7)} ${mib(bytes).padStart(8)} MiB` +
               ` ${mib(rate).padStart(6)} MiB/s`);
  }
  lines.push(`errors ${p.errors}  dropped ${p.dropped}`);
  p.countersEl.textContent = lines.join("\n");
}

function currentTime() {
  if (!view.live) return view.viewTime;
  return view.offset === null ? Date.now() / 1000 : Date.now() / 1000 + view.offset;
}

// A frame is asked for when there is something to draw (requests came, cells are still
// fading, the layout changed), at most MAX_FPS a second: an idle page costs nothing.
let lastFrame = 0, frameWanted = false;
function wantFrame() {
  if (!frameWanted) {
    frameWanted = true;
    requestAnimationFrame(frame);
  }
}

function frame(stamp) {
  frameWanted = false;
  const redo = view.panels.some((p) => p.layoutDirty || p.fullDirty || !p.img);
  if (!redo && stamp - lastFrame < 1000 / MAX_FPS - 2) {  // (60 Hz: every other frame)
    wantFrame();
    return;
  }
  lastFrame = stamp;
  const now = currentTime();
  for (const p of view.panels) {
    draw(p, now);
    if (p.hot.size || p.layoutDirty || p.fullDirty) wantFrame();
  }
  updateTimeline(currentTimeLive());
}

// The counters four times a second (text changed in every frame costs the browser a layout
// and a paint each time), and the timeline's clock when no frame is drawn.
setInterval(() => {
  for (const p of view.panels) showCounters(p, currentTime());
  updateTimeline(currentTimeLive());
}, 250);

// ---- the page -------------------------------------------------------------------------
function buildPanels(defs) {
  const main = document.getElementById("panels");
  main.textContent = "";
  view.origin = defs.map(makePanel);
  view.panels = view.origin.map(clonePanel);
  view.panels.forEach((p) => {
    const el = document.createElement("div");
    el.className = "panel";
    const title = document.createElement("div");
    title.className = "title";
    p.countersEl = document.createElement("div");
    p.countersEl.className = "counters";
    p.canvas = document.createElement("canvas");
    p.ctx = p.canvas.getContext("2d");
    el.append(title, p.countersEl, p.canvas);
    main.append(el);
    p.el = el; p.title = title; p.layoutDirty = true;
  });
}

function rebuild(until) {
  // The panels as they were at time `until`: the origin, then the history up to it.
  const els = view.panels.map((p) => [p.el, p.title, p.canvas, p.ctx,
                                       p.countersEl]);
  view.panels = view.origin.map(clonePanel);
  view.panels.forEach((p, i) => {
    [p.el, p.title, p.canvas, p.ctx, p.countersEl] = els[i];
    p.layoutDirty = true;
  });
  for (const m of view.history) {
    if (messageTime(m) > until) break;
    applyMessage(view.panels[m.src], m, false);
  }
  wantFrame();
}

function trimHistory() {
  const cutoff = view.latest - HISTORY_SECONDS;
  let n = 0;
  while (n < view.history.length && (view.historyEvents > HISTORY_EVENTS ||
                                     messageTime(view.history[n]) < cutoff)) {
    applyMessage(view.origin[view.history[n].src], view.history[n], false);
    view.historyEvents -= eventCount(view.history[n]);
    n++;
  }
  if (n) view.history.splice(0, n);
}

function updateTimeline(now) {
  const scrub = document.getElementById("scrub");
  const start = view.history.length ? messageTime(view.history[0]) : now;
  scrub.min = start; scrub.max = Math.max(now, start);
  if (view.live) scrub.value = scrub.max;
  const t = view.live ? now : view.viewTime;
  document.getElementById("when").textContent =
    new Date(t * 1000).toISOString().slice(11, 23) + (view.live ? "" : `  (${(now - t).toFixed(1)} s ago)`);
  document.getElementById("live").classList.toggle("on", view.live);
}

// The filter's records as they come: in base64 in the init message's history, as binary
// messages (the source, u32, then the records) after it.
function b64records(m) {
  const raw = atob(m.data);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  m.dv = new DataView(bytes.buffer);
  m.n = Math.floor(bytes.length / 40);
  delete m.data;
}

function binaryRecords(buf) {
  const src = new DataView(buf).getUint32(0, true);
  const n = Math.floor((buf.byteLength - 4) / 40);
  return { type: "events", src, dv: new DataView(buf, 4), n };
}

function receive(m) {
  if (m.type === "events" && m.data !== undefined && !m.events) b64records(m);
  if (m.type === "init") {
    view.settings = m.settings;
    buildPanels(m.panels);
    view.history = [];
    view.historyEvents = 0;
    for (const h of m.history) receive(h);
    view.ready = true;
    zoomLabel();
    wantFrame();
    return;
  }
  const t = messageTime(m);
  if (t) {
    view.latest = Math.max(view.latest, t);
    const off = t - Date.now() / 1000;
    if (view.offset === null || off > view.offset) view.offset = off;
  }
  view.history.push(m);
  view.historyEvents += eventCount(m);
  const p = view.panels[m.src];
  if (p && view.live) {
    applyMessage(p, m, true);
    wantFrame();
  }
  else if (p) view.eventsSeen += eventCount(m);  // not drawn while looking back, but counted
  trimHistory();
}

function connect() {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  const status = document.getElementById("status");
  ws.onopen = () => { status.textContent = "live"; };
  ws.binaryType = "arraybuffer";
  ws.onmessage = (e) => {
    receive(typeof e.data === "string" ? JSON.parse(e.data) : binaryRecords(e.data));
  };
  ws.onclose = () => { status.textContent = "disconnected (reload to reconnect)"; };
}

function zoomLabel() {
  document.getElementById("zoom-level").textContent = `${view.settings.zoom} px`;
}

function setZoom(z) {
  view.settings.zoom = Math.min(32, Math.max(1, z));
  for (const p of view.panels) p.layoutDirty = true;
  zoomLabel();
  wantFrame();
}

document.getElementById("zoom-in").onclick = () => setZoom(view.settings.zoom * 2);
document.getElementById("zoom-out").onclick = () => setZoom(Math.floor(view.settings.zoom / 2));
document.getElementById("panels").addEventListener("wheel", (e) => {
  if (!e.ctrlKey) return;
  e.preventDefault();
  setZoom(e.deltaY < 0 ? view.settings.zoom * 2 : Math.floor(view.settings.zoom / 2));
}, { passive: false });
window.addEventListener("resize", () => {
  for (const p of view.panels) p.layoutDirty = true;
  wantFrame();
});
document.getElementById("scrub").addEventListener("input", (e) => {
  view.live = false;
  view.viewTime = parseFloat(e.target.value);
  rebuild(view.viewTime);
  updateTimeline(currentTimeLive());
});
document.getElementById("live").onclick = () => {
  view.live = true;
  rebuild(Infinity);
};

function currentTimeLive() {
  return view.offset === null ? Date.now() / 1000 : Date.now() / 1000 + view.offset;
}

connect();
