// The manycast dashboard: draws each frame the server pushes on /events (no framework).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = [
  "#2f6fde", "#e0662b", "#1d9a5b", "#a23fc4", "#c9a100", "#0f9fb5",
  "#d33a7a", "#6b8e23", "#8c5a3c", "#4b5bd6", "#b5473a", "#3a8f8f",
];
const RADIUS = 116;
const TECHNIQUE_OF = { reset: "R1", forwarded: "R2", transferred: "R3", pinned: "R4" };
const CARRIED_LABEL = { reset_unknown: "reset by a new owner" };
const CARRIED_TEXT = {
  reset: "connections reset by their old owner, reopened at the new one",
  reset_unknown: "segments of connections it did not know (a dead owner's, say)",
  forwarded: "packets forwarded back to the old owner",
  transferred: "connections continued from transferred state",
  pinned: "connections pinned to their old owner's tree",
};

const previous = { shares: {}, starts: {}, seen: false };
const ghosts = [];  // {server, a0, a1, until}
let finished = false;

const colours = new Map();  // server -> its colour, for the whole run

function colour(name) {
  // In the order servers first appear (the frames list them sorted), so each keeps
  // one colour and no two share one while there are fewer than the palette holds.
  if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
  return colours.get(name);
}

function el(tag, attrs = {}, text = null, ns = null) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

function pct(share, digits = 1) {
  return `${(share * 100).toFixed(digits)} %`;
}

function point(angle, r) {
  return [r * Math.cos(angle), r * Math.sin(angle)];
}

function band(a0, a1, r0, r1) {
  // An annular sector outside the pie: where a server's lost part of the space was.
  const [x0, y0] = point(a0, r1);
  const [x1, y1] = point(a1, r1);
  const [x2, y2] = point(a1, r0);
  const [x3, y3] = point(a0, r0);
  const large = a1 - a0 > Math.PI ? 1 : 0;
  const f = (v) => v.toFixed(2);
  return `M ${f(x0)} ${f(y0)} A ${r1} ${r1} 0 ${large} 1 ${f(x1)} ${f(y1)} ` +
    `L ${f(x2)} ${f(y2)} A ${r0} ${r0} 0 ${large} 0 ${f(x3)} ${f(y3)} Z`;
}

function wedge(a0, a1, r) {
  if (a1 - a0 >= 2 * Math.PI - 1e-9) {
    // A whole circle: two half arcs (one arc cannot start and end at one point).
    return `M ${-r} 0 A ${r} ${r} 0 1 1 ${r} 0 A ${r} ${r} 0 1 1 ${-r} 0 Z`;
  }
  const [x0, y0] = point(a0, r);
  const [x1, y1] = point(a1, r);
  const large = a1 - a0 > Math.PI ? 1 : 0;
  return `M 0 0 L ${x0.toFixed(2)} ${y0.toFixed(2)} ` +
    `A ${r} ${r} 0 ${large} 1 ${x1.toFixed(2)} ${y1.toFixed(2)} Z`;
}

function drawPie(frame) {
  const slices = document.getElementById("slices");
  const labels = document.getElementById("labels");
  const ghostLayer = document.getElementById("ghosts");
  const up = frame.servers.filter((s) => s.status === "up" && s.share > 0);
  up.sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
  const now = performance.now();
  slices.replaceChildren();
  labels.replaceChildren();
  let angle = -Math.PI / 2;
  const shares = {};
  const starts = {};
  for (const s of up) {
    const a0 = angle;
    const a1 = angle + s.share * 2 * Math.PI;
    angle = a1;
    shares[s.name] = s.share;
    starts[s.name] = a0;
    const path = el("path", {
      class: "slice",
      d: wedge(a0, a1, RADIUS),
      fill: colour(s.name),
      "data-server": s.name,
      "data-share": s.share.toFixed(6),
      "data-status": s.status,
    }, null, SVG);
    path.appendChild(el("title", {}, `${s.name}: ${pct(s.share)}`, SVG));
    slices.appendChild(path);
    const [lx, ly] = point((a0 + a1) / 2, RADIUS * 0.68);
    const text = s.share >= 0.04 ? `${s.name} ${pct(s.share, 0)}` : "";
    labels.appendChild(el("text", { class: "label", x: lx.toFixed(1), y: ly.toFixed(1),
      "data-server": s.name }, text, SVG));
  }
  // Fig 11: the part of the space a server gave up stays hatched for a few seconds,
  // where it was before the change.
  const notes = [];
  if (previous.seen) {
    for (const [name, before] of Object.entries(previous.shares)) {
      const after = shares[name] || 0;
      if (after < before - 1e-6) {
        const start = previous.starts[name];
        const a0 = start + after * 2 * Math.PI;
        const a1 = start + before * 2 * Math.PI;
        ghosts.push({ server: name, a0, a1, until: now + 6000 });
        notes.push(after > 0
          ? `${name}: ${pct(before)} → ${pct(after)}; the hatched arc moved to others`
          : `${name}: gone; its ${pct(before)} (hatched arc) moved to others`);
      }
    }
  }
  if (notes.length) document.getElementById("space-note").textContent = notes.join("; ");
  while (ghosts.length && ghosts[0].until < now) ghosts.shift();
  ghostLayer.replaceChildren(...ghosts.map((g) =>
    el("path", { class: "ghost", d: band(g.a0, Math.min(g.a1, g.a0 + 2 * Math.PI - 1e-3),
      RADIUS + 3, RADIUS + 9), "data-was": g.server }, null, SVG)));
  previous.shares = shares;
  previous.starts = starts;
  previous.seen = true;
}

function drawServers(frame) {
  const body = document.querySelector("#servers tbody");
  const most = Math.max(1, ...frame.servers.map((s) => s.requests_per_s || 0));
  body.replaceChildren(...frame.servers.map((s) => {
    const row = el("tr", { "data-server": s.name, "data-status": s.status });
    const name = el("td");
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour(s.name);  // CSSOM, which the page's CSP allows
    name.append(swatch, s.name);
    const bar = el("td");
    const inner = el("span", { class: "bar" });
    const width = Math.round(((s.requests_per_s || 0) / most) * 80);
    const fill = el("span", { class: "fill" });
    fill.style.width = `${width}px`;
    inner.append(fill,
      (s.requests_per_s || 0).toFixed(1));
    bar.append(inner);
    row.append(name, el("td", {}, s.status),
      el("td", { class: "num" }, s.status === "up" ? pct(s.share) : "—"),
      el("td", { class: "num" }, s.sessions === null ? "—" : String(s.sessions)),
      bar,
      el("td", { class: "num" }, s.epoch === null ? "—" : String(s.epoch)));
    return row;
  }));
  const c = frame.clients;
  const parts = [`clients served lately: ${c.served}/${c.total}`, `requests ok ${c.requests_ok}`];
  if (c.requests_failed !== null) parts.push(`failed ${c.requests_failed}`);
  if (c.resets !== null) parts.push(`resets ${c.resets}`);
  if (frame.kernel_entries !== undefined) parts.push(`kernel MFC entries ${frame.kernel_entries}`);
  document.getElementById("client-counts").textContent = parts.join(" · ");
  const vips = document.getElementById("vip-routers");
  vips.hidden = frame.vip_routers.length === 0;
  vips.querySelector("tbody").replaceChildren(...frame.vip_routers.map((v) => {
    const row = el("tr", { "data-vip-router": v.name, "data-status": v.status });
    row.append(el("td", {}, v.name), el("td", {}, v.status),
      el("td", { class: "num" }, v.packets_per_s.toFixed(1)),
      el("td", { class: "num" }, String(v.flows)));
    return row;
  }));
}

function drawTimeline(frame) {
  const svg = document.getElementById("timeline");
  const duration = Math.max(frame.duration, frame.now, 1);
  const x = (t) => 20 + (960 * t) / duration;
  const nodes = [el("line", { class: "axis", x1: 20, y1: 30, x2: 980, y2: 30 }, null, SVG)];
  const step = duration > 60 ? 10 : duration > 20 ? 5 : 2;
  for (let t = 0; t <= duration + 1e-9; t += step) {
    nodes.push(el("text", { class: "tick", x: x(t), y: 58, "text-anchor": "middle" },
      `${t} s`, SVG));
  }
  const done = new Set(frame.events.map((e) => `${e.at}|${e.what}`));
  for (const p of frame.plan) {
    if (!frame.events.some((e) => e.what === p.what && Math.abs(e.at - p.at) < 1)) {
      nodes.push(el("circle", { class: "planned", cx: x(p.at), cy: 30, r: 6,
        "data-kind": p.kind }, null, SVG));
    }
  }
  for (const e of frame.events) {
    const mark = el("circle", { class: `done kind-${e.kind}`, cx: x(e.at), cy: 30, r: 8,
      "data-kind": e.kind, "data-server": e.server, "data-at": e.at }, null, SVG);
    mark.appendChild(el("title", {}, `${e.at.toFixed(1)} s: ${e.text}`, SVG));
    nodes.push(mark);
    nodes.push(el("text", { class: `tick kind-${e.kind}`, x: x(e.at), y: 12,
      "text-anchor": "middle" }, e.server || e.kind, SVG));
  }
  nodes.push(el("line", { class: "cursor", x1: x(frame.now), y1: 18, x2: x(frame.now), y2: 42 },
    null, SVG));
  svg.replaceChildren(...nodes);
  const list = document.getElementById("events");
  // After the run: each disruptive step's outcome, from the run's summary.
  const outcome = new Map();
  for (const o of (frame.summary && frame.summary.events) || []) {
    outcome.set(`${o.at}|${o.what}`, o);
  }
  const items = frame.events.map((e) => {
    const li = el("li", { class: `done kind-${e.kind}`, "data-kind": e.kind,
      "data-server": e.server, "data-at": e.at });
    li.append(el("span", { class: "at" }, `${e.at.toFixed(1)} s`), e.text);
    const o = outcome.get(`${e.at}|${e.what}`);
    if (o) {
      const after = o.recovery_s === null ? "never all served again"
        : `all served again after ${o.recovery_s.toFixed(2)} s`;
      li.append(el("span", { class: "outcome", "data-affected": o.affected_clients },
        ` — ${o.affected_clients} clients disrupted, ${after}`));
    }
    return li;
  });
  for (const p of frame.plan) {
    if (!done.has(`${p.at}|${p.what}`) &&
        !frame.events.some((e) => e.what === p.what && Math.abs(e.at - p.at) < 1)) {
      const li = el("li", { class: "planned", "data-kind": p.kind });
      li.append(el("span", { class: "at" }, `${p.at.toFixed(1)} s`), `${p.text} (planned)`);
      items.push(li);
    }
  }
  list.replaceChildren(...items);
}

function drawDots(frame) {
  const svg = document.getElementById("dots");
  const columns = 30;
  const gap = 14;
  const rows = Math.max(1, Math.ceil(frame.dots.length / columns));
  svg.setAttribute("viewBox", `0 0 ${columns * gap} ${rows * gap}`);
  svg.replaceChildren(...frame.dots.map(([client, server, moved], i) => {
    const dot = el("circle", {
      cx: (i % columns) * gap + gap / 2,
      cy: Math.floor(i / columns) * gap + gap / 2,
      r: 4.5,
      fill: colour(server),
      class: moved ? "moved" : "",
      "data-client": client,
      "data-server": server,
    }, null, SVG);
    dot.appendChild(el("title", {}, `${client} → ${server}`, SVG));
    return dot;
  }));
}

function drawMoves(frame) {
  document.getElementById("technique").textContent = frame.technique
    ? `Technique ${frame.technique}: ${frame.technique_text}. A client moves when the ` +
      "portion of the space holding its address changes owner."
    : "Who answered each client last, as the lab's prober saw it.";
  document.querySelector("#moves tbody").replaceChildren(...frame.moves.map((m) => {
    const row = el("tr", { "data-from": m.from, "data-to": m.to });
    row.append(el("td", {}, m.from), el("td", {}, m.to),
      el("td", { class: "num" }, String(m.clients)));
    return row;
  }));
  document.getElementById("recent-moves").replaceChildren(...frame.recent_moves.map((m) =>
    el("li", {}, `${m.at.toFixed(1)} s: ${m.clients} client${m.clients === 1 ? "" : "s"} ` +
      `${m.from} → ${m.to}`)));
  document.getElementById("carried").replaceChildren(...Object.entries(frame.carried).map(
    ([how, n]) => el("li", {
      class: TECHNIQUE_OF[how] === frame.technique ? "active" : "inactive",
      "data-how": how,
    }, `${TECHNIQUE_OF[how] || ""} ${CARRIED_LABEL[how] || how}: ${n} ` +
      `${CARRIED_TEXT[how] || ""}`.trim())));
}

function drawRefusals(frame) {
  const entries = Object.entries(frame.refusals);
  document.querySelector("#refusals tbody").replaceChildren(...entries.map(([reason, n]) => {
    const row = el("tr", { "data-reason": reason });
    row.append(el("td", {}, reason), el("td", { class: "num" }, String(n)));
    return row;
  }));
  document.getElementById("refusals-note").textContent = entries.length
    ? ""
    : frame.private
      ? "none so far: every join was signed, fresh and on the right link"
      : "none: a public pool's routers accept unsigned joins (refusals show for private pools)";
}

function drawSummary(frame) {
  const p = document.getElementById("summary");
  const s = frame.summary;
  p.hidden = !s;
  if (!s) return;
  const parts = [`${s.clients_served_at_end}/${s.clients} clients served at the end`,
    `${s.requests_ok} requests ok`, `${s.requests_failed} failed`, `${s.resets} resets`];
  if (s.latency_ms && s.latency_ms.p50 !== null) {
    parts.push(`latency p50 ${s.latency_ms.p50} ms, p99 ${s.latency_ms.p99} ms`);
  }
  p.dataset.servedAtEnd = String(s.clients_served_at_end);
  p.textContent = `Run finished: ${parts.join(" · ")}.`;
}

function render(frame) {
  for (const s of frame.servers) colour(s.name);
  document.title = `${frame.title} · t = ${frame.now.toFixed(1)} s`;
  document.getElementById("title").textContent = frame.title;
  document.getElementById("meta").textContent =
    `driver ${frame.driver}` + (frame.technique ? ` · technique ${frame.technique}` : "") +
    (frame.private ? " · private pool" : "");
  document.getElementById("clock").textContent =
    `t = ${frame.now.toFixed(1)} s / ${frame.duration.toFixed(0)} s`;
  document.body.dataset.now = String(frame.now);
  drawPie(frame);
  drawServers(frame);
  drawTimeline(frame);
  drawDots(frame);
  drawMoves(frame);
  drawRefusals(frame);
  drawSummary(frame);
}

function setState(state) {
  document.body.dataset.state = state;
  document.getElementById("conn").textContent = state;
}

const source = new EventSource("/events");
source.addEventListener("frame", (message) => {
  const frame = JSON.parse(message.data);
  if (frame.servers) render(frame);
  if (frame.finished) {
    finished = true;
    source.close();
    setState("finished");
  } else {
    setState("live");
  }
});
source.addEventListener("error", () => {
  if (!finished) setState("reconnecting");
});
