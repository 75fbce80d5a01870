// scillm ops dashboard: no framework, no build step. Every value from the server is rendered as text
// (textContent / createTextNode), never parsed as HTML; the API key lives in this closure only.
(() => {
  "use strict";

  let key = null;            // never written to the DOM, a URL, a cookie or storage
  let timer = null;
  let refreshMs = 2000;
  let tab = "providers";
  let selectedCall = null;
  let runStream = null;      // AbortController of the followed run's event stream
  const $ = (selector) => document.querySelector(selector);

  // -- DOM helpers --------------------------------------------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined) continue;
      if (name === "class") node.className = value;
      else if (name === "onclick") node.addEventListener("click", value);
      else if (name === "title") node.title = String(value);
      else if (name === "value" || name === "max") node[name] = value;
      else if (name.startsWith("data-")) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const dash = (value) => (value === null || value === undefined || value === "" ? "–" : value);
  const time = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "–");
  const seconds = (row) => (row.ended ? (row.ended - row.started).toFixed(1)
                                      : ((Date.now() / 1000) - row.started).toFixed(0));
  const badge = (text, kind) => el("span", {class: "badge " + (kind || text)}, text);

  // -- data calls -----------------------------------------------------------------------------------------------

  class AuthError extends Error {}

  async function api(path) {
    const response = await fetch(path, {headers: {"Authorization": "Bearer " + key}, cache: "no-store",
                                        credentials: "omit", redirect: "error"});
    if (response.status === 401 || response.status === 403) throw new AuthError("key not accepted");
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { message = (await response.json()).error.message; } catch (e) { /* keep the status */ }
      throw new Error(message);
    }
    return response.json();
  }

  // -- login ----------------------------------------------------------------------------------------------------

  async function login(event) {
    event.preventDefault();
    const input = $("#key");
    key = input.value.trim();
    input.value = "";
    $("#login-error").textContent = "";
    try {
      const summary = await api("/v1/scillm/ui/summary");
      $("#login").hidden = true;
      $("#app").hidden = false;
      $("#tabs").hidden = false;
      $("#logout").hidden = false;
      refreshMs = Math.max(250, (summary.refresh_s || 2) * 1000);
      fillDimensions(summary.dimensions || ["model", "caller", "key"]);
      showSummary(summary);
      refresh();
    } catch (error) {
      logout(error instanceof AuthError ? "That key was not accepted." : "Cannot reach the server: " + error.message);
    }
  }

  function logout(message) {
    key = null;
    clearTimeout(timer);
    if (runStream) runStream.abort();
    for (const body of document.querySelectorAll("tbody")) body.replaceChildren();
    for (const node of document.querySelectorAll("#transitions, #charts .chart, #chart-legend")) {
      node.replaceChildren();
    }
    $("#call-detail").replaceChildren();
    $("#call-detail").hidden = true;
    $("#run-events").textContent = "";
    $("#server-info").textContent = "";
    $("#app").hidden = true;
    $("#tabs").hidden = true;
    $("#logout").hidden = true;
    $("#login").hidden = false;
    $("#login-error").textContent = message || "";
  }

  // -- polling --------------------------------------------------------------------------------------------------

  async function refresh() {
    clearTimeout(timer);
    if (!key) return;
    try {
      const summary = await api("/v1/scillm/ui/summary");
      showSummary(summary);
      if (tab === "calls") await loadCalls();
      else if (tab === "batches") renderBatches((await api("/v1/scillm/ui/batches")).data);
      else if (tab === "runs") renderRuns((await api("/v1/scillm/ui/runs")).data);
      else if (tab === "charts") await loadChart();
    } catch (error) {
      if (error instanceof AuthError) { logout("The key is no longer accepted."); return; }
      $("#server-info").textContent = "server unreachable: " + error.message;
    }
    if (key && !document.hidden) timer = setTimeout(refresh, refreshMs);
  }

  function showSummary(summary) {
    const tracing = summary.tracing && summary.tracing.enabled ? " · tracing on" : "";
    $("#server-info").textContent = "v" + summary.version + " · up " + Math.round(summary.uptime_s) + " s · " +
      summary.live_calls + " live calls · " + summary.batches_running + " batches and " + summary.runs_running +
      " runs running" + tracing;
    renderProviders(summary.providers);
    $("#transitions").replaceChildren(...summary.transitions.map((t) => el("li", {},
      time(t.at) + " ", el("strong", {}, t.deployment), " " + t.old + " → ", badge(t.new),
      t.error ? " " + t.error : "")));
  }

  function showTab(name) {
    tab = name;
    for (const button of document.querySelectorAll("#tabs button")) {
      button.classList.toggle("active", button.dataset.tab === name);
    }
    for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== "tab-" + name;
    refresh();
  }

  // -- providers ------------------------------------------------------------------------------------------------

  function renderProviders(rows) {
    $("#providers tbody").replaceChildren(...rows.map((p) => {
      const deployments = Object.entries(p.deployments).map(([name, d]) => el("div", {},
        name + ": ", badge(d.state), d.state === "open" ? " (" + d.cooldown_remaining_s.toFixed(0) + " s left)" : "",
        d.consecutive_failures ? " " + d.consecutive_failures + " failures in a row" : ""));
      const c = p.concurrency;
      return el("tr", {"data-provider": p.name},
        el("td", {}, el("strong", {}, p.name), p.missing ? el("div", {class: "muted"}, p.missing) : null),
        el("td", {class: "status"}, badge(p.status)),
        el("td", {class: "circuit"}, badge(p.circuit)),
        el("td", {class: "deployments"}, ...(deployments.length ? deployments : ["–"])),
        el("td", {class: "in-flight"}, c.in_flight + " / " + dash(c.limit)),
        el("td", {class: "queue"}, c.waiting + " waiting (max " + dash(c.max_queue) + ")" +
                                   (c.rejected ? ", " + c.rejected + " refused" : "")),
        el("td", {class: "aimd"}, dash(c.effective_limit) + " of " + dash(c.limit) +
                                  (c.aimd_decreases ? " (" + c.aimd_decreases + " cuts)" : "")),
        el("td", {class: "recent"}, p.recent_calls + " calls, " + p.recent_errors + " failed"));
    }));
  }

  // -- calls ----------------------------------------------------------------------------------------------------

  async function loadCalls() {
    const params = new URLSearchParams({limit: "200"});
    for (const name of ["model", "caller", "key", "status"]) {
      const value = $("#filter-" + name).value.trim();
      if (value) params.set(name, value);
    }
    const answer = await api("/v1/scillm/ui/calls?" + params);
    $("#calls-count").textContent = answer.count + " shown of " + answer.kept + " kept";
    $("#calls tbody").replaceChildren(...answer.data.map((c) => el("tr", {
      "data-call": c.id, class: c.id === selectedCall ? "selected" : "",
      onclick: () => { selectedCall = c.id; loadCall(); }},
      el("td", {}, time(c.started)),
      el("td", {class: "call-status"}, badge(c.status === "error" ? String(c.http_status) : c.status,
                                            c.status)),
      el("td", {}, c.model),
      el("td", {}, c.provider ? c.provider + " / " + dash(c.served_model) : "–"),
      el("td", {}, dash(c.caller)), el("td", {}, dash(c.key)), el("td", {}, dash(c.duration_ms)),
      el("td", {}, c.tokens_in === null ? "–" : c.tokens_in + " → " + c.tokens_out),
      el("td", {}, c.attempt_count), el("td", {}, dash(c.cache)))));
    if (selectedCall) await loadCall();
  }

  async function loadCall() {
    let record;
    try {
      record = await api("/v1/scillm/ui/calls/" + encodeURIComponent(selectedCall));
    } catch (error) {
      if (error instanceof AuthError) throw error;
      selectedCall = null;
      $("#call-detail").hidden = true;
      return;
    }
    for (const row of document.querySelectorAll("#calls tbody tr")) {
      row.classList.toggle("selected", row.dataset.call === selectedCall);
    }
    const fields = [["request id", record.request_id], ["status", record.status + (record.http_status ?
      " (" + record.http_status + ")" : "")], ["error", record.error_code ? record.error_code + ": " + record.error
      : null], ["model", record.model], ["served by", record.provider ? record.provider + " / " +
      record.served_model : null], ["caller", record.caller], ["key", record.key], ["part of", record.parent],
      ["stream", record.stream ? "yes" : "no"], ["duration ms", record.duration_ms],
      ["first chunk ms", record.first_chunk_ms], ["tokens in / out", record.tokens_in === null ? null :
      record.tokens_in + " / " + record.tokens_out], ["cost USD", record.cost_usd], ["cache", record.cache],
      ["scillm_metadata", record.metadata]];
    const detail = $("#call-detail");
    detail.replaceChildren(...[
      el("h3", {}, "Call " + record.id),
      el("dl", {}, ...fields.filter(([, v]) => v !== null && v !== undefined)
        .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
      el("h4", {}, "Attempts"),
      el("table", {class: "attempts"}, el("thead", {}, el("tr", {}, ...["#", "provider", "model", "outcome", "ms"]
        .map((h) => el("th", {}, h)))), el("tbody", {}, ...record.attempts.map((a) => el("tr", {},
        el("td", {}, a.n), el("td", {}, a.provider), el("td", {}, a.model),
        el("td", {title: a.error || ""}, badge(a.outcome, a.outcome === "ok" ? "ok" : "error")),
        el("td", {}, a.duration_ms))))),
      record.marks.length ? el("h4", {}, "What happened") : null,
      record.marks.length ? el("ul", {class: "marks"}, ...record.marks.map((m) => el("li", {},
        m.kind + " " + Object.entries(m).filter(([k]) => k !== "kind" && k !== "at")
          .map(([k, v]) => k + "=" + v).join(" ")))) : null,
      el("h4", {}, "Prompt (last user message)"),
      el("pre", {class: "prompt"}, dash(record.prompt)),
      el("h4", {}, "Answer"),
      el("pre", {class: "answer"}, dash(record.answer))].filter((node) => node !== null));
    detail.hidden = false;
  }

  // -- batches and runs -----------------------------------------------------------------------------------------

  function renderBatches(rows) {
    $("#batches tbody").replaceChildren(...rows.map((b) => {
      const total = b.total || 0;
      const done = (b.completed || 0) + (b.failed || 0);
      const state = b.status === "running" ? "running" : (b.status === "ok" ? "done" : b.status);
      return el("tr", {"data-batch": b.attrs.batch_id || b.unit},
        el("td", {}, b.attrs.batch_id || b.unit), el("td", {}, dash(b.attrs.pool)), el("td", {}, dash(b.attrs.caller)),
        el("td", {class: "progress"}, el("progress", {max: Math.max(total, 1), value: done}),
           el("span", {class: "progress-text"}, " " + done + " / " + total)),
        el("td", {class: "failed"}, b.failed || 0),
        el("td", {class: "batch-status", title: b.error || ""}, badge(state, state === "done" ? "ok" : state)),
        el("td", {}, time(b.started)), el("td", {}, seconds(b)));
    }));
  }

  function renderRuns(rows) {
    $("#runs tbody").replaceChildren(...rows.map((r) => el("tr", {"data-run": r.unit, onclick: () => follow(r)},
      el("td", {}, r.name, el("div", {class: "muted"}, r.attrs.run_id || r.attrs.graph_id || r.unit)),
      el("td", {}, r.kind),
      el("td", {class: "run-status", title: r.error || ""}, badge(r.status, r.status === "completed" ? "ok" :
                                                                 r.status)),
      el("td", {}, dash(r.attrs.caller)),
      el("td", {}, dash(r.attrs.profile) + (r.attrs.model ? " / " + r.attrs.model : "")),
      el("td", {}, dash(r.parent)), el("td", {}, time(r.started)), el("td", {}, seconds(r)))));
  }

  async function follow(run) {
    const url = run.attrs.events_url;
    if (runStream) runStream.abort();
    const out = $("#run-events");
    $("#run-events-of").textContent = run.name + " " + (run.attrs.run_id || run.unit);
    if (typeof url !== "string" || !url.startsWith("/v1/")) {
      out.textContent = "This run has no event stream.";
      return;
    }
    out.textContent = "";
    runStream = new AbortController();
    try {
      const response = await fetch(url, {headers: {"Authorization": "Bearer " + key}, credentials: "omit",
                                         signal: runStream.signal});
      if (!response.ok) { out.textContent = "HTTP " + response.status; return; }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
          if (!data) continue;
          let line = data;
          try {
            const event = JSON.parse(data);
            line = "#" + dash(event.seq) + " " + dash(event.type) + " " + JSON.stringify(event).slice(0, 400);
          } catch (e) { /* show the raw frame */ }
          out.append(document.createTextNode(line + "\n"));
          while (out.childNodes.length > 500) out.firstChild.remove();
          out.scrollTop = out.scrollHeight;
        }
      }
    } catch (error) {
      if (error.name !== "AbortError") out.append(document.createTextNode("stream ended: " + error.message + "\n"));
    }
  }

  // -- charts ---------------------------------------------------------------------------------------------------

  function fillDimensions(dimensions) {
    $("#chart-by").replaceChildren(...dimensions.map((d) => el("option", {value: d}, d)));
  }

  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  async function loadChart() {
    const by = $("#chart-by").value || "model";
    const answer = await api("/v1/scillm/ui/series?by=" + encodeURIComponent(by));
    const names = Object.keys(answer.series);
    for (const box of document.querySelectorAll("#charts .chart")) {
      box.replaceChildren(names.length ? drawChart(answer, names, box.dataset.metric)
                                       : el("p", {class: "muted"}, "No calls yet."));
    }
    $("#chart-legend").replaceChildren(...names.map((name, i) => {
      const requests = answer.series[name].requests.reduce((a, v) => a + v, 0);
      const tokens = answer.series[name].tokens.reduce((a, v) => a + v, 0);
      const cost = answer.series[name].cost_usd.reduce((a, v) => a + v, 0);
      return el("li", {"data-series": name}, el("span", {class: "swatch", title: COLORS[i % COLORS.length]}),
                name + " · " + requests + " requests · " + formatNumber(tokens) + " tokens · $" +
                formatNumber(cost));
    }));
    document.querySelectorAll("#chart-legend .swatch").forEach((s, i) => {
      s.style.background = COLORS[i % COLORS.length];
    });
  }

  function drawChart(answer, names, metric) {
    const width = 440, height = 180, left = 48, bottom = 20, top = 10;
    const values = names.flatMap((n) => answer.series[n][metric].filter((v) => v !== null));
    const max = Math.max(1e-9, ...values);
    const x = (i) => left + (i / Math.max(1, answer.minutes.length - 1)) * (width - left - 8);
    const y = (v) => top + (1 - v / max) * (height - top - bottom);
    const chart = svg("svg", {viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": metric});
    chart.append(svg("line", {x1: left, y1: y(0), x2: width - 8, y2: y(0), class: "axis"}),
                 svg("text", {x: 2, y: top + 10, class: "tick"}, formatNumber(values.length ? max : 0)),
                 svg("text", {x: 2, y: y(0), class: "tick"}, "0"),
                 svg("text", {x: left, y: height - 4, class: "tick"}, time(answer.minutes[0])),
                 svg("text", {x: width - 72, y: height - 4, class: "tick"}, time(answer.minutes.at(-1))));
    names.forEach((name, i) => {
      const points = answer.series[name][metric].map((v, j) => (v === null ? null : x(j) + "," + y(v)))
        .filter((p) => p !== null).join(" ");
      if (points) {
        chart.append(svg("polyline", {points, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 2,
                                      "data-series": name}));
      }
    });
    return chart;
  }

  function formatNumber(value) {
    if (value >= 100) return Math.round(value).toLocaleString();
    return Number(value.toPrecision(3)).toString();
  }

  // -- wiring ---------------------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("#login-form").addEventListener("submit", login);
    $("#logout").addEventListener("click", () => logout(""));
    for (const button of document.querySelectorAll("#tabs button")) {
      button.addEventListener("click", () => showTab(button.dataset.tab));
    }
    $("#call-filters").addEventListener("input", () => refresh());
    $("#call-filters").addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
    $("#chart-controls").addEventListener("change", () => refresh());
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  });
})();
