// The pastalm playground: streams an answer with the `pasta.threads` extra and draws each async block where it
// stands in the answer, filling in live, coloured by thread, with a timeline of the decode steps.
// No build step and nothing fetched from elsewhere: this file, index.html and playground.css are all of it.
"use strict";

const COLORS = ["#5b5b60", "#d1495b", "#2e86ab", "#3f9b4f", "#e09f3e", "#7d5ba6", "#00a6a6", "#c45baa", "#8a6d3b"];
const color = (t) => COLORS[t === 0 ? 0 : 1 + ((t - 1) % (COLORS.length - 1))];
const $ = (sel, root = document) => root.querySelector(sel);

const state = { model: null, key: sessionStorage.getItem("pasta-key") || "", controllers: [] };
// what the page saw, for people debugging and for the browser test: per pane, the most block regions live at once
window.pasta = { runs: {} };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function connect() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    $("#keybox").hidden = false;
    $("#model").textContent = state.key ? "the key was refused" : "needs an API key";
    $("#run").disabled = true;
    return false;
  }
  if (!r.ok) { $("#model").textContent = "server error " + r.status; return false; }
  const body = await r.json();
  state.model = body.data[0].id;
  $("#model").textContent = "model: " + state.model;
  $("#keybox").hidden = true;
  $("#run").disabled = false;
  return true;
}

$("#savekey").addEventListener("click", () => {
  state.key = $("#key").value.trim();
  sessionStorage.setItem("pasta-key", state.key);
  connect();
});
$("#side").addEventListener("change", () => $("#panes").classList.toggle("single", !$("#side").checked));

class Pane {
  constructor(el, mode) {
    this.el = el; this.mode = mode;
    this.answer = $(".answer", el); this.canvas = $("canvas", el); this.figs = $(".figures", el);
    this.clear();
  }
  clear() {
    this.answer.textContent = ""; this.figs.textContent = "";
    this.steps = []; this.text = ""; this.rows = 1; this.t0 = performance.now(); this.first = null;
    this.run = { maxLive: 0, events: 0, done: false, text: "", error: null };
    this.drawTimeline();
  }
  // a new run: cleared, and registered in window.pasta.runs (only panes that ran appear there)
  reset() {
    this.clear();
    window.pasta.runs[this.mode] = this.run;
  }
  // one `thread_view` from the stream: the whole answer so far, in reading order
  view(v) {
    this.run.events += 1;
    this.steps.push(v);
    const live = new Set(v.live);
    const frag = document.createDocumentFragment();
    let blocks = 0;
    for (const p of v.pieces) {
      this.rows = Math.max(this.rows, p.thread + 1);
      if (p.thread === 0) {
        const s = document.createElement("span");
        s.className = "main"; s.textContent = p.text; frag.appendChild(s);
        continue;
      }
      const b = document.createElement("span");
      b.className = "block"; b.dataset.thread = p.thread; b.dataset.live = live.has(p.thread) ? "1" : "0";
      b.style.borderColor = color(p.thread); b.style.background = color(p.thread) + "1a";
      const tag = document.createElement("span");
      tag.className = "tag"; tag.style.color = color(p.thread); tag.textContent = "t" + p.thread;
      b.appendChild(tag); b.appendChild(document.createTextNode(p.text));
      b.title = "async thread " + p.thread + (p.finish ? " (ended: " + p.finish + ")" : " (decoding)");
      frag.appendChild(b);
      blocks += 1;
    }
    this.answer.replaceChildren(frag);
    const liveBlocks = this.answer.querySelectorAll('.block[data-live="1"]').length;
    this.run.maxLive = Math.max(this.run.maxLive, liveBlocks);
    this.run.blocks = blocks;
    this.drawTimeline();
  }
  drawTimeline() {
    const cell = 4, gap = 2, n = this.steps.length, rows = this.rows;
    const c = this.canvas;
    c.width = Math.max(200, n * cell); c.height = rows * (cell + gap) + gap;
    const g = c.getContext("2d");
    g.clearRect(0, 0, c.width, c.height);
    this.steps.forEach((v, x) => {
      for (const t of v.live) { g.fillStyle = color(t) + "40"; g.fillRect(x * cell, gap + t * (cell + gap), cell - 1, cell); }
      for (const [t, shown] of v.wrote) {
        g.fillStyle = shown ? color(t) : "#111"; g.fillRect(x * cell, gap + t * (cell + gap), cell - 1, cell);
      }
    });
  }
  delta(text) {
    if (text && this.first === null) this.first = (performance.now() - this.t0) / 1000;
    this.text += text;
  }
  done(p) {
    // the answer as the API sent it (stop strings applied): drawn from its last pieces when they agree
    const joined = p.pieces.map((x) => x.text).join("");
    if (joined === this.text) this.view({ step: p.decode_steps, live: [], wrote: [], pieces: p.pieces });
    else this.answer.textContent = this.text;
    this.steps.pop(); this.drawTimeline();
    const rate = p.wall_s > 0 ? p.tokens / p.wall_s : 0;
    const rows = [["rendered tokens", p.tokens], ["tag tokens", p.tag_tokens], ["decode steps", p.decode_steps],
      ["async threads", p.threads], ["rendered tokens / s", rate.toFixed(1)],
      ["theoretical speedup", p.theoretical_speedup.toFixed(2) + "x"], ["wall-clock", p.wall_s.toFixed(2) + " s"],
      ["first text", this.first === null ? "-" : this.first.toFixed(2) + " s"]];
    if (p.limits_hit.length) rows.push(["limits hit", p.limits_hit.join(", ")]);
    this.figs.replaceChildren(...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k; dd.textContent = v; dd.dataset.figure = k; return [dt, dd];
    }));
    Object.assign(this.run, { done: true, text: this.text, figures: p });
  }
  fail(message) {
    const e = document.createElement("p"); e.className = "error"; e.textContent = message;
    this.answer.appendChild(e); this.run.error = message; this.run.done = true;
  }
}

const panes = { pasta: new Pane($("#pane-pasta"), "pasta"), sequential: new Pane($("#pane-sequential"), "sequential") };

async function stream(pane, enabled, signal) {
  const force = $("#force").value;
  const body = {
    model: state.model, stream: true, messages: [{ role: "user", content: $("#prompt").value }],
    max_tokens: Number($("#max_tokens").value), temperature: Number($("#temperature").value), seed: 0,
    pasta: { enabled, threads: true, max_threads: Number($("#max_threads").value) },
  };
  if (force.trim()) body.pasta.force = force;
  pane.reset();
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!r.ok) {
    let msg = "HTTP " + r.status;
    try { msg += ": " + (await r.json()).error.message; } catch (_) { /* not JSON */ }
    if (r.status === 401) { $("#keybox").hidden = false; }
    pane.fail(msg);
    return;
  }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut); buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      const ev = JSON.parse(data);
      if (ev.error) { pane.fail(ev.error.message); return; }
      const ch = ev.choices && ev.choices[0];
      if (ch && ch.delta && ch.delta.content) pane.delta(ch.delta.content);
      if (ev.pasta && ev.pasta.done) pane.done(ev.pasta);
      else if (ev.pasta) pane.view(ev.pasta);
    }
  }
}

async function run() {
  if (!state.model && !(await connect())) return;
  $("#run").disabled = true; $("#stop").disabled = false; $("#status").textContent = "decoding...";
  const jobs = [["pasta", true]].concat($("#side").checked ? [["sequential", false]] : []);
  state.controllers = jobs.map(() => new AbortController());
  window.pasta.running = true;
  window.pasta.runs = {};
  await Promise.all(jobs.map(([mode, enabled], i) =>
    stream(panes[mode], enabled, state.controllers[i].signal).catch((e) => {
      if (e.name !== "AbortError") panes[mode].fail(String(e));
    })));
  window.pasta.running = false;
  $("#run").disabled = false; $("#stop").disabled = true; $("#status").textContent = "";
}

$("#run").addEventListener("click", run);
$("#stop").addEventListener("click", () => state.controllers.forEach((c) => c.abort()));
connect();
