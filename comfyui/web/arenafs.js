// arenafs in ComfyUI's front end: the Arena settings (read from and written to the daemon), a
// copy status badge fed by the package's websocket events, and a dry run of the open workflow.
// Everything goes through the package's routes (/arenafs/...), which ask the daemon.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// Setting id -> daemon key.
const KEYS = {
  "Arena.Enable": "ARENA_AUTO_CACHE_ENABLED",
  "Arena.Discovery": "ARENA_CACHE_DISCOVERY",
  "Arena.Prefetch": "ARENA_CACHE_PREFETCH_STRATEGY",
  "Arena.MaxConcurrency": "ARENA_CACHE_MAX_CONCURRENCY",
};
let syncing = false; // true while the panel is filled from the daemon: no writes back

function toast(severity, summary, detail) {
  try {
    app.extensionManager.toast.add({ severity, summary, detail, life: 6000 });
  } catch (e) {
    console.warn("arenafs:", summary, detail);
  }
}

async function push(id, value, old) {
  if (syncing || old === undefined) return;
  const key = KEYS[id];
  const body = { settings: { [key]: typeof value === "boolean" ? (value ? "1" : "0") : String(value) } };
  try {
    const r = await api.fetchApi("/arenafs/settings", { method: "POST", body: JSON.stringify(body) });
    const answer = await r.json();
    if (answer.status !== "success") {
      toast("error", "arenafs: setting not changed", `${answer.code}: ${answer.message}`);
      syncing = true;
      try { await app.extensionManager.setting.set(id, old); } finally { syncing = false; }
      return;
    }
    if (answer.overridden && answer.overridden.length) {
      toast("warn", "arenafs: written, but overridden", answer.overridden.join(", "));
    }
  } catch (e) {
    toast("error", "arenafs: daemon not reachable", String(e));
  }
}

async function pull() {
  try {
    const r = await api.fetchApi("/arenafs/settings");
    const answer = await r.json();
    if (answer.status !== "success") return answer;
    syncing = true;
    try {
      const s = answer.settings;
      await app.extensionManager.setting.set("Arena.Enable", s.ARENA_AUTO_CACHE_ENABLED === "1");
      await app.extensionManager.setting.set("Arena.Discovery", s.ARENA_CACHE_DISCOVERY);
      await app.extensionManager.setting.set("Arena.Prefetch", s.ARENA_CACHE_PREFETCH_STRATEGY);
      await app.extensionManager.setting.set("Arena.MaxConcurrency", Number(s.ARENA_CACHE_MAX_CONCURRENCY));
    } finally {
      syncing = false;
    }
    return answer;
  } catch (e) {
    return { status: "error", code: "UNREACHABLE", message: String(e) };
  }
}

function fmtBytes(n) {
  if (n == null) return "?";
  const u = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function badge() {
  let el = document.getElementById("arenafs-badge");
  if (el) return el;
  el = document.createElement("div");
  el.id = "arenafs-badge";
  el.style.cssText = "position:fixed;right:12px;top:56px;z-index:1000;padding:6px 10px;" +
    "border-radius:6px;font:12px sans-serif;background:#222c;color:#eee;max-width:420px;" +
    "box-shadow:0 1px 4px #0008";
  el.innerHTML = '<div id="arenafs-state">arenafs: …</div><div id="arenafs-jobs"></div>' +
    '<button id="arenafs-dryrun" style="margin-top:4px;font:11px sans-serif">Dry-run</button>' +
    '<div id="arenafs-dryrun-result" style="margin-top:4px;white-space:pre-wrap"></div>';
  document.body.appendChild(el);
  el.querySelector("#arenafs-dryrun").addEventListener("click", dryRun);
  return el;
}

// What the badge showed last, to toast the changes: the daemon lost or back, the NAS offline or
// back. The first state seen (page load) toasts only what is wrong.
let last = null;
let lastEventAt = 0;

function announce(progress) {
  const now = { reachable: !!progress.reachable, offline: !!(progress.reachable && progress.offline) };
  const was = last || { reachable: true, offline: false };
  if (!now.reachable && was.reachable) {
    toast("error", "arenafs: daemon not reachable", "models load from the NAS as without arenafs");
  } else if (now.reachable && !was.reachable && last) {
    toast("info", "arenafs: daemon reachable again", "");
  }
  if (now.offline && !was.offline) {
    toast("warn", "arenafs: NAS offline", "complete copies are served; other models fail to load until it is back");
  } else if (!now.offline && was.offline && now.reachable) {
    toast("info", "arenafs: NAS back online", "");
  }
  last = now;
}

function show(progress) {
  announce(progress);
  const el = badge();
  const state = el.querySelector("#arenafs-state");
  const jobs = el.querySelector("#arenafs-jobs");
  el.dataset.reachable = String(!!progress.reachable);
  if (!progress.reachable) {
    state.textContent = "arenafs: daemon not reachable";
    state.style.color = "#f88";
    jobs.textContent = "";
    return;
  }
  const colors = { gray: "#aaa", green: "#8f8", red: "#f88" };
  state.style.color = colors[progress.cache_state] || "#eee";
  state.textContent = `arenafs: ${progress.cache_state}` + (progress.offline ? " · NAS offline" : "") +
    (progress.jobs.length ? ` · ${progress.jobs.length} copying` : " · idle");
  const lines = progress.jobs.map((j) => {
    const pct = j.total_bytes ? Math.floor((100 * j.done_bytes) / j.total_bytes) : 0;
    const eta = j.eta_secs != null ? ` ETA ${Math.ceil(j.eta_secs)} s` : "";
    return `${j.path} ${pct}% ${fmtBytes(j.done_bytes)}/${fmtBytes(j.total_bytes)} ` +
      `${fmtBytes(j.rate_bytes_per_sec)}/s${eta}`;
  });
  // The model updater, where the daemon has a manifest.
  const up = progress.update;
  if (up && up.running) {
    for (const m of up.models || []) {
      if (m.state === "waiting" || m.state === "done") continue;
      const pct = m.total_bytes ? ` ${Math.floor((100 * m.done_bytes) / m.total_bytes)}%` : "";
      lines.push(`update ${m.id}: ${m.state.replace(/_/g, " ")}${pct}`);
    }
  } else if (up && up.available && up.available.length) {
    lines.push(`update available: ${up.available.join(", ")}`);
  }
  jobs.textContent = lines.join("\n");
}

async function dryRun() {
  const out = badge().querySelector("#arenafs-dryrun-result");
  out.textContent = "resolving…";
  try {
    const { output } = await app.graphToPrompt();
    const r = await api.fetchApi("/arenafs/dryrun", { method: "POST", body: JSON.stringify({ prompt: output }) });
    const a = await r.json();
    if (a.status !== "success") {
      out.textContent = `${a.code}: ${a.message}`;
      return;
    }
    const lines = a.models.filter((m) => m.status === "exec").map((m) => {
      const where = m.nas_path ? "on the NAS" : "not on the NAS";
      const cached = m.cache || "none";
      const copy = m.copy ? `, ${fmtBytes(m.size - (m.cached_bytes || 0))} to copy`
        : m.why === "budget_exceeded" ? ", over the byte budget" : "";
      return `${m.category}/${m.path}: ${where}, cached ${cached}, ${fmtBytes(m.size)}${copy}`;
    });
    const t = a.totals || {};
    const over = t.budget_remaining != null && t.bytes_to_copy > t.budget_remaining;
    lines.push(`to copy ${fmtBytes(t.bytes_to_copy)}` +
      (t.budget_remaining == null ? " (no byte budget)"
        : ` (budget left ${fmtBytes(t.budget_remaining)}${over ? ": over the budget, nothing would be queued" : ""})`));
    out.textContent = lines.join("\n");
  } catch (e) {
    out.textContent = String(e);
  }
}

const FALLBACK_MS = 15000;

// The badge from the package's status route (page load, and when no event came for a while).
async function refresh() {
  try {
    const st = await (await api.fetchApi("/arenafs/status")).json();
    if (st.reachable) {
      const d = st.daemon;
      const up = d.update ? {
        running: d.update.running ? d.update.running.kind : null,
        models: d.update.running ? d.update.running.models : [],
        available: d.update.available || [],
      } : null;
      show({ reachable: true, cache_state: d.cache_state, offline: d.offline, jobs: d.jobs || [], update: up });
    } else {
      show({ reachable: false, jobs: [] });
    }
  } catch (e) {
    // ComfyUI's own server is not answering: say nothing of arenafs.
  }
}

app.registerExtension({
  name: "arenafs.AutoCache",
  settings: [
    { id: "Arena.Enable", category: ["Arena", "AutoCache", "Enable"], name: "Enable", type: "boolean",
      defaultValue: true, onChange: (v, old) => push("Arena.Enable", v, old) },
    { id: "Arena.Discovery", category: ["Arena", "AutoCache", "Model Discovery"], name: "Model Discovery",
      type: "combo", options: [{ text: "Workflow Only", value: "workflow_only" }, { text: "Manual Only", value: "manual_only" }],
      defaultValue: "workflow_only", onChange: (v, old) => push("Arena.Discovery", v, old) },
    { id: "Arena.Prefetch", category: ["Arena", "AutoCache", "Prefetch Strategy"], name: "Prefetch Strategy",
      type: "combo", options: [{ text: "Lazy", value: "lazy" }, { text: "Prefetch Allow-list", value: "prefetch_allowlist" }],
      defaultValue: "lazy", onChange: (v, old) => push("Arena.Prefetch", v, old) },
    { id: "Arena.MaxConcurrency", category: ["Arena", "AutoCache", "Max Concurrent Downloads"],
      name: "Max Concurrent Downloads", type: "number", defaultValue: 2, attrs: { min: 1, max: 64, step: 1 },
      onChange: (v, old) => push("Arena.MaxConcurrency", v, old) },
  ],
  async setup() {
    badge();
    api.addEventListener("arenafs.progress", ({ detail }) => {
      lastEventAt = Date.now();
      show(detail);
    });
    api.addEventListener("arenafs.event", ({ detail }) => {
      if (detail.kind === "error" && detail.code === "UNREACHABLE") {
        show({ reachable: false, jobs: [] }); // toasts unless the badge knew already
      } else if (detail.kind === "error") {
        const what = { BUDGET_EXCEEDED: "budget exceeded" }[detail.code] || detail.code;
        toast("error", `arenafs: ${what}`, detail.message || "");
      }
    });
    const answer = await pull();
    await refresh();
    // The websocket's events are the fast path; should they stop (a proxy that drops the
    // websocket, a Desktop build that reconnects it), the badge asks the server itself.
    setInterval(() => {
      if (Date.now() - lastEventAt > FALLBACK_MS && document.visibilityState !== "hidden") refresh();
    }, FALLBACK_MS);
    if (answer && answer.status !== "success" && answer.code !== "UNREACHABLE") {
      console.warn("arenafs settings:", answer.code, answer.message);
    }
  },
});
