// The fluidfs page: polls the JSON API (the same answers as `fluidfs status --json`),
// browses snapshots, downloads and restores. No framework, nothing from elsewhere.
"use strict";

const state = { csrf: "", refresh: 5, snapshot: null, path: [], tab: "overview" };

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function human(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s >= 86400) return Math.floor(s / 86400) + " d ago";
  if (s >= 3600) return Math.floor(s / 3600) + " h ago";
  if (s >= 60) return Math.floor(s / 60) + " min ago";
  return Math.floor(s) + " s ago";
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options));
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function post(path, payload) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Fluidfs-CSRF": state.csrf },
    body: JSON.stringify(payload || {}),
  });
}

// --- overview -------------------------------------------------------------------------

function showStatus(s) {
  const o = s.overview;
  $("verdict").dataset.level = o.level;
  $("sentence").textContent = o.sentence;
  const warnings = $("warnings");
  warnings.replaceChildren(...o.warnings.map((w) => {
    const li = el("li", w.text);
    li.dataset.kind = w.kind;
    return li;
  }));
  const n = s.shards_total, k = s.shards_needed;
  $("redundancy-note").textContent =
    `${s.blocks} data blocks; shards on distinct peers, of ${n} (${k} rebuild a block)`;
  histogram($("histogram"), s.redundancy, n, k);
  histogram($("reachable"), s.reachable, n, k);
  showDurability(s.durability, n);
  const done = s.uploaded_bytes, pending = s.upload_pending_bytes, rate = s.upload_rate;
  const total = done + pending;
  $("upload-bar").style.width = (total ? 100 * done / total : 100) + "%";
  $("uploads").textContent =
    `${human(done)} sent, ${human(pending)} pending, ${human(rate)}/s, ${eta(s.upload_eta)}` +
    (s.unsealed_bytes ? `; ${human(s.unsealed_bytes)} not sealed yet` : "");
  const limited = (rate, limit) =>
    `${human(rate)}/s ` + (limit ? `of ${human(limit)}/s` : "(no limit)");
  $("network").textContent =
    `network: sending ${limited(s.send_rate, s.limit_upload)}, ` +
    `receiving ${limited(s.receive_rate, s.limit_download)}`;
  $("repair").textContent =
    `${s.repair_queue} blocks queued, ${human(s.repaired_bytes)} rebuilt, ` +
    `${human(s.repair_rate)}/s (at most ${human(s.repair_bandwidth)}/s)`;
  $("endangered-blocks").textContent = String(s.endangered_blocks);
  $("emergency-repairs").textContent = String(s.emergency_repairs);
  $("emergency").dataset.endangered = String(s.endangered_blocks);
  const c = s.commit;
  $("commit").textContent = c.head_seq
    ? `commit ${c.head_seq}, ${ago(c.head_time)}, ` +
      (c.published ? "published to peers" : "not yet on peers") +
      `; ${c.snapshots} snapshots` + (c.changes_pending ? "; changes waiting" : "")
    : "no commit yet";
  $("node").textContent =
    `peer ${s.peer_id.slice(0, 16)}…, ${s.peers_with_agreements} agreements with ` +
    `${s.peers_known} known peers; hosting ${human(s.hosted_bytes)} for peers`;
  showProvider(s.provider);
  const memory = s.memory && s.memory.vm_rss ? `memory ${human(s.memory.vm_rss)} resident` : "";
  const meta = s.meta_store
    ? `metadata store ${human(s.meta_store.file_bytes)} on disk, ` +
      `${human(s.meta_store.live_bytes)} live` +
      (s.meta_store.compaction_due ? ", compaction due" : "")
    : "";
  $("resources").textContent = [memory, meta].filter(Boolean).join("; ");
}

// Blocks per level ("12" of N shards, "local"), one row per level, data-level on each.
function histogram(container, levels, n, k) {
  const max = Math.max(1, ...Object.values(levels));
  const rows = Object.entries(levels).map(([level, count]) => {
    const row = el("div", undefined, "hist-row");
    row.dataset.level = level;
    const label = level === "local" ? "this node only" : `${level} of ${n}`;
    row.append(el("span", label, "hist-label"));
    const bar = el("span", undefined, "hist-bar");
    if (level === "local") bar.classList.add("local");
    else if (Number(level) < k) bar.classList.add("low");
    bar.style.width = (100 * count / max) + "px";
    row.append(bar, el("span", String(count), "hist-count"));
    return row;
  });
  if (!rows.length) rows.push(el("div", "no blocks on peers", "muted"));
  container.replaceChildren(...rows);
}

function eta(seconds) {
  if (seconds === 0) return "uploads done";
  if (seconds === null || seconds === undefined) return "ETA unknown (not moving)";
  return "ETA " + span(seconds);
}

function span(seconds) {
  const s = Math.round(seconds);
  const units = [[86400, "d"], [3600, "h"], [60, "min"], [1, "s"]];
  const found = units.findIndex(([size]) => s >= size);
  const i = found < 0 ? units.length - 1 : found;
  // The two largest units that apply, the second left out when it is 0: "10 min", "2 d 4 h".
  const parts = [[Math.floor(s / units[i][0]), units[i][1]]];
  if (i + 1 < units.length) {
    parts.push([Math.floor(s % units[i][0] / units[i + 1][0]), units[i + 1][1]]);
  }
  return parts.filter(([n], j) => n || j === 0).map(([n, u]) => `${n} ${u}`).join(" ");
}

// One significant digit, as `fluidfs status` prints it.
function chance(p) {
  return p !== 0 && p < 1e-4 ? p.toExponential(0) : String(Number(p.toPrecision(1)));
}

// The estimate of blocks/durability.py and what it assumes (the same words as the CLI).
function showDurability(d, n) {
  const line = $("durability");
  if (!d) {
    line.textContent = `No estimate until the backup is on ${n} peers.`;
    delete line.dataset.annualLoss;
    $("durability-assumptions").textContent = "";
    return;
  }
  line.textContent = `Estimated chance of losing data this year: ${chance(d.annual_loss)}`;
  line.dataset.annualLoss = String(d.annual_loss);
  const spread = d.grouped && d.peers >= 2 * n ? `in groups of ${n}` : "spread";
  const how = d.rate_measured ? "measured" : "at most (the limit)";
  $("durability-assumptions").textContent =
    `${d.peers} peers, ${spread}; a peer assumed to last ${d.lifetime_days.toFixed(0)} days; ` +
    `a lost peer repaired in ${span(d.repair_days * 86400)} = ` +
    `${span(d.tolerance_days * 86400)} tolerance + ${human(d.share_bytes)} re-created at ` +
    `${human(d.repair_rate)}/s, ${how}`;
}

function showProvider(p) {
  const line = $("provider");
  line.hidden = !p;
  if (!p) return;
  const answer = { true: "reachable", false: "NOT REACHABLE", null: "not asked yet" }[p.reachable];
  line.dataset.reachable = String(p.reachable);
  line.textContent = `storage provider ${p.id.slice(0, 12)}… at ${p.addr}: ${answer}` +
    (p.reachable === false && p.last_error ? ` (${p.last_error})` : "") +
    `; holds our side of ${p.reservations} agreements (${human(p.reserved_bytes)} reserved)`;
}

async function refreshStatus() {
  try {
    showStatus(await api("/api/status"));
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    $("verdict").dataset.level = "unknown";
    $("sentence").textContent = "The node does not answer: " + err.message;
  }
}

// --- peers ------------------------------------------------------------------------------

async function refreshPeers() {
  const { peers } = await api("/api/peers");
  $("peer-rows").replaceChildren(...peers.map((p) => {
    const tr = el("tr");
    tr.dataset.peer = p.id;
    const agreement = p.failing_since
      ? "failing for " + ago(p.failing_since).replace(" ago", "")
      : (p.active ? "active" : "none");
    tr.append(
      el("td", p.id.slice(0, 16) + "…"), el("td", p.addr), el("td", p.trust.toFixed(2)),
      el("td", `${human(p.we_use)} of ${human(p.we_host)}`),
      el("td", `${human(p.they_use)} of ${human(p.they_host)}`),
      el("td", `${p.audits_passed ?? "?"} passed, ${p.audits_failed ?? "?"} failed`),
      el("td", ago(p.last_seen)), el("td", agreement));
    return tr;
  }));
}

// --- snapshots ------------------------------------------------------------------------

function query(extra) {
  const path = "/" + state.path.join("/");
  return new URLSearchParams(Object.assign({ snapshot: state.snapshot, path }, extra));
}

async function refreshSnapshots() {
  const { snapshots } = await api("/api/snapshots");
  $("snapshot-list").replaceChildren(...snapshots.slice().reverse().map((s) => {
    const li = el("li");
    const b = el("button", s.name);
    b.dataset.snapshot = s.name;
    if (s.name === state.snapshot) b.classList.add("active");
    b.addEventListener("click", () => { state.snapshot = s.name; state.path = []; browse(); });
    li.append(b);
    return li;
  }));
}

async function browse() {
  for (const b of document.querySelectorAll("#snapshot-list button")) {
    b.classList.toggle("active", b.dataset.snapshot === state.snapshot);
  }
  $("browse-title").textContent = state.snapshot;
  const crumbs = [el("a", "/")];
  crumbs[0].href = "#";
  crumbs[0].addEventListener("click", (e) => { e.preventDefault(); state.path = []; browse(); });
  state.path.forEach((name, i) => {
    const a = el("a", name + "/");
    a.href = "#";
    a.addEventListener("click", (e) => {
      e.preventDefault(); state.path = state.path.slice(0, i + 1); browse();
    });
    crumbs.push(a);
  });
  $("crumbs").replaceChildren(...crumbs);
  const folder = $("download-folder");
  folder.href = "/api/download?" + query();
  folder.hidden = false;
  let listing;
  try {
    listing = await api("/api/browse?" + query());
  } catch (err) {
    $("message").textContent = err.message;
    return;
  }
  $("entries").replaceChildren(...listing.entries.map((e) => {
    const tr = el("tr");
    tr.dataset.name = e.name;
    const name = el("td");
    const target = query({ path: "/" + [...state.path, e.name].join("/") });
    if (e.type === "dir") {
      const a = el("a", e.name + "/");
      a.href = "#";
      a.className = "open";
      a.addEventListener("click", (ev) => {
        ev.preventDefault(); state.path.push(e.name); browse();
      });
      name.append(a);
    } else {
      name.textContent = e.name;
    }
    const actions = el("td");
    const download = el("a", e.type === "dir" ? "download (tar)" : "download", "download");
    download.href = "/api/download?" + target;
    download.setAttribute("download", e.type === "dir" ? e.name + ".tar" : e.name);
    actions.append(download);
    if (e.type === "file") {
      const restore = el("button", "restore", "restore");
      restore.addEventListener("click", () => restoreFile(e.name));
      actions.append(" ", restore);
    }
    tr.append(name, el("td", e.type === "dir" ? "" : human(e.size)),
      el("td", new Date(e.mtime * 1000).toLocaleString()), actions);
    return tr;
  }));
}

async function restoreFile(name) {
  const path = "/" + [...state.path, name].join("/");
  $("message").textContent = "restoring " + path + "…";
  try {
    const r = await post("/api/restore", { snapshot: state.snapshot, path });
    $("message").textContent = "restored to " + r.restored_to;
    $("message").dataset.restored = r.restored_to;
  } catch (err) {
    $("message").textContent = "restore failed: " + err.message;
  }
}

// --- keyfile ----------------------------------------------------------------------------

function setupKeyfile() {
  $("keyfile-show").addEventListener("click", () => {
    $("keyfile-qr").src = "/api/keyfile.svg";
    $("keyfile-qr").hidden = false;
  });
  $("keyfile-saved").addEventListener("click", async () => {
    try {
      await post("/api/keyfile/saved");
      $("saved-note").textContent = "Thank you: the warning is gone.";
      refreshStatus();
    } catch (err) {
      $("saved-note").textContent = "failed: " + err.message;
    }
  });
}

// --- tabs and polling -------------------------------------------------------------------

function show(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll(".tab")) {
    b.classList.toggle("active", b.dataset.tab === tab);
  }
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== tab;
  if (tab === "peers") refreshPeers();
  if (tab === "snapshots") refreshSnapshots();
}

async function tick() {
  await refreshStatus();
  if (state.tab === "peers") await refreshPeers().catch(() => {});
  setTimeout(tick, state.refresh * 1000);
}

async function start() {
  // Tabs answer at once, even while the session is still being read.
  for (const b of document.querySelectorAll(".tab")) {
    b.addEventListener("click", () => show(b.dataset.tab));
  }
  setupKeyfile();
  const session = await api("/api/session");
  state.csrf = session.csrf;
  state.refresh = session.refresh;
  if (state.tab === "overview") show(location.hash.slice(1) || "overview");
  tick();
}

start();
