// ImageGuard console: live parts of the server-rendered pages. No framework, no build step.
"use strict";

// Elements with data-refresh are re-rendered from the same page's ?fragment=1 every data-every ms.
function refreshLoop(el) {
  const every = parseInt(el.dataset.every || "2000", 10);
  const tick = async () => {
    try {
      const r = await fetch(el.dataset.refresh, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (r.ok) { el.innerHTML = await r.text(); el.dataset.updated = String(Date.now()); }
    } catch (e) { /* the service is restarting: try again on the next tick */ }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
}

function alertItem(a) {
  const li = document.createElement("li");
  li.className = "alert new";
  const d = a.data || {};
  const b = document.createElement("b");
  b.textContent = a.device;
  const code = document.createElement("code");
  code.textContent = d.image || "";
  const small = document.createElement("small");
  small.textContent = new Date(a.received_at * 1000).toISOString().replace("T", " ").slice(0, 19);
  li.append(b, " ", (d.container && d.container.name) || "", " ", code, " ", d.reason || "", " ", small);
  li.dataset.id = a.id;
  return li;
}

// The alert feed long-polls /api/alerts: a new alert shows as soon as it is stored.
async function alertFeed(ul) {
  let cursor = ul.dataset.cursor || String(Date.now() / 1000);
  for (;;) {
    try {
      const r = await fetch(`/api/alerts?after=${encodeURIComponent(cursor)}&wait=20`, { credentials: "same-origin" });
      if (!r.ok) { await new Promise((ok) => setTimeout(ok, 2000)); continue; }
      const doc = await r.json();
      const empty = ul.querySelector(".empty");
      if (doc.alerts.length && empty) empty.remove();
      for (const a of doc.alerts) ul.prepend(alertItem(a)); // oldest first: the newest ends on top
      while (ul.children.length > 50) ul.lastElementChild.remove();
      cursor = String(doc.cursor);
    } catch (e) {
      await new Promise((ok) => setTimeout(ok, 2000));
    }
  }
}

// Device page: fetch one resource from the device itself.
async function fetchLive(button) {
  const out = document.getElementById(button.dataset.target);
  out.textContent = "asking the device…";
  try {
    const r = await fetch(button.dataset.live, { credentials: "same-origin" });
    const doc = await r.json();
    out.textContent = r.ok ? JSON.stringify(doc.body, null, 2) : `${doc.error}`;
  } catch (e) {
    out.textContent = `failed: ${e}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(refreshLoop);
  const feed = document.getElementById("alert-feed");
  if (feed) alertFeed(feed);
  document.querySelectorAll("button[data-live]").forEach((b) => b.addEventListener("click", () => fetchLive(b)));
  document.querySelectorAll("form button.danger").forEach((b) =>
    b.form.addEventListener("submit", (ev) => { if (!confirm(`${b.textContent}: are you sure?`)) ev.preventDefault(); }));
});
