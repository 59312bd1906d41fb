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

const view = window.pynbdView = {
  settings: { fade: 1, zoom: 4 }, panels: [], origin: [], history: [], eventsSeen: 0,
  ready: false, live: true, viewTime: 0, offset: null, latest: 0,
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
           errors: p.errors || 0, dropped: p.dropped || 0, hot: new Set(), recent: [] };
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

function applyEvent(p, ev, track) {
  const [kind, offset, length, , err, tus] = ev;
  const c = p.counters[kind];
  if (!c) return;
  const t = tus / 1e6;
  if (track) {
    view.eventsSeen++;
    p.recent.push([t, kind, length]);
  }
  if (err) { p.errors++; return; }
  c[0]++; c[1] += length;
  if (!(kind in COLOURS) || length <= 0) return;
  if (offset + length > p.size) resize(p, offset + length);
  const [a, b] = range(p, offset, length);
  const code = kind.charCodeAt(0);
  const state = kind === "W" ? 1 : (kind === "T" || kind === "Z") ? 0 : -1;
  for (let i = a; i < b; i++) {
    p.kind[i] = code; p.when[i] = t;
    if (state >= 0) p.base[i] = state;
    if (track) p.hot.add(i);
  }
}

function applyMessage(p, m, track) {
  switch (m.type) {
    case "events": for (const ev of m.events) applyEvent(p, ev, track); break;
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

function messageTime(m) {
  if (m.events && m.events.length) return m.events[m.events.length - 1][5] / 1e6;
  return m.time ? m.time / 1e6 : 0;
}

// ---- drawing --------------------------------------------------------------------------
function colour(p, i, now) {
  const rest = p.base[i] ? DATA : HOLE;
  const k = p.kind[i];
  if (!k) return rest;
  const c = COLOURS[String.fromCharCode(k)];
  if (!c) return rest;
  const fade = view.settings.fade;
  if (fade <= 0) return c;
  const f = (now - p.when[i]) / (k === 82 ? fade / 2 : fade);   // reads flash
  if (f >= 1) return rest;
  const g = Math.max(f, 0);
  return [c[0] + (rest[0] - c[0]) * g, c[1] + (rest[1] - c[1]) * g, c[2] + (rest[2] - c[2]) * g];
}

function layout(p) {
  const zoom = view.settings.zoom;
  const width = Math.max(p.el.clientWidth, zoom);
  p.cols = Math.max(1, Math.floor(width / zoom));
  p.rows = Math.max(1, Math.ceil(p.nblocks / p.cols));
  p.small.width = p.cols; p.small.height = p.rows;
  p.img = p.smallCtx.createImageData(p.cols, p.rows);
  p.canvas.width = p.cols * zoom; p.canvas.height = p.rows * zoom;
  p.layoutDirty = false; p.fullDirty = true;
  p.title.textContent = `${p.name}  (${mib(p.size)} MiB, ${p.block} bytes a cell)`;
}

function setPixel(p, i, c) {
  const d = p.img.data, o = 4 * i;
  d[o] = c[0]; d[o + 1] = c[1]; d[o + 2] = c[2]; d[o + 3] = 255;
}

function draw(p, now) {
  if (p.layoutDirty || !p.img) layout(p);
  let changed = false;
  if (p.fullDirty) {
    for (let i = 0; i < p.cols * p.rows; i++) setPixel(p, i, i < p.nblocks ? colour(p, i, now) : BACKGROUND);
    p.fullDirty = false; changed = true;
    p.hot = new Set();
    const fade = view.settings.fade;
    for (let i = 0; i < p.nblocks; i++) {
      if (p.kind[i] && fade > 0 && now - p.when[i] < fade) p.hot.add(i);
    }
  }
  for (const i of p.hot) {
    setPixel(p, i, colour(p, i, now));
    changed = true;
    const fade = view.settings.fade;
    if (fade <= 0 || now - p.when[i] >= fade) p.hot.delete(i);
  }
  if (!changed) return;
  p.smallCtx.putImageData(p.img, 0, 0);
  p.ctx.imageSmoothingEnabled = false;
  p.ctx.drawImage(p.small, 0, 0, p.canvas.width, p.canvas.height);
}

function mib(n) { return (n / 1048576).toFixed(1); }

function showCounters(p, now) {
  while (p.recent.length && p.recent[0][0] < now - 1) p.recent.shift();
  const rate = {};
  for (const [, k, n] of p.recent) rate[k] = (rate[k] || 0) + n;
  const lines = [];
  for (const k of ["R", "W", "T", "Z", "F"]) {
    const [n, bytes] = p.counters[k];
    lines.push(`${KINDS[k].padEnd(6)}${String(n).padStart(7)} ${mib(bytes).padStart(8)} MiB` +
               ` ${mib(rate[k] || 0).padStart(6)} MiB/s`);
  }
  lines.push(`errors ${p.errors}  dropped ${p.dropped}`);
  p.countersEl.textContent = lines.join("\n");
}

function currentTime() {
  if (!view.live) return view.viewTime;
  return view.offset === null ? Date.now() / 1000 : Date.now() / 1000 + view.offset;
}

function frame() {
  const now = currentTime();
  for (const p of view.panels) draw(p, now);
  updateTimeline(currentTimeLive());
  requestAnimationFrame(frame);
}

setInterval(() => { for (const p of view.panels) showCounters(p, currentTime()); }, 250);

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
    p.small = document.createElement("canvas");
    p.smallCtx = p.small.getContext("2d");
    el.append(title, p.countersEl, p.canvas);
    main.append(el);
    p.el = el; p.title = title; p.layoutDirty = true;
  });
}

function rebuild(until) {
  // The panels as they were at time `until`: the origin, then the history up to it.
  const els = view.panels.map((p) => [p.el, p.title, p.canvas, p.ctx, p.small, p.smallCtx,
                                       p.countersEl]);
  view.panels = view.origin.map(clonePanel);
  view.panels.forEach((p, i) => {
    [p.el, p.title, p.canvas, p.ctx, p.small, p.smallCtx, p.countersEl] = els[i];
    p.layoutDirty = true;
  });
  for (const m of view.history) {
    if (messageTime(m) > until) break;
    applyMessage(view.panels[m.src], m, false);
  }
}

function trimHistory() {
  const cutoff = view.latest - HISTORY_SECONDS;
  let n = 0;
  while (n < view.history.length && messageTime(view.history[n]) < cutoff) {
    applyMessage(view.origin[view.history[n].src], view.history[n], false);
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

// The filter's records, in base64: 40 bytes a request, little-endian: kind u8, flags u8,
// error u16, connection u32, offset u64, length u64, time i64, duration i64.
function decodeEvents(b64) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  const dv = new DataView(bytes.buffer);
  const int = (o) => dv.getUint32(o, true) + dv.getInt32(o + 4, true) * 4294967296;
  const out = [];
  for (let o = 0; o + 40 <= bytes.length; o += 40) {
    out.push([String.fromCharCode(dv.getUint8(o)), int(o + 8), int(o + 16), dv.getUint8(o + 1),
              dv.getUint16(o + 2, true), int(o + 24), int(o + 32), dv.getUint32(o + 4, true)]);
  }
  return out;
}

function receive(m) {
  if (m.type === "events" && m.data !== undefined && !m.events) m.events = decodeEvents(m.data);
  if (m.type === "init") {
    view.settings = m.settings;
    buildPanels(m.panels);
    view.history = [];
    for (const h of m.history) receive(h);
    view.ready = true;
    zoomLabel();
    return;
  }
  const t = messageTime(m);
  if (t) {
    view.latest = Math.max(view.latest, t);
    const off = t - Date.now() / 1000;
    if (view.offset === null || off > view.offset) view.offset = off;
  }
  view.history.push(m);
  const p = view.panels[m.src];
  if (p && view.live) applyMessage(p, m, true);
  else if (p) {
    // not drawn while looking back, but counted
    if (m.events) view.eventsSeen += m.events.length;
  }
  trimHistory();
}

function connect() {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  const status = document.getElementById("status");
  ws.onopen = () => { status.textContent = "live"; };
  ws.onmessage = (e) => receive(JSON.parse(e.data));
  ws.onclose = () => { status.textContent = "disconnected (reload to reconnect)"; };
}

function zoomLabel() {
  document.getElementById("zoom-level").textContent = `${view.settings.zoom} px`;
}

function setZoom(z) {
  view.settings.zoom = Math.min(32, Math.max(1, z));
  for (const p of view.panels) p.layoutDirty = true;
  zoomLabel();
}

document.getElementById("zoom-in").onclick = () => setZoom(view.settings.zoom * 2);
document.getElementById("zoom-out").onclick = () => setZoom(Math.floor(view.settings.zoom / 2));
document.getElementById("panels").addEventListener("wheel", (e) => {
  if (!e.ctrlKey) return;
  e.preventDefault();
  setZoom(e.deltaY < 0 ? view.settings.zoom * 2 : Math.floor(view.settings.zoom / 2));
}, { passive: false });
window.addEventListener("resize", () => { for (const p of view.panels) p.layoutDirty = true; });
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
requestAnimationFrame(frame);
