// A job's page, live: the API's event stream says when the job changed; the page then fetches the
// job with all its shards and recolours the grid (no reload). Text from the farm is only ever set
// with textContent or as an attribute, never parsed as HTML.
"use strict";
(() => {
  const root = document.getElementById("job");
  if (!root) return;
  const jobId = root.dataset.job;
  const grid = document.getElementById("shard-grid");
  const detail = document.getElementById("shard-detail");
  let shards = [];
  let selected = null;

  function duration(seconds) {  // as the server writes it: 42s, 3m 05s, 2h 07m, 3d 4h
    if (seconds == null) return "-";
    const s = Math.max(0, Math.round(seconds));
    const pad = (n) => String(n).padStart(2, "0");
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function describe(s) {
    const lines = [
      `shard ${s.index}: ${s.status}`,
      `worker: ${s.worker || "-"}   attempt: ${s.attempts}   queue: ${s.queue}`,
      `items: ${s.items_done}/${s.items_total}   progress: ${Math.round((s.progress || 0) * 100)}%`,
    ];
    const timings = Object.entries(s.timings || {});
    if (timings.length) lines.push("timings: " + timings.map(([k, v]) => `${k}=${v}`).join("  "));
    if (s.failed_workers && s.failed_workers.length) lines.push("failed on: " + s.failed_workers.join(", "));
    if (s.errors && s.errors.length) lines.push("errors:", ...s.errors.map((e) => "  " + e));
    else if (s.error) lines.push("error: " + s.error);
    return lines.join("\n");
  }

  function cell(s) {
    let el = grid.querySelector(`[data-index="${s.index}"]`);
    if (!el) {
      el = document.createElement("button");
      el.type = "button";
      el.dataset.index = String(s.index);
      grid.appendChild(el);
    }
    el.className = "cell st-" + s.status + (selected === s.index ? " selected" : "");
    el.dataset.status = s.status;
    el.title = describe(s);
    return el;
  }

  function show(job) {
    shards = job.shards || [];
    for (const s of shards) cell(s);
    const status = document.getElementById("job-status");
    status.textContent = job.status;
    status.className = "badge s-" + job.status;
    const bar = document.getElementById("job-progress");
    bar.max = job.items_total || 1;
    bar.value = job.items_done;
    document.getElementById("job-items").textContent = `${job.items_done}/${job.items_total}`;
    document.getElementById("job-shards").textContent = Object.entries(job.shards_by_status || {})
      .map(([k, v]) => `${v} ${k}`).join(", ");
    document.getElementById("job-pace").textContent =
      job.seconds_per_item == null ? "-" : job.seconds_per_item.toFixed(2);
    document.getElementById("job-eta").textContent = duration(job.eta_s);
    if (selected !== null) {
      const s = shards.find((x) => x.index === selected);
      if (s) detail.textContent = describe(s);
    }
  }

  async function refresh() {
    const answer = await fetch(`/v1/jobs/${jobId}?shards=all`, { credentials: "same-origin" });
    if (answer.ok) show(await answer.json());
  }

  async function showResults() {
    const answer = await fetch(`/v1/jobs/${jobId}/results`, { credentials: "same-origin" });
    if (!answer.ok) return;
    const results = await answer.json();
    const strip = document.getElementById("thumbs");
    if (strip.children.length >= Math.min(results.length, 48)) return;
    strip.replaceChildren();
    for (const r of results.slice(0, 48)) {
      const link = new URL(r.url, location.href);
      if (r.content_type.startsWith("video/")) {
        const video = document.createElement("video");
        video.className = "thumb";
        video.controls = true;
        video.preload = "none";
        video.src = link.href;
        strip.appendChild(video);
        continue;
      }
      const a = document.createElement("a");
      a.className = "thumb";
      a.href = link.href;
      a.title = `item ${r.item_index}` + (r.prompt ? `: ${r.prompt}` : "");
      const img = document.createElement("img");
      img.src = link.href;
      img.alt = `item ${r.item_index}`;
      img.loading = "lazy";
      a.appendChild(img);
      strip.appendChild(a);
    }
    document.getElementById("results-count").textContent = `${results.length} finished items`;
  }

  grid.addEventListener("click", (event) => {
    const el = event.target.closest(".cell");
    if (!el) return;
    selected = Number(el.dataset.index);
    for (const other of grid.querySelectorAll(".cell.selected")) other.classList.remove("selected");
    el.classList.add("selected");
    const s = shards.find((x) => x.index === selected);
    detail.textContent = s ? describe(s) : `shard ${selected}`;
  });

  refresh();
  if (root.dataset.ended === "true") return;
  const events = new EventSource(`/v1/jobs/${jobId}/events`);
  events.addEventListener("progress", () => refresh());
  events.addEventListener("end", async () => {
    events.close();
    await refresh();
    await showResults();
    const cancel = document.getElementById("cancel-job");
    if (cancel) cancel.disabled = true;
  });
  events.onerror = () => { if (events.readyState === EventSource.CLOSED) refresh(); };
})();
