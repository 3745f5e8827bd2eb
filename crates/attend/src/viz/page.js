// attend viz: one self-contained page (no network). The data block holds the tokens, each chosen head's weights
// quantised to one byte (w·255, rows are queries), the rollout (row-relative bytes) and the head summary.
"use strict";
(function () {
  const stages = { start: performance.now() };
  const D = JSON.parse(document.getElementById("attend-data").textContent);
  const T = D.tokens.length, L = D.layers, HS = D.heads, NH = HS.length;
  // base64 → bytes with a lookup table: atob plus a per-character callback takes seconds at 512 tokens × 144 heads.
  const LUT = new Uint8Array(128);
  "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".split("").forEach((c, i) => (LUT[c.charCodeAt(0)] = i));
  function bytes(id) {
    const s = document.getElementById(id).textContent.trim();
    const pad = s.endsWith("==") ? 2 : s.endsWith("=") ? 1 : 0;
    const out = new Uint8Array((s.length / 4) * 3 - pad);
    let o = 0;
    for (let i = 0; i < s.length; i += 4) {
      const n = (LUT[s.charCodeAt(i)] << 18) | (LUT[s.charCodeAt(i + 1)] << 12) | (LUT[s.charCodeAt(i + 2)] << 6) | LUT[s.charCodeAt(i + 3)];
      out[o++] = n >> 16;
      if (o < out.length) out[o++] = (n >> 8) & 255;
      if (o < out.length) out[o++] = n & 255;
    }
    return out;
  }
  const W = bytes("attend-weights"); // (L, NH, T, T)
  const R = bytes("attend-rollout"); // (L, T, T)
  const F = bytes("attend-flow"); // (T, T) into the last layer, or empty past flowMaxTokens
  stages.decoded = performance.now();
  const at = (l, k) => (l * NH + k) * T * T; // offset of chosen head k of layer l
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];
  const color = (k) => COLORS[HS[k] % COLORS.length];
  const rgb = (hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const IM = D.image; // a vision model's picture: {src, grid: [rows, cols], first}, or null
  const state = { view: IM ? "image" : "head", layer: Math.min(D.layer || 0, L - 1), on: HS.map(() => true),
    focus: null, query: D.causal ? T - 1 : 0, from: 0 };
  window.attendState = state;

  // ---- controls -------------------------------------------------------------------------------------------------
  const layerSel = $("layer");
  for (let l = 0; l < L; l++) layerSel.appendChild(el("option", { value: l }, "layer " + l));
  layerSel.value = state.layer;
  layerSel.onchange = () => { state.layer = +layerSel.value; render(); };
  const toggles = $("heads");
  HS.forEach((h, k) => {
    const b = el("button", { class: "head on", "data-head": h, style: "--c:" + color(k) }, "head " + h);
    b.onclick = (ev) => {
      // A plain click shows this head alone (or all again); shift-click adds or removes it.
      if (ev.shiftKey) state.on[k] = !state.on[k];
      else {
        const alone = state.on.every((v, j) => v === (j === k));
        state.on = HS.map((_, j) => alone || j === k);
      }
      render();
    };
    toggles.appendChild(b);
  });
  document.querySelectorAll("nav .tab").forEach((b) => (b.onclick = () => { state.view = b.dataset.view; render(); }));

  // ---- head view: token-to-token links for the chosen layer --------------------------------------------------------
  const ROW = 18, LINK_W = 320;
  const left = $("left"), right = $("right"), links = $("links");
  D.tokens.forEach((tok, i) => {
    for (const [col, side] of [[left, "q"], [right, "k"]]) {
      const s = el("div", { class: "tok" + (D.special[i] ? " special" : ""), "data-side": side, "data-i": i }, tok);
      s.onmouseenter = () => { state.focus = [side, i]; drawLinks(); };
      s.onmouseleave = () => { state.focus = null; drawLinks(); };
      col.appendChild(s);
    }
  });
  function drawLinks() {
    const dpr = window.devicePixelRatio || 1;
    links.width = LINK_W * dpr; links.height = T * ROW * dpr;
    links.style.width = LINK_W + "px"; links.style.height = T * ROW + "px";
    const g = links.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.lineWidth = 1.5;
    const [fs, fi] = state.focus || [null, -1];
    document.querySelectorAll("#head-view .tok.lit").forEach((e) => e.classList.remove("lit"));
    // Lines grouped by alpha bucket, one stroke per bucket and head: thousands of links stay one frame.
    for (let k = 0; k < NH; k++) {
      if (!state.on[k]) continue;
      const base = at(state.layer, k), [r, gg, b] = rgb(color(k));
      const buckets = Array.from({ length: 16 }, () => []);
      for (let i = 0; i < T; i++) {
        if (fs === "q" && i !== fi) continue;
        for (let j = 0; j < T; j++) {
          if (fs === "k" && j !== fi) continue;
          const w = W[base + i * T + j];
          if (w >= 3) buckets[w >> 4].push(i, j);
        }
      }
      buckets.forEach((ij, q) => {
        if (!ij.length) return;
        g.strokeStyle = `rgba(${r},${gg},${b},${Math.min(1, (q + 1) / 16 + 0.04)})`;
        g.beginPath();
        for (let n = 0; n < ij.length; n += 2) {
          g.moveTo(0, ij[n] * ROW + ROW / 2);
          g.lineTo(LINK_W, ij[n + 1] * ROW + ROW / 2);
        }
        g.stroke();
      });
    }
    if (fs) document.querySelectorAll(`#head-view .tok[data-i="${fi}"][data-side="${fs}"]`)
      .forEach((e) => e.classList.add("lit"));
  }

  // ---- model view: every layer × head as a thumbnail ----------------------------------------------------------------
  const THUMB = Math.min(T, 96);
  function heatmap(canvas, get, n, size, rgbc) {
    // Max-pools an n×n map of bytes into size×size pixels: a sharp diagonal stays visible at 512 tokens.
    canvas.width = size; canvas.height = size;
    const g = canvas.getContext("2d"), img = g.createImageData(size, size);
    const f = n / size;
    for (let y = 0; y < size; y++) {
      const i0 = Math.floor(y * f), i1 = Math.max(i0 + 1, Math.floor((y + 1) * f));
      for (let x = 0; x < size; x++) {
        const j0 = Math.floor(x * f), j1 = Math.max(j0 + 1, Math.floor((x + 1) * f));
        let m = 0;
        for (let i = i0; i < i1; i++) for (let j = j0; j < j1; j++) m = Math.max(m, get(i, j));
        const p = (y * size + x) * 4, a = m / 255;
        img.data[p] = 255 - a * (255 - rgbc[0]); img.data[p + 1] = 255 - a * (255 - rgbc[1]);
        img.data[p + 2] = 255 - a * (255 - rgbc[2]); img.data[p + 3] = 255;
      }
    }
    g.putImageData(img, 0, 0);
  }
  const grid = $("grid");
  let gridBuilt = false;
  function buildGrid() {
  // Built the first time the model view opens: 144 thumbnails at 512 tokens are not worth delaying the first paint.
  if (gridBuilt) return;
  gridBuilt = true;
  grid.style.gridTemplateColumns = `4em repeat(${NH}, 104px)`;
  grid.appendChild(el("div"));
  HS.forEach((h) => grid.appendChild(el("div", { class: "colhead" }, "head " + h)));
  for (let l = 0; l < L; l++) {
    grid.appendChild(el("div", { class: "rowhead" }, "layer " + l));
    HS.forEach((h, k) => {
      const c = el("canvas", { class: "thumb", "data-layer": l, "data-head": h, title: `layer ${l}, head ${h}` });
      const base = at(l, k);
      heatmap(c, (i, j) => W[base + i * T + j], T, THUMB, rgb(color(k)));
      c.style.width = c.style.height = "96px"; // short texts scale up, pixelated
      c.onclick = () => openHead(l, k);
      grid.appendChild(c);
    });
  }
  }
  function openHead(l, k) {
    state.layer = l; layerSel.value = l;
    state.on = HS.map((_, j) => j === k);
    state.view = "head";
    render();
  }

  // ---- rollout: what each position is made of after layer l, across layers -------------------------------------------
  const rollTokens = $("roll-tokens"), flowTokens = $("flow-tokens");
  for (const strip of [rollTokens, flowTokens]) {
    if (strip === flowTokens && !F.length) continue;
    D.tokens.forEach((tok, i) => {
      const s = el("span", { class: "rt", "data-i": i }, tok);
      s.onclick = () => { state.query = i; drawRollout(); };
      strip.appendChild(s);
    });
  }
  function shade(strip, row) {
    strip.querySelectorAll(".rt").forEach((s, j) => {
      s.style.background = `rgba(49,54,149,${row[j] / 255})`;
      s.style.color = row[j] > 140 ? "#fff" : "#000";
      s.classList.toggle("query", j === state.query);
    });
  }
  function drawRollout() {
    const base = state.layer * T * T;
    heatmap($("roll-map"), (i, j) => R[base + i * T + j], T, Math.min(T * 4, 512), [49, 54, 149]);
    shade(rollTokens, R.subarray(base + state.query * T, base + (state.query + 1) * T));
    const who = `position ${state.query} (“${D.tokens[state.query]}”)`;
    $("roll-caption").textContent = `Rollout: ${who} after layer ${state.layer}: what it is made of`;
    if (F.length) {
      shade(flowTokens, F.subarray(state.query * T, (state.query + 1) * T));
      $("flow-caption").textContent = `Flow: ${who} after the last layer: the maximum flow from each input token`;
    } else {
      $("flow-caption").textContent = `Flow: computed for texts up to ${D.flowMaxTokens} tokens (this one has ${T})`;
    }
  }

  // ---- head summary -------------------------------------------------------------------------------------------------
  const rows = [];
  for (let l = 0; l < L; l++) for (let h = 0; h < D.summary.entropy[l].length; h++) rows.push({ l, h,
    entropy: D.summary.entropy[l][h], distance: D.summary.distance[l][h], special: D.summary.special[l][h] });
  let sortKey = "entropy", sortDir = 1;
  function drawSummary() {
    const tb = $("summary-body");
    tb.textContent = "";
    rows.sort((a, b) => sortDir * (a[sortKey] - b[sortKey]) || a.l - b.l || a.h - b.h);
    const max = { entropy: Math.log(T), distance: Math.max(1, T - 1), special: 1 };
    for (const r of rows) {
      const tr = el("tr", { "data-layer": r.l, "data-head": r.h });
      tr.appendChild(el("td", {}, r.l)); tr.appendChild(el("td", {}, r.h));
      for (const key of ["entropy", "distance", "special"]) {
        const td = el("td", { class: "num" }, r[key].toFixed(3));
        td.style.background = `rgba(31,119,180,${Math.min(1, r[key] / max[key]) * 0.6})`;
        tr.appendChild(td);
      }
      const k = HS.indexOf(r.h);
      if (k >= 0) { tr.classList.add("open"); tr.onclick = () => openHead(r.l, k); }
      tb.appendChild(tr);
    }
  }
  document.querySelectorAll("#summary-view th[data-key]").forEach((th) => (th.onclick = () => {
    sortDir = sortKey === th.dataset.key ? -sortDir : 1; sortKey = th.dataset.key; drawSummary();
  }));

  // ---- image view: each head's attention from one token over the picture (vision models) ----------------------------
  const VIEWS = ["head", "model", "rollout", "summary"];
  let picture = null;
  if (IM) {
    VIEWS.unshift("image");
    document.querySelector('nav .tab[data-view="image"]').hidden = false;
    picture = new Image();
    picture.onload = () => { if (state.view === "image") drawImage(); };
    picture.src = IM.src;
  }
  const [GR, GC] = IM ? IM.grid : [0, 0], NP = GR * GC;
  // Each query's row over the patches, relative to its largest: chosen heads (L, NH, T, NP), then the rollout (L, T, NP).
  const PB = IM ? bytes("attend-patches") : null;
  const SIDE = 224; // each picture's size on the page
  function panel(title, weightOf, canvas) {
    // The picture, darkened where the token looks little: alpha 0.8·(1 − w/max) of black over each patch.
    const g = canvas.getContext("2d"), cw = SIDE / GC, ch = SIDE / GR;
    g.clearRect(0, 0, SIDE, SIDE);
    g.imageSmoothingEnabled = false; // the model's pixels, as the PNG and SVG pictures show them
    if (picture && picture.complete && picture.naturalWidth) g.drawImage(picture, 0, 0, SIDE, SIDE);
    for (let p = 0; p < NP; p++) {
      const a = weightOf(p) / 255;
      g.fillStyle = `rgba(0,0,0,${0.8 * (1 - a)})`;
      g.fillRect((p % GC) * cw, Math.floor(p / GC) * ch, cw, ch);
    }
    if (state.from >= IM.first) {
      const p = state.from - IM.first;
      g.strokeStyle = "#d62728"; g.lineWidth = 2;
      g.strokeRect((p % GC) * cw + 1, Math.floor(p / GC) * ch + 1, cw - 2, ch - 2);
    }
    canvas.title = title;
  }
  function drawImage() {
    const box = $("image-panels");
    const want = HS.map((h, k) => k).filter((k) => state.on[k]);
    box.textContent = "";
    $("image-query").textContent = state.from < IM.first ? D.tokens[state.from] : `patch ${D.tokens[state.from]}`;
    const q = state.from;
    const add = (title, weightOf) => {
      const fig = el("figure"), c = el("canvas", { width: SIDE, height: SIDE, class: "patches" });
      panel(title, weightOf, c);
      c.onclick = (ev) => {
        const r = c.getBoundingClientRect();
        const col = Math.min(GC - 1, Math.floor(((ev.clientX - r.left) / r.width) * GC));
        const row = Math.min(GR - 1, Math.floor(((ev.clientY - r.top) / r.height) * GR));
        const t = IM.first + row * GC + col;
        state.from = state.from === t ? 0 : t;
        drawImage();
      };
      fig.appendChild(c); fig.appendChild(el("figcaption", {}, title));
      box.appendChild(fig);
    };
    for (const k of want) {
      const base = ((state.layer * NH + k) * T + q) * NP;
      add(`layer ${state.layer}, head ${HS[k]}`, (p) => PB[base + p]);
    }
    const rbase = ((L * NH + state.layer) * T + q) * NP;
    add(`rollout after layer ${state.layer}`, (p) => PB[rbase + p]);
  }

  // ---- one render for every state change ------------------------------------------------------------------------------
  function render() {
    for (const v of VIEWS) {
      $(v + "-view").hidden = state.view !== v;
      document.querySelector(`nav .tab[data-view="${v}"]`).classList.toggle("on", state.view === v);
    }
    toggles.querySelectorAll(".head").forEach((b, k) => b.classList.toggle("on", state.on[k]));
    $("heads").hidden = state.view !== "head" && state.view !== "image";
    if (state.view === "image") drawImage();
    if (state.view === "head") drawLinks();
    if (state.view === "model") buildGrid();
    if (state.view === "rollout") drawRollout();
    if (state.view === "summary") drawSummary();
  }
  // `page.html#model` (or #image, #head, #rollout, #summary) opens on that view: links and screenshots can point at one.
  const wanted = location.hash.slice(1);
  if (VIEWS.includes(wanted)) state.view = wanted;
  render();
  const firstPaint = performance.now();

  // ---- self-test (`page.html#selftest`): what the browser tests read back ----------------------------------------------
  if (location.hash === "#selftest") {
    // A vision page tests its pictures once the image has decoded.
    if (IM && !(picture.complete && picture.naturalWidth)) picture.addEventListener("load", selftest);
    else selftest();
  }
  function selftest() {
    const report = { errors: window.attendErrors, firstPaintMs: firstPaint, layers: L, heads: NH, tokens: T,
      decodeMs: stages.decoded - stages.start };
    if (IM) {
      // Every chosen head and the rollout as a picture; a click on the bottom-right patch looks from it.
      state.view = "image"; render();
      report.imagePanels = document.querySelectorAll("#image-panels canvas").length;
      const c = document.querySelector("#image-panels canvas"), r = c.getBoundingClientRect();
      // The first picture's most attended patch is the image itself, unshaded: its centre pixel is drawn.
      const base = ((state.layer * NH + HS.findIndex((_, k) => state.on[k])) * T + state.from) * NP;
      let best = 0;
      for (let p = 1; p < NP; p++) if (PB[base + p] > PB[base + best]) best = p;
      const px = c.getContext("2d").getImageData(((best % GC) + 0.5) * SIDE / GC, (Math.floor(best / GC) + 0.5) * SIDE / GR, 1, 1).data;
      report.imageLoaded = picture.complete && picture.naturalWidth > 0;
      report.brightestPixel = Array.from(px);
      c.dispatchEvent(new MouseEvent("click", { clientX: r.right - 1, clientY: r.bottom - 1, bubbles: true }));
      report.imageFrom = state.from;
      report.imageGrid = IM.grid;
      state.from = 0;
    }
    report.headTokens = document.querySelectorAll("#head-view .tok").length;
    let t0 = performance.now();
    layerSel.value = L - 1; layerSel.onchange();
    report.switchLayerMs = performance.now() - t0;
    t0 = performance.now();
    state.view = "model"; render();
    report.modelViewMs = performance.now() - t0;
    report.thumbnails = document.querySelectorAll("#grid canvas.thumb").length;
    const thumb = document.querySelector(`#grid canvas.thumb[data-layer="0"][data-head="${HS[NH - 1]}"]`);
    thumb.click();
    report.clickOpened = { view: state.view, layer: state.layer, heads: HS.filter((_, k) => state.on[k]),
      visible: !$("head-view").hidden };
    state.view = "rollout"; render();
    report.rolloutTokens = document.querySelectorAll("#roll-tokens .rt").length;
    report.flowTokens = document.querySelectorAll("#flow-tokens .rt").length;
    state.view = "summary"; render();
    report.summaryRows = document.querySelectorAll("#summary-body tr").length;
    state.view = "head"; render();
    report.errors = window.attendErrors;
    const pre = el("pre", { id: "attend-selftest" }, JSON.stringify(report));
    document.body.appendChild(pre);
  }
})();
