// llmap's live page. Plain JavaScript, no framework, no download: served by `llmap ui` itself.
// Row data is only ever put into the page as text (textContent, text nodes): never as HTML.
"use strict";
(() => {
  const boot = JSON.parse(document.getElementById("boot").textContent);
  const meta = boot.meta;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const STATUSES = meta.statuses;
  const SVG = "http://www.w3.org/2000/svg";

  // -- small helpers ------------------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "title") e.title = v;
      else if (k === "style") e.style.cssText = v;  // CSSOM: the CSP forbids style attributes, not this
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === undefined || c === null) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }
  const clear = (node) => { while (node.firstChild) node.removeChild(node.firstChild); return node; };
  const num = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US");
  const usd = (n) => (n === null || n === undefined) ? "–" : "$" + Number(n).toFixed(n < 1 ? 4 : 2);
  const sec = (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  };
  const show = (v) => (v === null || v === undefined) ? "" : (typeof v === "object" ? JSON.stringify(v) : String(v));
  const kv = (table, pairs) => {
    clear(table);
    for (const [k, v, title] of pairs) table.append(el("tr", {title}, el("th", {}, k), el("td", {}, v)));
  };
  function say(text, bad) {
    const m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
    m.classList.toggle("bad", !!bad);
  }
  async function getJSON(url) {
    const r = await fetch(url, {headers: {"Accept": "application/json"}});
    const body = await r.json().catch(() => ({error: r.statusText}));
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
  async function post(url, body) {
    const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                                body: JSON.stringify(body || {})});
    const text = await r.text();
    let data;
    try { data = JSON.parse(text); } catch (e) { data = {error: text}; }
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }
  function confirmDo(title, text, extra) {
    const d = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-extra").textContent = extra || "";
    return new Promise((resolve) => {
      d.addEventListener("close", () => resolve(d.returnValue === "ok"), {once: true});
      d.showModal();
    });
  }

  // -- views ----------------------------------------------------------------------------------------------------
  function setView() {
    const view = (location.hash || "#live").slice(1);
    for (const v of ["live", "review", "eval"]) $("view-" + v).hidden = v !== view;
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.view === view);
    if (view === "eval") loadEval();
    if (view === "review") setupReview();
  }
  window.addEventListener("hashchange", setView);

  // -- live figures ---------------------------------------------------------------------------------------------
  let summary = null;
  let lastRowsFetch = 0;
  function onSummary(s) {
    if (!s || !s.counts) return;
    summary = s;
    for (const st of STATUSES) $("count-" + st).textContent = num(s.counts[st]);
    $("count-total").textContent = num(s.total);
    const bar = clear($("bar"));
    for (const st of STATUSES) {
      const n = s.counts[st] || 0;
      if (n && s.total) bar.append(el("span", {class: "st-bg-" + st, style: `width:${(100 * n / s.total).toFixed(3)}%`,
                                              title: `${st}: ${num(n)}`}));
    }
    $("fig-rate").textContent = s.rate_rows_s ? s.rate_rows_s.toFixed(1) + " rows/s" : "–";
    $("fig-eta").textContent = s.eta_s ? sec(s.eta_s) : (s.counts.pending ? "–" : "done");
    const c = s.cost || {};
    $("fig-cost").textContent = usd(c.usd) + (c.cap_usd ? " of " + usd(c.cap_usd) + " cap" : "");
    $("fig-tokens").textContent = num(c.tokens) + (c.cap_tokens ? " of " + num(c.cap_tokens) + " cap" : "");
    const rq = s.requests || {};
    const ip = s.in_process || {};
    const retries = ip.retries !== undefined ? ip.retries : (s.run && s.run.retries);
    kv($("requests"), [
      ["requests", num(rq.requests) + (rq.complete === false ? " (reading the log…)" : "")], ["429 (rate limited)", num(rq.rate_limited)],
      ["other errors", num((rq.errors || 0) - (rq.rate_limited || 0)), "answers that were not 200: each was retried, failed over, or failed its row"],
      ["retries", retries === null || retries === undefined ? "–" : num(retries), "known in the run's process, and once a run has ended"],
      ["hedged copies", num(rq.hedged)], ["through a batch API", num(rq.batch_requests)],
    ]);
    const lat = rq.latency || {};
    kv($("latency"), [["answers", num(lat.n)], ["p50", sec(lat.p50)], ["p90", sec(lat.p90)], ["p99", sec(lat.p99)],
                      ["max", sec(lat.max)]]);
    const src = s.by_source || {};
    const tiers = (s.tiers || []).map((t) => [`${t.model} · ${t.outcome}`, num(t.n)]);
    kv($("cache"), [
      ["from the cache", num(src.cache || 0)], ["from the model", num(src.model || 0)],
      ["stale (cache, models down)", num(src.stale || 0)],
      ["packed requests", num(rq.packs) + (meta.pack !== 1 ? ` (pack = ${meta.pack})` : "")],
      ["rows answered in packs", num(rq.packed_rows)],
      ...Object.entries(s.by_model || {}).map(([m, n]) => ["rows settled by " + m, num(n)]),
      ...tiers,
    ]);
    const errs = Object.entries(s.failed_by_error || {});
    const et = clear($("errors"));
    if (!errs.length) et.append(el("tr", {}, el("td", {class: "muted"}, "no failed rows")));
    for (const [cls, n] of errs) {
      et.append(el("tr", {}, el("th", {}, el("a", {href: "#live", onclick: (e) => { e.preventDefault(); filterBy({status: "failed", error: cls}); }}, cls)), el("td", {}, num(n))));
    }
    fillSelect($("f-model"), Object.keys(s.by_model || {}));
    fillSelect($("f-error"), Object.keys(s.failed_by_error || {}));
    timeline(rq.timeline || {});
    groups(s);
    batches(s.batches || []);
    inproc(s.in_process);
    runState(s);
    if ($("f-follow").checked && state.offset === 0 && Date.now() - lastRowsFetch > 1500 && !fetching) fetchRows(true);
  }

  function fillSelect(select, values, labels) {
    const have = new Set([...select.options].map((o) => o.value));
    values.forEach((v, i) => {
      if (!have.has(v)) select.append(el("option", {value: v}, labels ? labels[i] : v));
    });
  }

  function runState(s) {
    const pill = $("run-state");
    const r = s.run;
    let text = "no run yet";
    pill.className = "pill";
    if (r && r.running) { text = "running" + (r.holder ? " · " + r.holder : ""); pill.classList.add("running"); }
    else if (r && r.ended_at) text = "run " + r.id + ": " + (r.exit_reason || "ended");
    else if (r) text = "run " + r.id + ": not running (stopped without ending)";
    pill.textContent = text;
    const stop = $("act-stop");
    stop.disabled = !(r && r.running);
    stop.title = stop.disabled ? "no run of this job is going" : "stop the run like Ctrl-C (SIGTERM): finished rows are kept";
    const ix = s.index || {};
    $("index-state").textContent = ix.ready && !ix.behind ? "" : `indexing the rows for filters and search: ${num(ix.indexed)} so far`;
    if (s.message) say(s.message, true);
  }

  function timeline(t) {
    const box = clear($("timeline"));
    const legend = clear($("timeline-legend"));
    const ok = t.ok || [];
    if (!ok.length) { box.append(el("span", {class: "muted"}, "no request yet")); return; }
    const series = [["200", ok], ...Object.entries(t.errors || {})];
    const totals = ok.map((_, i) => series.reduce((a, [, v]) => a + (v[i] || 0), 0));
    const max = Math.max(1, ...totals);
    const w = 10, h = 100;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${ok.length * w} ${h}`);
    svg.setAttribute("preserveAspectRatio", "none");
    series.forEach(([name, values], k) => {
      values.forEach((v, i) => {
        if (!v) return;
        const below = series.slice(0, k).reduce((a, [, vv]) => a + (vv[i] || 0), 0);
        const r = document.createElementNS(SVG, "rect");
        r.setAttribute("x", i * w); r.setAttribute("width", w - 1);
        r.setAttribute("y", h - (below + v) * h / max); r.setAttribute("height", v * h / max);
        r.setAttribute("class", "s" + Math.min(k, 6));
        const tip = document.createElementNS(SVG, "title");
        tip.textContent = `${name}: ${v} in ${t.bucket_s} s`;
        r.append(tip);
        svg.append(r);
      });
      legend.append(el("span", {class: "key s" + Math.min(k, 6)}, name === "200" ? "answered (200)" : name));
    });
    box.append(svg);
    legend.append(el("span", {class: "muted"}, ` · ${t.bucket_s} s per bar, busiest ${num(max)}`));
  }

  function groups(s) {
    if (!meta.group) return;
    $("card-groups").hidden = false;
    $("group-name").textContent = meta.group + (s.groups_total > s.groups.length ? ` (top ${s.groups.length} of ${s.groups_total})` : "");
    const t = clear($("groups"));
    t.append(el("tr", {}, el("th", {}, meta.group), ...STATUSES.map((st) => el("th", {}, st))));
    for (const g of s.groups || []) {
      t.append(el("tr", {}, el("td", {}, el("a", {href: "#live", onclick: (e) => { e.preventDefault(); filterBy({group: g.json}); }}, show(g.value))),
                  ...STATUSES.map((st) => el("td", {class: g.counts[st] ? "st-" + st : "muted"}, num(g.counts[st])))));
    }
    fillSelect($("f-group"), (s.groups || []).map((g) => g.json), (s.groups || []).map((g) => show(g.value)));
  }

  function batches(list) {
    $("card-batches").hidden = !list.length;
    const t = clear($("batches"));
    t.append(el("tr", {}, el("th", {}, "state"), el("th", {}, "provider status"), el("th", {}, "batches"), el("th", {}, "requests")));
    for (const b of list) t.append(el("tr", {}, el("td", {}, b.state), el("td", {}, b.status || ""), el("td", {}, num(b.batches)), el("td", {}, num(b.requests))));
  }

  function inproc(ip) {
    $("card-inproc").hidden = !ip;
    if (!ip) return;
    const t = clear($("inproc"));
    t.append(el("tr", {}, el("th", {}, "model"), el("th", {}, "in flight"), el("th", {}, "limit"), el("th", {}, "breaker")));
    for (const m of ip.models || []) t.append(el("tr", {}, el("td", {}, m.model), el("td", {}, num(m.in_flight)), el("td", {}, num(m.limit)), el("td", {class: "breaker-" + m.breaker}, m.breaker)));
  }

  function connect() {
    let es;
    try { es = new EventSource("api/events"); } catch (e) { return poll(); }
    es.onmessage = (e) => onSummary(JSON.parse(e.data));
    es.onerror = () => { es.close(); setTimeout(poll, 1000); };
  }
  async function poll() {
    try { onSummary(await getJSON("api/summary")); setTimeout(connect, 1000); }
    catch (e) { say("the page's server does not answer (is `llmap ui` still running?)", true); setTimeout(poll, 2000); }
  }

  // -- rows -----------------------------------------------------------------------------------------------------
  const state = {sort: "seq", desc: false, offset: 0, limit: 50, params: {}};
  let fetching = false;
  function fieldInputs() {
    const box = $("f-fields");
    for (const f of meta.fields) {
      let input;
      if (f.enum || f.type === "boolean") {
        input = el("select", {id: "f-field-" + f.name, "data-field": f.name}, el("option", {value: ""}, "any"));
        for (const v of (f.enum || [true, false])) input.append(el("option", {value: show(v)}, show(v)));
      } else {
        input = el("input", {id: "f-field-" + f.name, "data-field": f.name, type: "text", size: 8, placeholder: f.type});
      }
      box.append(el("label", {}, f.name + " ", input));
    }
    if (meta.features.confidence) $("f-conf-label").hidden = false;
    if (meta.group) $("f-group-label").hidden = false;
  }
  function readFilters() {
    const p = {};
    for (const id of ["f-status", "f-model", "f-error", "f-group", "f-q", "f-conf"]) {
      const e = $(id);
      if (e && e.value !== "" && !(e.closest("label") || {}).hidden) p[e.name] = e.value;
    }
    // the filter form's field inputs only: the row's detail has [data-field] elements of its own (its label form)
    for (const e of $("filters").querySelectorAll("input[data-field], select[data-field]")) {
      if (e.value !== "") p["f." + e.dataset.field] = e.value;
    }
    return p;
  }
  function filterBy(p) {
    clearFilters();
    for (const [k, v] of Object.entries(p)) {
      const e = {status: $("f-status"), error: $("f-error"), group: $("f-group"), model: $("f-model")}[k];
      if (e) { if (![...e.options].some((o) => o.value === v)) e.append(el("option", {value: v}, v)); e.value = v; }
    }
    applyFilters();
    $("rows-table").scrollIntoView({behavior: "smooth"});
  }
  function clearFilters() {
    for (const e of $("filters").querySelectorAll("select, input[type=text], input[type=search], input[type=number]")) e.value = "";
  }
  function applyFilters() { state.params = readFilters(); state.offset = 0; fetchRows(); }
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); applyFilters(); });
  $("f-clear").addEventListener("click", () => { clearFilters(); applyFilters(); });
  for (const id of ["f-status", "f-model", "f-error", "f-group"]) $(id).addEventListener("change", applyFilters);
  $("pg-prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); fetchRows(); });
  $("pg-next").addEventListener("click", () => { state.offset += state.limit; fetchRows(); });
  for (const th of document.querySelectorAll("#rows-table th[data-sort]")) {
    th.addEventListener("click", () => {
      const s = th.dataset.sort;
      state.desc = state.sort === s ? !state.desc : false;
      state.sort = s; state.offset = 0; fetchRows();
    });
  }
  function query(extra) {
    const p = new URLSearchParams({...state.params, sort: state.sort, desc: state.desc ? "1" : "0",
                                   offset: state.offset, limit: state.limit, ...(extra || {})});
    return p.toString();
  }
  async function fetchRows(quiet) {
    fetching = true;
    lastRowsFetch = Date.now();
    try {
      const data = await getJSON("api/rows?" + query());
      renderRows(data);
      if (!quiet) say("");
    } catch (e) {
      say("rows: " + e.message, true);
    } finally { fetching = false; }
  }
  function renderRows(data) {
    const body = clear($("rows-table").tBodies[0]);
    for (const r of data.rows) {
      const cells = [el("td", {}, r.key), el("td", {class: "st-" + r.status}, r.status)];
      for (const c of meta.cols) cells.push(el("td", {}, show(r.data[c])));
      for (const f of meta.fields) cells.push(el("td", {}, r.output ? show(r.output[f.name]) : ""));
      cells.push(el("td", {}, r.model || ""), el("td", {class: "err"}, r.error || ""));
      const tr = el("tr", {"data-key": r.key}, ...cells);
      tr.addEventListener("click", () => openDetail(r.key));
      body.append(tr);
    }
    const from = data.rows.length ? data.offset + 1 : 0;
    $("pg-info").textContent = `rows ${num(from)}–${num(data.offset + data.rows.length)} of ${num(data.total)}${data.capped ? "+" : ""}`;
    $("pg-note").textContent = [data.sorted ? "" : "more than 20,000 rows match the search: in ledger order, unsorted",
                                data.indexed ? "" : "from the ledger while the index builds",
                                `${data.ms} ms`].filter(Boolean).join(" · ");
    $("pg-prev").disabled = data.offset === 0;
    $("pg-next").disabled = data.offset + data.rows.length >= data.total && !data.capped;
    for (const th of document.querySelectorAll("#rows-table th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === state.sort);
      th.classList.toggle("desc", th.dataset.sort === state.sort && state.desc);
    }
  }
  for (const tr of $("rows-table").tBodies[0].rows) tr.addEventListener("click", () => openDetail(tr.dataset.key));

  // -- one row --------------------------------------------------------------------------------------------------
  function section(title, ...content) { return el("section", {}, el("h3", {}, title), ...content); }
  function pre(text) { return el("pre", {}, text); }
  function typed(field, text) {
    if (text === "null") return null;
    if (field.type === "integer") { const v = Number(text); if (!Number.isInteger(v)) throw new Error(`${text} is not a whole number`); return v; }
    if (field.type === "number") { const v = Number(text); if (text.trim() === "" || Number.isNaN(v)) throw new Error(`${text} is not a number`); return v; }
    if (field.type === "boolean") { if (!["true", "false"].includes(text)) throw new Error("true or false"); return text === "true"; }
    return text;
  }
  async function label(key, field, value) {
    await post("api/label", {key, field: field.name, value});
    say(`labelled ${key}: ${field.name} = ${show(value)}`);
  }
  function labelControls(row, onDone) {
    const box = el("div", {class: "labels"});
    if (!meta.features.labels) { box.append(el("p", {class: "muted"}, meta.labels.why)); return box; }
    for (const f of meta.fields) {
      const answer = row.output ? row.output[f.name] : undefined;
      const have = row.labels && row.labels[f.name];
      const input = el("input", {type: "text", size: 14, placeholder: "the right value", class: "correct"});
      const save = async (value) => { try { await label(row.key, f, value); onDone && onDone(); } catch (e) { say(e.message, true); } };
      box.append(el("div", {class: "label-field", "data-field": f.name},
        el("b", {}, f.name), " answer: ", el("code", {}, show(answer)),
        have ? el("span", {class: "labelled"}, ` label: ${show(have.value)} (${have.source})`) : el("span", {class: "muted"}, " no label"),
        " ",
        el("button", {type: "button", class: "right", disabled: answer === undefined, onclick: () => save(answer)}, "✓ right"),
        el("button", {type: "button", class: "wrong", onclick: () => { input.focus(); }}, "✗ wrong"),
        input,
        el("button", {type: "button", onclick: () => { try { save(typed(f, input.value)); } catch (e) { say(e.message, true); } }}, "save")));
    }
    return box;
  }
  async function openDetail(key) {
    let row;
    try { row = await getJSON("api/row?key=" + encodeURIComponent(key)); } catch (e) { say(e.message, true); return; }
    const body = clear($("detail-body"));
    body.append(el("h2", {}, row.key), el("p", {}, el("span", {class: "pill st-" + row.status}, row.status),
      row.model ? " by " + row.model : "", row.source_text ? " · " + row.source_text : ""));
    if (row.error) body.append(section("Error", pre(row.error)));
    if (row.output) body.append(section("Answer", pre(JSON.stringify(row.output, null, 2))));
    if (row.confidence !== undefined && row.confidence !== null) body.append(section("Confidence", pre(String(row.confidence))));
    if (row.raw) body.append(section("Last raw answer", pre(row.raw)));
    body.append(section("Label", labelControls(row, () => openDetail(key))));
    const data = el("table", {class: "kv"});
    kv(data, Object.entries(row.data).map(([k, v]) => [k, show(v)]));
    body.append(section("Input", data));
    if (row.messages) {
      body.append(section("Prompt", ...row.messages.map((m) => el("div", {class: "msg"}, el("span", {class: "role"}, m.role), pre(m.content)))));
    } else if (row.render_error) body.append(section("Prompt", pre(row.render_error)));
    const at = el("table", {class: "grid", id: "detail-answers"});
    at.append(el("thead", {}, el("tr", {}, ...["run", "model", "outcome", "answer", "tokens in", "out", "cost"].map((h) => el("th", {}, h)))));
    const tb = el("tbody");
    for (const a of row.answers) {
      tb.append(el("tr", {}, el("td", {}, a.run), el("td", {}, a.model || ""), el("td", {}, a.outcome),
        el("td", {}, a.output ? JSON.stringify(a.output) : ""), el("td", {}, num(a.prompt_tokens)),
        el("td", {}, num(a.completion_tokens)), el("td", {}, usd(a.cost_usd))));
    }
    at.append(tb);
    body.append(section(`Attempts (${row.answers.length})`, at,
      el("p", {class: "muted"}, `requests for this row: ${row.attempts}; waiting for answers: ${sec(row.latency_s)}; tokens ${num(row.prompt_tokens)} in, ${num(row.completion_tokens)} out; cost ${usd(row.cost_usd)}`),
      row.pack_text ? el("p", {class: "muted"}, row.pack_text) : null));
    $("detail").hidden = false;
  }
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; });

  // -- review ---------------------------------------------------------------------------------------------------
  const review = {keys: [], i: 0, field: null, row: null, labelled: new Set(), wrong: false};
  let reviewReady = false;
  function setupReview() {
    if (reviewReady) return;
    reviewReady = true;
    if (!meta.features.labels) { $("review-why").hidden = false; $("review-why").textContent = meta.labels.why; }
    for (const f of meta.fields) { $("rv-field").append(el("option", {value: f.name}, f.name)); $("rv-stratify").append(el("option", {value: f.name}, f.name)); }
    const first = meta.fields.find((f) => f.enum || f.type === "boolean") || meta.fields[0];
    $("rv-field").value = first.name;
    $("rv-stratify").value = first.enum || first.type === "boolean" ? first.name : "";
  }
  $("review-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const p = new URLSearchParams({n: $("rv-n").value, seed: $("rv-seed").value, field: $("rv-field").value, stratify: $("rv-stratify").value});
    try {
      const s = await getJSON("api/review?" + p);
      review.keys = s.keys; review.field = meta.fields.find((f) => f.name === s.field);
      review.labelled = new Set(s.labelled);
      review.i = Math.max(0, s.keys.findIndex((k) => !review.labelled.has(k)));
      if (review.i < 0) review.i = 0;
      await showReview();
    } catch (err) { say(err.message, true); }
  });
  function choices(f) { return f.enum ? f.enum : (f.type === "boolean" ? [true, false] : []); }
  async function showReview() {
    const card = $("review-card");
    card.hidden = false;
    if (!review.keys.length) { clear(card).append(el("p", {}, "no settled row to review yet")); return; }
    const key = review.keys[review.i];
    const row = await getJSON("api/row?key=" + encodeURIComponent(key));  // fetched first: the card never blinks
    review.row = row;
    clear(card);
    $("review-progress").textContent = `row ${review.i + 1} of ${review.keys.length} · ${review.labelled.size} labelled`;
    review.wrong = false;
    const f = review.field;
    const data = el("table", {class: "kv"});
    kv(data, Object.entries(row.data).map(([k, v]) => [k, show(v)]));
    const have = row.labels && row.labels[f.name];
    const others = Object.entries(row.output || {}).filter(([k]) => k !== f.name).map(([k, v]) => `${k}: ${show(v)}`);
    card.append(el("h3", {}, row.key, " ", el("span", {class: "pill st-" + row.status}, row.status)), data,
      el("p", {class: "answer"}, f.name + ": ", el("b", {id: "review-answer"}, row.output ? show(row.output[f.name]) : "(no answer)")),
      el("p", {class: "muted"}, others.join(" · ")),
      have ? el("p", {class: "labelled"}, `labelled ${show(have.value)} (${have.source})`) : el("p", {class: "muted"}, "not labelled yet"));
    if (row.error) card.append(pre(row.error));
    const opts = el("div", {id: "review-choices", class: "choices", hidden: true});
    choices(f).forEach((v, i) => opts.append(el("button", {type: "button", onclick: () => reviewLabel(v)}, `${i + 1} ${show(v)}`)));
    const input = el("input", {id: "review-input", type: "text", placeholder: "the right value, then Enter"});
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") { e.preventDefault(); try { reviewLabel(typed(f, input.value)); } catch (err) { say(err.message, true); } }
      if (e.key === "Escape") input.blur();
    });
    opts.append(input);
    card.append(el("div", {class: "buttons"},
      el("button", {type: "button", id: "review-yes", disabled: !meta.features.labels || !row.output, onclick: () => reviewLabel(row.output[f.name])}, "y · right"),
      el("button", {type: "button", id: "review-no", disabled: !meta.features.labels, onclick: wrong}, "n · wrong"),
      el("button", {type: "button", id: "review-skip", onclick: () => move(1)}, "s · skip"),
      el("button", {type: "button", onclick: () => move(-1)}, "← back")), opts);
  }
  function wrong() {
    review.wrong = true;
    $("review-choices").hidden = false;
    if (!choices(review.field).length) $("review-input").focus();
  }
  async function reviewLabel(value) {
    try {
      await label(review.row.key, review.field, value);
      review.labelled.add(review.row.key);
      await move(1);
    } catch (e) { say(e.message, true); }
  }
  async function move(d) {
    review.i = Math.min(Math.max(0, review.i + d), Math.max(0, review.keys.length - 1));
    await showReview();
  }
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { $("detail").hidden = true; return; }
    if ($("view-review").hidden || !review.row || e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
    const f = review.field;
    if (e.key === "y" && meta.features.labels && review.row.output) reviewLabel(review.row.output[f.name]);
    else if (e.key === "n" && meta.features.labels) wrong();
    else if (e.key === "s" || e.key === "ArrowRight") move(1);
    else if (e.key === "ArrowLeft") move(-1);
    else if (review.wrong && /^[1-9]$/.test(e.key) && choices(f)[Number(e.key) - 1] !== undefined) reviewLabel(choices(f)[Number(e.key) - 1]);
    else return;
    e.preventDefault();
  });

  // -- eval -----------------------------------------------------------------------------------------------------
  async function loadEval() {
    const box = clear($("eval"));
    let ev;
    try { ev = await getJSON("api/eval"); } catch (e) { box.append(el("p", {class: "bad"}, e.message)); return; }
    if (ev.why) { box.append(el("p", {class: "muted"}, ev.why)); return; }
    if (!ev.labels) { box.append(el("p", {class: "muted"}, "no labels yet: label rows in Review, or with `llmap label`")); return; }
    for (const [name, f] of Object.entries(ev.fields)) {
      if (!f.n) { box.append(el("section", {class: "eval-field", "data-field": name}, el("h3", {}, name), el("p", {class: "muted"}, "no label for this field yet"))); continue; }
      const acc = `${(100 * f.accuracy).toFixed(1)}% [${(100 * f.low).toFixed(1)}%, ${(100 * f.high).toFixed(1)}%]`;
      const s = el("section", {class: "eval-field", "data-field": name}, el("h3", {}, name),
        el("p", {}, "accuracy ", el("b", {class: "accuracy"}, acc), ` · ${f.correct} of ${f.n} labelled rows that are done · Wilson 95% interval`));
      if (f.confusion) {
        const t = el("table", {class: "grid confusion"});
        t.append(el("tr", {}, el("th", {}, "label ↓ · answer →"), ...f.classes.map((c) => el("th", {}, show(c)))));
        f.confusion.forEach((rowv, i) => t.append(el("tr", {}, el("th", {}, show(f.classes[i])), ...rowv.map((n, j) => el("td", {class: n ? (i === j ? "hit" : "miss") : "muted"}, n)))));
        s.append(t);
      }
      box.append(s);
    }
  }

  // -- steering -------------------------------------------------------------------------------------------------
  $("act-stop").addEventListener("click", async () => {
    if (!await confirmDo("Stop the run?", "llmap sends SIGTERM to the run's process, which stops like Ctrl-C: requests in flight are dropped, every finished row is kept in the ledger, and running the same command again continues where it stopped.", summary && summary.run ? summary.run.holder : "")) return;
    try { say((await post("api/stop")).message); } catch (e) { say(e.message, true); }
  });
  async function requeue(params, title) {
    let preview;
    try { preview = await getJSON("api/requeue?" + new URLSearchParams(params)); } catch (e) { say(e.message, true); return; }
    if (!preview.rows) { say("no done, failed or fallback row matches: nothing to re-queue"); return; }
    if (!await confirmDo(title, preview.text)) return;
    try { say((await post("api/requeue", params)).message); fetchRows(); } catch (e) { say(e.message, true); }
  }
  $("act-requeue-failed").addEventListener("click", () => requeue({what: "failed"}, "Re-queue the failed rows?"));
  $("act-requeue-filter").addEventListener("click", () => requeue(readFilters(), "Re-queue the rows the filter selects?"));
  const rb = $("act-rollback");
  rb.disabled = !meta.rollback.enabled;
  rb.title = meta.rollback.why || "put back every row a run changed, as it was before that run (0 requests)";
  rb.addEventListener("click", async () => {
    const run = summary && summary.run ? summary.run.id : null;
    if (!run || !await confirmDo(`Roll back run ${run}?`, `Every row run ${run} changed goes back to its state before it, with no request sent; the cost history stays as it was and the next export follows.`)) return;
    try { say((await post("api/rollback", {run})).message); fetchRows(); } catch (e) { say(e.message, true); }
  });

  // -- start ----------------------------------------------------------------------------------------------------
  fieldInputs();
  if (boot.summary) onSummary(boot.summary);
  renderRows({...boot.first.page, rows: boot.first.rows, ms: 0, indexed: true});
  setView();
  connect();
})();
