// Dataset properties pages: every piece of data comes from the JSON API (/api/v0/...).
// No framework, no build step. Data is only ever put into the page as text (never as HTML).
"use strict";

(() => {
  const body = document.body;
  const ROOT = body.dataset.root || "";
  const TOKEN_KEY = "sidecar.api-token";
  const RESERVED = "valohai.";

  // -- small helpers ----------------------------------------------------------------------------

  /** An element with attributes (`text` sets textContent, `on<event>` adds a listener) and children. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") el.textContent = value;
      else if (name === "class") el.className = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "value") el.value = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }
  const $ = (id) => document.getElementById(id);
  const isReserved = (key) => key.startsWith(RESERVED);
  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  /** A byte count for people: 1 KiB = 1024 bytes. */
  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit ? `${value.toFixed(1)} ${units[unit]}` : `${n} B`;
  }

  function typeOf(value) {
    if (Array.isArray(value)) return "array";
    if (value === null) return "null";
    return typeof value; // string, number, boolean, object
  }

  /** Text of a value for a table cell: strings as they are, everything else as JSON. */
  function show(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // -- property definitions: display names, descriptions, violations, allowed values --------------

  let definitionsLoaded = null;

  /** The property definitions by key ({} when they cannot be read: the page works without them). */
  function definitions() {
    if (!definitionsLoaded) {
      definitionsLoaded = api("/api/v0/property-definitions/")
        .then((r) => Object.fromEntries(r.data.results.map((d) => [d.key, d])))
        .catch(() => ({}));
    }
    return definitionsLoaded;
  }

  const RULES = { type: "wrong type", allowed_values: "not an allowed value", required: "required, missing" };

  /** Table rows of a property set: the key (with its definition's display name and description),
   * the value, its type, and what its definition says of it (a violation marked). Required keys
   * the set lacks get a row of their own. */
  function propertyRows(props, violations, defs, reserved = () => false) {
    const broken = {};
    for (const v of violations || []) (broken[v.key] = broken[v.key] || []).push(v);
    const keys = [...new Set([...Object.keys(props), ...Object.keys(broken)])].sort(byKey);
    return keys.map((key) => {
      const present = Object.prototype.hasOwnProperty.call(props, key);
      const value = props[key];
      const type = present ? typeOf(value) : "—";
      const structured = type === "object" || type === "array";
      const def = defs[key];
      const label = def && def.display_name ? [h("span", { text: def.display_name }), " ", h("code", { class: "muted", text: key })] : [key];
      const faults = broken[key] || [];
      const note = faults.length
        ? h("span", { class: "violation-note", text: `⚠ ${faults.map((v) => RULES[v.rule] || v.rule).join(", ")}` })
        : def
          ? h("span", { class: "muted", text: [def.type, def.enforcement === "reject" ? "enforced" : null].filter(Boolean).join(" · ") || "defined" })
          : h("span", { class: "muted", text: "—" });
      return h(
        "tr",
        { class: [reserved(key) ? "reserved" : "", faults.length ? "violation" : ""].join(" ").trim() || null, "data-key": key },
        h("td", { title: def && def.description ? def.description : reserved(key) ? "Managed by the platform" : null }, ...label),
        h("td", { class: structured ? "value-json" : null, text: present ? (structured ? JSON.stringify(value, null, 2) : show(value)) : "(missing)" }),
        h("td", { text: type }),
        h("td", {}, note),
      );
    });
  }

  /** JSON with object keys sorted, to compare two values whatever their key order. */
  function canonical(value) {
    if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
    if (value && typeof value === "object") {
      const keys = Object.keys(value).sort();
      return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
    }
    return JSON.stringify(value);
  }
  const same = (a, b) => canonical(a) === canonical(b);

  function when(iso) {
    if (!iso) return h("span", { class: "muted", text: "—" });
    const date = new Date(iso);
    return h("time", { datetime: iso, title: iso, text: date.toLocaleString() });
  }

  /** Up to `max` properties as `key: value` chips, with "+N more". */
  function chips(props, max = 4) {
    const keys = Object.keys(props || {}).sort(byKey);
    if (!keys.length) return h("span", { class: "muted", text: "—" });
    const shown = keys.slice(0, max).map((k) => {
      const text = show(props[k]);
      const short = text.length > 40 ? `${text.slice(0, 39)}…` : text;
      return h("span", { class: "chip", title: `${k}: ${text}` }, h("b", { text: k }), `: ${short}`);
    });
    if (keys.length > max) shown.push(h("span", { class: "chip muted", text: `+${keys.length - max} more` }));
    return h("span", { class: "chips" }, shown);
  }

  /** Platform keys (`valohai.`) after the others, each group alphabetical. */
  function byKey(a, b) {
    const ra = isReserved(a);
    if (ra !== isReserved(b)) return ra ? 1 : -1;
    return a < b ? -1 : a > b ? 1 : 0;
  }

  function badge(status) {
    return h("span", { class: `badge ${status}`, text: status });
  }

  function notice(el, message, tone) {
    el.hidden = !message;
    el.className = `notice${tone ? ` ${tone}` : ""}`;
    el.replaceChildren(...(Array.isArray(message) ? message : [message || ""]));
  }

  // -- the API, with the token asked for once on a 401 --------------------------------------------

  class ApiError extends Error {
    constructor(status, data) {
      super((data && data.detail) || `the server answered ${status}`);
      this.status = status;
      this.data = data || {};
    }
  }

  let tokenPrompt = null;

  /** Ask for the API token in a dialog; all callers waiting at once share one prompt. */
  function askToken(rejected) {
    if (tokenPrompt) return tokenPrompt;
    tokenPrompt = new Promise((resolve) => {
      const dialog = $("token-dialog");
      const form = $("token-form");
      const input = $("token-input");
      const cancel = $("token-cancel");
      $("token-error").textContent = rejected ? "That token was not accepted. Try again." : "";
      input.value = "";
      const finish = (token) => {
        form.removeEventListener("submit", onSubmit);
        dialog.removeEventListener("cancel", onCancel);
        cancel.removeEventListener("click", onCancel);
        if (dialog.open) dialog.close();
        tokenPrompt = null;
        resolve(token);
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const token = input.value.trim();
        if (!token) return;
        sessionStorage.setItem(TOKEN_KEY, token);
        finish(token);
      };
      const onCancel = (event) => {
        event.preventDefault();
        finish(null);
      };
      form.addEventListener("submit", onSubmit);
      dialog.addEventListener("cancel", onCancel);
      cancel.addEventListener("click", onCancel);
      dialog.showModal();
      input.focus();
    });
    return tokenPrompt;
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return {};
    }
  }

  /** fetch() a JSON API path; `{status, data}` on 2xx, ApiError otherwise (network errors as they are). */
  async function api(path, options = {}) {
    for (;;) {
      const token = sessionStorage.getItem(TOKEN_KEY);
      const headers = { Accept: "application/json", ...(options.headers || {}) };
      if (token) headers.Authorization = `Token ${token}`;
      const response = await fetch(ROOT + path, { ...options, headers });
      if (response.status === 401) {
        if (sessionStorage.getItem(TOKEN_KEY) !== token) continue; // another request got a new one
        if (token) sessionStorage.removeItem(TOKEN_KEY);
        if (await askToken(Boolean(token))) continue;
        throw new ApiError(401, await readJson(response));
      }
      const data = await readJson(response);
      if (!response.ok) throw new ApiError(response.status, data);
      return { status: response.status, data };
    }
  }

  function problem(error) {
    if (error instanceof ApiError) {
      return error.status === 401 ? "the API token is needed (reload the page to enter it)" : error.message;
    }
    return "could not reach the server";
  }

  // -- lists: datasets and versions ---------------------------------------------------------------

  function listPage() {
    const kind = body.dataset.kind;
    const versions = kind === "dataset-versions";
    const params = new URLSearchParams(location.search);
    const storeKey = `sidecar.columns.${kind}`;
    const filterInput = $("filter");
    const datasetInput = $("dataset");
    const limitSelect = $("limit");
    const limit = Math.min(1000, Math.max(1, parseInt(params.get("limit"), 10) || 25));
    const offset = Math.max(0, parseInt(params.get("offset"), 10) || 0);
    let columns = params.getAll("col");
    if (!params.has("col")) {
      try {
        columns = JSON.parse(localStorage.getItem(storeKey) || "[]").filter((c) => typeof c === "string");
      } catch {
        columns = [];
      }
    }
    let page = null;

    filterInput.value = params.get("filter") || "";
    if (datasetInput) datasetInput.value = params.get("dataset") || "";
    if (![...limitSelect.options].some((o) => o.value === String(limit))) limitSelect.add(new Option(limit));
    limitSelect.value = String(limit);

    const go = (changes) => {
      const next = new URLSearchParams(location.search);
      for (const [key, value] of Object.entries(changes)) {
        if (value === null || value === "") next.delete(key);
        else next.set(key, value);
      }
      location.search = next.toString();
    };

    $("search").addEventListener("submit", (event) => {
      event.preventDefault();
      go({
        filter: filterInput.value.trim(),
        dataset: datasetInput ? datasetInput.value.trim() : null,
        offset: null,
      });
    });
    limitSelect.addEventListener("change", () => go({ limit: limitSelect.value, offset: null }));

    function setColumns(next) {
      columns = next;
      localStorage.setItem(storeKey, JSON.stringify(columns));
      const url = new URL(location.href);
      url.searchParams.delete("col");
      for (const c of columns) url.searchParams.append("col", c);
      history.replaceState(null, "", url);
      render();
    }

    function sortHeader(key) {
      const ordering = params.get("ordering") || "";
      const quoted = `\`${key}\``;
      const state = ordering === quoted ? "ascending" : ordering === `-${quoted}` ? "descending" : null;
      const next = state === null ? quoted : state === "ascending" ? `-${quoted}` : null;
      const arrow = state === "ascending" ? " ▲" : state === "descending" ? " ▼" : "";
      const label = `Sort by ${key}${state === "ascending" ? ", descending" : state ? ", not sorted" : ""}`;
      const button = key.includes("`")
        ? key
        : h("button", { type: "button", class: "sort", "aria-label": label, onclick: () => go({ ordering: next, offset: null }) }, key + arrow);
      return h("th", { scope: "col", "aria-sort": state }, button);
    }

    function cell(props, key, faults) {
      const broken = faults[key] ? "violation" : "";
      const title = faults[key] ? faultText(faults[key]) : null;
      if (!props || !Object.hasOwn(props, key)) return h("td", { class: `muted ${broken}`.trim(), title, text: "—" });
      const value = props[key];
      return h("td", { class: [typeof value === "number" ? "num" : "", broken].join(" ").trim() || null, title, text: show(value) });
    }

    /** A row's violations by key, and the ⚠ beside its name that lists them. */
    function faultsOf(row) {
      const faults = {};
      for (const v of row.violations || []) (faults[v.key] = faults[v.key] || []).push(v);
      return faults;
    }
    const faultText = (list) => list.map((v) => `${v.key}: ${RULES[v.rule] || v.rule}`).join("; ");

    function chooser(results) {
      const keys = new Set(columns);
      for (const row of results) for (const key of Object.keys(row.properties || {})) keys.add(key);
      const options = [...keys].sort(byKey).map((key, i) =>
        h(
          "label",
          { for: `col-${i}` },
          h("input", {
            type: "checkbox",
            id: `col-${i}`,
            checked: columns.includes(key),
            onchange: (event) =>
              setColumns(event.target.checked ? [...columns, key] : columns.filter((c) => c !== key)),
          }),
          key,
        ),
      );
      $("column-options").replaceChildren(
        ...(options.length ? options : [h("p", { class: "muted", text: "No property keys on this page." })]),
      );
    }

    function render() {
      if (!page) return;
      const { count, results } = page;
      const head = versions
        ? [h("th", { scope: "col", text: "Version" }), h("th", { scope: "col", text: "Dataset" }), h("th", { scope: "col", text: "Status" })]
        : [h("th", { scope: "col", text: "Name" })];
      head.push(...(columns.length ? columns.map(sortHeader) : [h("th", { scope: "col", text: "Properties" })]));
      head.push(h("th", { scope: "col", text: versions ? "Completed" : "Created" }));
      $("results").tHead.replaceChildren(h("tr", {}, head));
      const rows = results.map((row) => {
        const link = versions ? `${ROOT}/dataset-versions/${row.id}/` : `${ROOT}/datasets/${row.id}/`;
        const faults = faultsOf(row);
        const all = Object.values(faults).flat();
        const mark = all.length
          ? h("span", { class: "violation-note", role: "img", "aria-label": `violations: ${faultText(all)}`, title: faultText(all), text: " ⚠" })
          : null;
        const cells = [h("th", { scope: "row" }, h("a", { href: link, text: row.name }), mark)];
        if (versions) {
          cells.push(h("td", {}, h("a", { href: `${ROOT}/datasets/${row.dataset.id}/`, text: row.dataset.name })));
          cells.push(h("td", {}, badge(row.status)));
        }
        if (columns.length) cells.push(...columns.map((key) => cell(row.properties, key, faults)));
        else cells.push(h("td", {}, chips(row.properties)));
        cells.push(h("td", {}, when(versions ? row.completed_at : row.created_at)));
        return h("tr", { class: all.length ? "violation" : null }, cells);
      });
      const tbody = $("results").tBodies[0];
      tbody.replaceChildren(...rows);
      if (!rows.length) {
        const span = head.length;
        tbody.append(h("tr", {}, h("td", { colspan: span, class: "muted", text: "Nothing matches." })));
      }
      const noun = versions ? "versions" : "datasets";
      const filtered = params.get("filter") || params.get("dataset");
      $("summary").textContent = count
        ? `${offset + 1}–${offset + results.length} of ${plural(count, noun.slice(0, -1), noun)}${filtered ? " matching" : ""}`
        : `No ${noun}${filtered ? " match" : " yet"}.`;
      chooser(results);
      pager(count);
      if (!$("bulk").hidden) $("bulk-count").textContent = page.count_exact === false ? "the" : count.toLocaleString();
    }

    function pager(count) {
      const link = (el, to, show) => {
        el.hidden = !show;
        const next = new URLSearchParams(location.search);
        if (to > 0) next.set("offset", String(to));
        else next.delete("offset");
        el.href = `?${next}`;
      };
      link($("prev"), Math.max(0, offset - limit), offset > 0);
      link($("next"), offset + limit, offset + limit < count);
      const pages = Math.max(1, Math.ceil(count / limit));
      $("page-info").textContent = pages > 1 ? `Page ${Math.floor(offset / limit) + 1} of ${pages}` : "";
    }

    function filterError(filter, data) {
      const chars = Array.from(filter);
      const position = Math.min(Math.max(0, Number(data.position) || 0), chars.length);
      const before = chars.slice(0, position).join("");
      const pre = h(
        "pre",
        { "aria-hidden": "true" },
        before,
        h("mark", { text: chars[position] || " " }),
        chars.slice(position + 1).join(""),
        `\n${" ".repeat(position)}^ expected ${data.expected || "something else"}`,
      );
      notice($("filter-error"), [h("p", {}, h("strong", { text: "The filter does not parse: " }), data.detail), pre], "error");
      filterInput.setAttribute("aria-invalid", "true");
      filterInput.setAttribute("aria-errormessage", "filter-error");
      filterInput.focus();
      filterInput.setSelectionRange(before.length, before.length);
    }

    async function load() {
      const query = new URLSearchParams({ limit: String(limit), offset: String(offset) });
      for (const key of ["filter", "dataset", "ordering"]) if (params.get(key)) query.set(key, params.get(key));
      try {
        page = (await api(`/api/v0/${kind}/?${query}`)).data;
        render();
      } catch (error) {
        if (error instanceof ApiError && error.data.error === "bad_filter") {
          // The ordering is written in the same language: point into the filter only if it is alone.
          if (params.get("filter") && !params.get("ordering")) filterError(params.get("filter"), error.data);
          else notice($("filter-error"), [h("p", {}, h("strong", { text: "Bad filter or ordering: " }), error.data.detail)], "error");
          $("summary").textContent = "No results: fix the filter.";
          return;
        }
        $("summary").textContent = `Could not load: ${problem(error)}.`;
      }
    }

    // Saved searches: `?search=<id>` opens one (its filter, columns and ordering go into the URL,
    // so the page stays the plain URL-driven list it is); the bar lists this list's searches.
    async function openSaved(id) {
      try {
        const found = (await api(`/api/v0/saved-searches/${encodeURIComponent(id)}/`)).data;
        const next = new URLSearchParams();
        if (found.filter) next.set("filter", found.filter);
        if (found.ordering) next.set("ordering", found.ordering);
        for (const c of found.columns || []) next.append("col", c);
        next.set("saved", found.name);
        location.replace(`${location.pathname}?${next}`);
      } catch (error) {
        notice($("filter-error"), `Could not open the saved search: ${problem(error)}.`, "error");
        load();
      }
    }

    async function loadSaved() {
      try {
        const { data } = await api(`/api/v0/saved-searches/?scope=${encodeURIComponent(kind)}`);
        const current = params.get("saved");
        const items = data.results.map((s) =>
          h(
            "li",
            {},
            h("a", { class: s.name === current ? "chip current" : "chip", href: `${ROOT}${s.url}`, title: s.filter || "everything", "aria-current": s.name === current ? "page" : null, text: s.name }),
            h("button", { type: "button", class: "link", "aria-label": `Delete the saved search ${s.name}`, text: "×", onclick: () => deleteSaved(s) }),
          ),
        );
        $("saved-list").replaceChildren(...items);
      } catch (error) {
        $("saved-status").textContent = `Saved searches unavailable: ${problem(error)}.`;
      }
    }

    async function deleteSaved(found) {
      try {
        await api(`/api/v0/saved-searches/${found.id}/`, { method: "DELETE" });
        $("saved-status").textContent = `Deleted “${found.name}”.`;
      } catch (error) {
        $("saved-status").textContent = `Could not delete: ${problem(error)}.`;
      }
      loadSaved();
    }

    $("save-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = $("saved-name").value.trim();
      if (!name) return;
      const payload = { name, scope: kind, filter: params.get("filter") || "", ordering: params.get("ordering") || "", columns };
      try {
        await api("/api/v0/saved-searches/", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
        $("saved-status").textContent = `Saved as “${name}”.`;
        $("saved-name").value = "";
        loadSaved();
      } catch (error) {
        $("saved-status").textContent = error instanceof ApiError && error.status === 409 ? `“${name}” exists already.` : `Could not save: ${problem(error)}.`;
      }
    });

    // Exports go through fetch (so the API token goes with them), then download as a file.
    for (const button of document.querySelectorAll(".exports button")) {
      button.addEventListener("click", async () => {
        const format = button.dataset.format;
        const query = new URLSearchParams({ format });
        for (const key of ["filter", "dataset"]) if (params.get(key)) query.set(key, params.get(key));
        if (columns.length) query.set("columns", columns.join(","));
        const token = sessionStorage.getItem(TOKEN_KEY);
        const response = await fetch(`${ROOT}/api/v0/${kind}/export/?${query}`, { headers: token ? { Authorization: `Token ${token}` } : {} });
        if (!response.ok) {
          $("saved-status").textContent = `Export failed (${response.status}).`;
          return;
        }
        const url = URL.createObjectURL(await response.blob());
        const a = h("a", { href: url, download: `${kind}.${format}` });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      });
    }

    // -- bulk edit: every result of the filter (POST .../metadata/bulk/), previewed first. Only
    // offered for a filter alone: the edit names its targets by the filter, not by dataset name.
    const bulkFilter = (params.get("filter") || "").trim();
    let bulkPreview = null; // {set, count, needs_confirm} of the last preview
    if (bulkFilter && !(versions && params.get("dataset"))) {
      $("bulk").hidden = false;
      const result = $("bulk-result");
      const readSet = () => {
        try {
          const value = JSON.parse($("bulk-set").value);
          if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) return value;
        } catch {
          /* shown below */
        }
        notice(result, 'Write a JSON object of at least one key, e.g. {"reviewed": true}.', "error");
        $("bulk-set").setAttribute("aria-invalid", "true");
        return null;
      };
      $("bulk-set").addEventListener("input", () => {
        bulkPreview = null;
        $("bulk-apply").disabled = true;
        $("bulk-set").removeAttribute("aria-invalid");
      });
      const post = (body) =>
        api(`/api/v0/${kind}/metadata/bulk/`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ filter: bulkFilter, ...body }) });
      const changeText = (c) => `${c.key}: ${c.old === null ? "–" : show(c.old)} → ${c.new === null ? "removed" : show(c.new)}`;
      $("bulk-preview").addEventListener("click", async () => {
        const set = readSet();
        if (!set) return;
        try {
          const { data } = await post({ set, dry_run: true });
          bulkPreview = { set, count: data.count, confirm: data.needs_confirm };
          const items = data.targets.map((t) =>
            h("li", {}, h("code", { text: t.target }), t.building ? " (building) " : " ", t.changes.length ? t.changes.map(changeText).join(", ") : h("span", { class: "muted", text: "no change" })),
          );
          const more = data.count > data.targets.length ? ` (the first ${data.targets.length} shown)` : "";
          notice(result, [h("p", { text: `${plural(data.count, "result", "results")} would be edited${more}.` }), h("ul", { class: "bulk-preview" }, items)], "");
          $("bulk-apply").disabled = data.count === 0;
          $("bulk-apply").textContent = `Apply to all ${data.count.toLocaleString()}`;
        } catch (error) {
          notice(result, `Could not preview: ${problem(error)}.`, "error");
        }
      });
      $("bulk-form").addEventListener("submit", async (event) => {
        event.preventDefault();
        if (!bulkPreview) return;
        $("bulk-apply").disabled = true;
        try {
          const body = { set: bulkPreview.set, ...(bulkPreview.confirm ? { confirm: bulkPreview.count } : {}) };
          let { data } = await post(body);
          while (data.state === "queued" || data.state === "running") {
            notice(result, `Editing: ${data.done.toLocaleString()} of ${data.total.toLocaleString()}…`, "");
            await new Promise((r) => setTimeout(r, 500));
            data = (await api(`/api/v0/bulk/${data.id}/`)).data;
          }
          if (data.state === "failed") throw new ApiError(500, { detail: data.error });
          const staged = data.staged ? `, ${data.staged.toLocaleString()} staged until they complete` : "";
          notice(result, [h("p", { text: `Done: ${data.applied.toLocaleString()} edited now${staged}. ` }, h("a", { href: location.href, text: "Reload the results" }))], "success");
        } catch (error) {
          notice(result, `The edit failed: ${problem(error)}.`, "error");
        }
      });
    }

    // -- facets: the most common keys of the results (or the chosen columns), with their values
    const FACET_KEYS = 5;
    let knownKeys = null; // [{key, types, count}], from keys/ (for the facets and the suggestions)
    const literal = (v) => (typeof v === "string" ? JSON.stringify(v) : String(v));
    const keyText = (key) => (/^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$/.test(key) ? key : `\`${key}\``);

    function scoped() {
      const query = new URLSearchParams();
      for (const key of ["filter", "dataset"]) if (params.get(key)) query.set(key, params.get(key));
      return query;
    }

    /** Add `key = value` to the filter (`key` as the filter language writes it). */
    function refine(key, value) {
      const clause = `${key} = ${literal(value)}`;
      const current = (params.get("filter") || "").trim();
      go({ filter: current ? `(${current}) and ${clause}` : clause, offset: null });
    }

    async function loadFacets() {
      const list = $("facet-list");
      try {
        knownKeys = (await api(`/api/v0/${kind}/keys/?${scoped()}`)).data.results;
        const scalar = knownKeys.filter((k) => k.types.string || k.types.boolean || k.types.number);
        const chosen = columns.length ? columns.filter((c) => scalar.some((k) => k.key === keyText(c))) : [];
        const keys = (chosen.length ? chosen.map(keyText) : [...scalar].sort((a, b) => b.count - a.count).map((k) => k.key)).slice(0, FACET_KEYS);
        if (!keys.length) {
          list.replaceChildren(h("p", { class: "muted", text: "No properties to refine by." }));
          return;
        }
        const query = scoped();
        query.set("keys", keys.join(","));
        const { data } = await api(`/api/v0/${kind}/facets/?${query}`);
        list.replaceChildren(...data.facets.map(facetBlock));
      } catch (error) {
        list.replaceChildren(h("p", { class: "muted", text: `Facets unavailable: ${problem(error)}.` }));
      }
    }

    function facetBlock(f) {
      const items = [];
      const values = [...((f.strings && f.strings.values) || []), ...((f.booleans && f.booleans.values) || [])];
      for (const v of values.slice(0, 8)) {
        items.push(h("li", {}, h("button", { type: "button", class: "link", onclick: () => refine(f.key, v.value), text: show(v.value) }), h("span", { class: "count", text: String(v.count) })));
      }
      if (f.strings && f.strings.other) items.push(h("li", { class: "muted", text: `${f.strings.other} other` }));
      if (f.numbers) items.push(h("li", { class: "muted", text: `${show(f.numbers.min)} … ${show(f.numbers.max)} (${f.numbers.count} numbers)` }));
      if (f.missing) items.push(h("li", { class: "muted", text: `${f.missing} without it` }));
      return h("section", { class: "facet" }, h("h3", {}, h("code", { text: f.key })), h("ul", {}, items));
    }

    // -- suggestions in the filter box: keys while a key is being typed, values after `key =`
    const box = $("suggestions");
    let picked = -1;
    function tokenAt(text, at) {
      const before = text.slice(0, at);
      const m = before.match(/([A-Za-z0-9_.`-]*)$/);
      return { start: at - m[1].length, word: m[1], before: before.slice(0, at - m[1].length) };
    }
    async function suggest() {
      const text = filterInput.value;
      const { start, word, before } = tokenAt(text, filterInput.selectionStart || text.length);
      let options = [];
      const afterKey = before.match(/([A-Za-z0-9_.`-]+)\s*(=|!=)\s*$/);
      if (afterKey && knownKeys && knownKeys.some((k) => k.key === afterKey[1] && (k.types.string || k.types.boolean))) {
        try {
          const query = scoped();
          query.set("keys", afterKey[1]);
          const f = (await api(`/api/v0/${kind}/facets/?${query}`)).data.facets[0];
          options = [...((f.strings && f.strings.values) || []), ...((f.booleans && f.booleans.values) || [])].map((v) => literal(v.value));
        } catch {
          options = [];
        }
      } else if (word && knownKeys) {
        options = knownKeys.map((k) => k.key).filter((k) => k.startsWith(word) && k !== word);
      }
      options = options.slice(0, 8);
      picked = -1;
      box.replaceChildren(...options.map((o, i) => h("li", { role: "option", id: `suggestion-${i}`, "aria-selected": "false", text: o, onmousedown: (event) => { event.preventDefault(); take(o, start); } })));
      box.hidden = !options.length;
      filterInput.setAttribute("aria-expanded", String(Boolean(options.length)));
    }
    function take(option, start) {
      const text = filterInput.value;
      const end = filterInput.selectionStart || text.length;
      const from = option.startsWith('"') || option === "true" || option === "false" ? end : start;
      filterInput.value = text.slice(0, from) + option + " " + text.slice(end);
      const at = from + option.length + 1;
      filterInput.setSelectionRange(at, at);
      box.hidden = true;
      filterInput.setAttribute("aria-expanded", "false");
      filterInput.removeAttribute("aria-activedescendant");
    }
    filterInput.addEventListener("input", suggest);
    filterInput.addEventListener("blur", () => {
      box.hidden = true;
      filterInput.setAttribute("aria-expanded", "false");
    });
    filterInput.addEventListener("keydown", (event) => {
      if (box.hidden) return;
      const items = [...box.children];
      if (event.key === "ArrowDown" || event.key === "ArrowUp") {
        event.preventDefault();
        picked = (picked + (event.key === "ArrowDown" ? 1 : items.length - 1)) % items.length;
        items.forEach((li, i) => li.setAttribute("aria-selected", String(i === picked)));
        filterInput.setAttribute("aria-activedescendant", `suggestion-${picked}`);
      } else if ((event.key === "Enter" || event.key === "Tab") && picked >= 0) {
        event.preventDefault();
        take(items[picked].textContent, tokenAt(filterInput.value, filterInput.selectionStart || filterInput.value.length).start);
      } else if (event.key === "Escape") {
        box.hidden = true;
        filterInput.setAttribute("aria-expanded", "false");
      }
    });

    if (params.get("search")) openSaved(params.get("search"));
    else {
      load();
      loadFacets();
    }
    loadSaved();
  }

  // -- one dataset or version ---------------------------------------------------------------------

  function detailPage() {
    const kind = body.dataset.kind;
    const versions = kind === "dataset-versions";
    const base = `/api/v0/${kind}/${body.dataset.id}/`;
    const editor = makeEditor(base, {
      saved: () => {
        loadRecord(); // its violations come with it
        loadHistory(true);
      },
      staged: () => loadStaged(),
    });
    let record = null;

    async function renderProps(props, violations) {
      const defs = await definitions();
      const rows = propertyRows(props, violations, defs, isReserved);
      $("props-table").tBodies[0].replaceChildren(...rows);
      $("props-table").hidden = !rows.length;
      $("props-empty").hidden = Boolean(rows.length);
      editor.setProps(props);
    }

    async function loadRecord() {
      try {
        record = (await api(base)).data;
      } catch (error) {
        notice($("load-error"), `Could not load: ${problem(error)}.`, "error");
        $("title").textContent = "Not available";
        return;
      }
      $("title").textContent = record.name;
      document.title = `${versions ? `${record.dataset.name}/${record.name}` : record.name} · Dataset properties`;
      $("uri").textContent = record.uri;
      $("tags").replaceChildren(tagChips(record.tags));
      renderProps(record.properties, record.violations);
      $("edit-button").disabled = false;
      if (versions) {
        $("crumb-dataset").replaceChildren(h("a", { href: `${ROOT}/datasets/${record.dataset.id}/`, text: record.dataset.name }));
        $("status").replaceChildren(badge(record.status));
        $("completed").replaceChildren(when(record.completed_at));
        renderPrevious(record.previous_version);
        $("aliases").replaceChildren(
          (record.aliases || []).length
            ? h("span", { class: "chips" }, record.aliases.map((a) => h("code", { class: "chip", text: `dataset://${record.dataset.name}/${a}` })))
            : h("span", { class: "muted", text: "—" }),
        );
        renderFiles(record.files, record.files_count);
        if (record.status === "completed") compare("");
        editor.setBuilding(record.status !== "completed");
      } else {
        $("crumb-dataset").textContent = record.name;
        $("created").replaceChildren(when(record.created_at));
        const latest = record.latest_version;
        $("latest").replaceChildren(latest ? h("a", { href: `${ROOT}/dataset-versions/${latest.id}/`, text: latest.name }) : h("span", { class: "muted", text: "none completed yet" }));
        loadVersions(record.name);
      }
      loadStaged();
    }

    function renderFiles(files, total) {
      const MAX = 500;
      const rows = files.slice(0, MAX).map((f) => {
        const d = f.datum || {};
        const sums = [["md5", d.md5], ["sha1", d.sha1], ["sha256", d.sha256]].filter(([, v]) => v);
        return h(
          "tr",
          {},
          h("td", {}, d.id ? h("a", { href: `${ROOT}/data/${d.id}/` }, h("code", { text: f.path })) : h("code", { text: f.path })),
          h("td", { class: "num", text: d.size === null || d.size === undefined ? "—" : bytes(d.size) }),
          h("td", {}, sums.length ? sums.map(([name, v]) => h("span", { class: "chip mono", title: `${name} ${v}` }, h("b", { text: name }), ` ${v.slice(0, 12)}…`)) : h("span", { class: "muted", text: "—" })),
          h("td", {}, (d.tags || []).length ? d.tags.map((t) => h("span", { class: "chip", text: t })) : h("span", { class: "muted", text: "—" })),
          h("td", {}, d.alias ? h("code", { text: `datum://${d.alias}` }) : h("span", { class: "muted", text: "—" })),
          h("td", {}, h("code", { text: f.execution })),
          h("td", {}, chips(d.properties || f.properties, 6)),
        );
      });
      const count = total === undefined ? files.length : total;
      if (count > rows.length) rows.push(h("tr", {}, h("td", { colspan: 7, class: "muted", text: `… and ${count - rows.length} more` })));
      $("files-table").tBodies[0].replaceChildren(...rows);
      $("files-table").hidden = !files.length;
      $("files-empty").hidden = Boolean(files.length);
      $("files-count").textContent = plural(count, "file", "files");
    }

    function tagChips(tags) {
      return (tags || []).length ? h("span", { class: "chips" }, tags.map((t) => h("span", { class: "chip", text: t }))) : h("span", { class: "muted", text: "—" });
    }

    async function compare(against) {
      const query = against ? `?against=${encodeURIComponent(against)}` : "";
      let found;
      try {
        found = (await api(`${base}diff/${query}`)).data;
      } catch (error) {
        notice($("compare-error"), `Could not compare: ${problem(error)}.`, "error");
        return;
      }
      notice($("compare-error"), "");
      const rows = [];
      const cell = (value) => h("td", { class: "value-json", text: value === undefined ? "—" : show(value) });
      const p = found.properties;
      for (const [k, v] of Object.entries(p.added)) rows.push(h("tr", {}, h("td", { text: "added" }), h("td", {}, h("code", { text: k })), cell(undefined), cell(v)));
      for (const [k, v] of Object.entries(p.removed)) rows.push(h("tr", {}, h("td", { text: "removed" }), h("td", {}, h("code", { text: k })), cell(v), cell(undefined)));
      for (const [k, c] of Object.entries(p.changed)) rows.push(h("tr", {}, h("td", { text: "changed" }), h("td", {}, h("code", { text: k })), cell(c.old), cell(c.new)));
      const f = found.files;
      const sum = (d) => (d.sha256 ? `sha256 ${d.sha256.slice(0, 12)}…` : d.size !== null ? `${d.size} B` : "—");
      for (const x of f.added) rows.push(h("tr", {}, h("td", { text: "file added" }), h("td", {}, h("code", { text: x.name })), cell(undefined), h("td", { text: sum(x) })));
      for (const x of f.removed) rows.push(h("tr", {}, h("td", { text: "file removed" }), h("td", {}, h("code", { text: x.name })), h("td", { text: sum(x) }), cell(undefined)));
      for (const x of f.changed) rows.push(h("tr", {}, h("td", { text: "file changed" }), h("td", {}, h("code", { text: x.name })), h("td", { text: sum(x.old) }), h("td", { text: sum(x.new) })));
      $("compare-table").tBodies[0].replaceChildren(...rows);
      $("compare-table").hidden = !rows.length;
      const c = f.counts;
      const what = found.against ? `against ${found.against.uri}` : "against nothing (no earlier version)";
      $("compare-summary").textContent = `${what}: ${Object.keys(p.added).length + Object.keys(p.removed).length + Object.keys(p.changed).length} property changes; files ${c.added} added, ${c.removed} removed, ${c.changed} changed, ${f.unchanged} unchanged.`;
    }
    if (versions) {
      $("compare-form").addEventListener("submit", (event) => {
        event.preventDefault();
        compare($("compare-with").value.trim());
      });
    }

    async function renderPrevious(id) {
      const out = $("previous");
      if (!id) {
        out.replaceChildren(h("span", { class: "muted", text: "— (first version)" }));
        return;
      }
      const link = h("a", { href: `${ROOT}/dataset-versions/${id}/`, text: id });
      out.replaceChildren(link);
      try {
        const base = (await api(`/api/v0/dataset-versions/${id}/?files_limit=0`)).data;
        link.textContent = base.name;
        link.title = base.uri;
      } catch (error) {
        /* the id stays as the link's text */
      }
    }

    const VERSIONS_SHOWN = 20;
    async function loadVersions(name) {
      const link = `${ROOT}/dataset-versions/?dataset=${encodeURIComponent(name)}`;
      $("versions-link").href = link;
      try {
        // The API lists oldest first: read the last page, and show it newest first.
        const query = `/api/v0/dataset-versions/?dataset=${encodeURIComponent(name)}&limit=${VERSIONS_SHOWN}`;
        let { data } = await api(query);
        if (data.count > VERSIONS_SHOWN) data = (await api(`${query}&offset=${data.count - VERSIONS_SHOWN}`)).data;
        $("version-count").textContent = String(data.count);
        const rows = [...data.results].reverse().map((v) =>
          h(
            "tr",
            {},
            h("th", { scope: "row" }, h("a", { href: `${ROOT}/dataset-versions/${v.id}/`, text: v.name })),
            h("td", {}, badge(v.status)),
            h("td", {}, when(v.completed_at)),
            h("td", {}, chips(v.properties)),
          ),
        );
        if (data.count > data.results.length) {
          rows.push(h("tr", {}, h("td", { colspan: 4 }, h("a", { href: link, text: `All ${data.count} versions (the newest ${VERSIONS_SHOWN} are shown) →` }))));
        }
        $("versions-table").tBodies[0].replaceChildren(...rows);
        $("versions-table").hidden = !rows.length;
        $("versions-empty").hidden = Boolean(rows.length);
      } catch (error) {
        $("version-count").textContent = "unknown";
      }
    }

    async function loadStaged() {
      const out = $("staged");
      try {
        const { data } = await api(`/api/web/${kind}/${body.dataset.id}/staged/`);
        const n = data.staged;
        const building = versions && record && record.status !== "completed";
        out.textContent = n ? `${plural(n, "entry", "entries")}${data.capped ? " or more" : ""}` : "none";
        if (n && building) out.append(h("span", { class: "muted", text: " (applied when the version completes)" }));
        out.title = data.watermark ? `after watermark ${data.watermark}` : "nothing applied yet";
        const held = $("quarantine");
        held.hidden = !data.quarantined;
        if (data.quarantined) {
          const q = data.quarantined;
          held.replaceChildren(
            h("p", { text: `Quarantined: its applies failed ${q.attempts} times (last at ${q.at}). Its entries are kept and held.` }),
            h("pre", { text: q.error }),
            h("p", { text: `Put it back with: sidecar retry ${data.target}` }),
          );
        }
      } catch (error) {
        out.textContent = "unknown";
        out.title = problem(error);
      }
    }

    // History, newest first; the API pages oldest first, so start from the last page.
    const HISTORY_PAGE = 50;
    let historyStart = null;
    async function loadHistory(reset) {
      const tbody = $("history-table").tBodies[0];
      if (reset) historyStart = null;
      let rows;
      try {
        if (historyStart === null) {
          const first = (await api(`${base}metadata/history/?limit=${HISTORY_PAGE}&offset=0`)).data;
          historyStart = Math.max(0, first.count - HISTORY_PAGE);
          rows = historyStart === 0 ? first.results : (await api(`${base}metadata/history/?limit=${HISTORY_PAGE}&offset=${historyStart}`)).data.results;
          tbody.replaceChildren();
        } else {
          const start = Math.max(0, historyStart - HISTORY_PAGE);
          rows = (await api(`${base}metadata/history/?limit=${historyStart - start}&offset=${start}`)).data.results;
          historyStart = start;
        }
      } catch (error) {
        notice($("load-error"), `Could not load the history: ${problem(error)}.`, "error");
        return;
      }
      for (const change of rows.reverse()) tbody.append(historyRow(change));
      $("history-table").hidden = !tbody.rows.length;
      $("history-empty").hidden = Boolean(tbody.rows.length);
      $("history-more").hidden = historyStart === 0;
    }
    $("history-more").addEventListener("click", () => loadHistory(false));

    function historyRow(change) {
      let what;
      if (change.old === null) what = [h("span", { class: "muted", text: "set " }), h("code", { text: show(change.new) })];
      else if (change.new === null) what = [h("span", { class: "muted", text: "removed " }), h("code", { class: "old", text: show(change.old) })];
      else what = [h("code", { class: "old", text: show(change.old) }), " → ", h("code", { text: show(change.new) })];
      return h("tr", {}, h("td", {}, when(change.changed_at)), h("td", {}, h("code", { text: change.key })), h("td", {}, what), h("td", { class: "source" }, source(change.source)));
    }

    function source(src) {
      if (!src || src.origin === "api") return "API";
      if (src.origin === "platform") return "platform";
      if (src.origin === "rollback") return ["rollback ", h("code", { text: src.id }), " of ", h("code", { text: src.execution })];
      if (src.origin === "bulk") return ["bulk edit ", h("code", { text: src.id }), h("br"), h("span", { class: "muted" }, "filter ", h("code", { text: src.filter }))];
      return [
        "execution ",
        h("code", { text: src.execution }),
        h("br"),
        h("span", { class: "muted" }, h("code", { text: src.file }), ` line ${src.line}`),
      ];
    }

    loadRecord();
    loadHistory(true);
  }

  // -- one datum (a file of an execution): read-only ----------------------------------------------

  function datumPage() {
    const base = `/api/v0/data/${body.dataset.id}/`;
    const text = (id, value) => {
      $(id).textContent = value === null || value === undefined || value === "" ? "—" : String(value);
    };

    async function loadRecord() {
      let datum;
      try {
        datum = (await api(base)).data;
      } catch (error) {
        notice($("load-error"), `Could not load: ${problem(error)}.`, "error");
        $("title").textContent = "Not available";
        return;
      }
      $("title").textContent = datum.name;
      document.title = `${datum.name} · Dataset properties`;
      $("uri").textContent = datum.alias ? `datum://${datum.alias}` : datum.id;
      $("execution").replaceChildren(h("code", { text: datum.output_execution ? datum.output_execution.id : "—" }));
      text("size", datum.size === null ? null : `${datum.size.toLocaleString()} bytes`);
      $("created").replaceChildren(when(datum.ctime));
      $("modified").replaceChildren(when(datum.mtime));
      text("alias", datum.alias);
      $("tags").replaceChildren(...(datum.tags.length ? datum.tags.map((t) => h("span", { class: "chip", text: t })) : ["—"]));
      const sums = ["md5", "sha1", "sha256"].map((name) =>
        h("tr", {}, h("td", { text: name }), h("td", {}, datum[name] ? h("code", { text: datum[name] }) : h("span", { class: "muted", text: "—" }))),
      );
      $("checksums-table").tBodies[0].replaceChildren(...sums);
      const rows = propertyRows(datum.properties, datum.violations, await definitions());
      $("props-table").tBodies[0].replaceChildren(...rows);
      $("props-table").hidden = !rows.length;
      $("props-empty").hidden = Boolean(rows.length);
    }

    async function loadHistory() {
      let changes;
      try {
        const first = (await api(`${base}history/?limit=100`)).data;
        changes = first.count > 100 ? (await api(`${base}history/?limit=100&offset=${first.count - 100}`)).data.results : first.results;
      } catch (error) {
        notice($("load-error"), `Could not load the history: ${problem(error)}.`, "error");
        return;
      }
      const rows = [...changes].reverse().map((c) => {
        const what = c.old === null ? `set ${show(c.new)}` : c.new === null ? `removed ${show(c.old)}` : `${show(c.old)} → ${show(c.new)}`;
        const src = c.source || {};
        const from = src.origin === "sidecar" ? `${src.file} line ${src.line}` : src.origin === "api" ? "API" : src.origin === "rollback" ? `rollback ${src.id} of ${src.execution}` : String(src.origin);
        return h("tr", {}, h("td", {}, when(c.changed_at)), h("td", {}, h("code", { text: c.key })), h("td", { text: what }), h("td", { class: "source", text: from }));
      });
      $("history-table").tBodies[0].replaceChildren(...rows);
      $("history-table").hidden = !rows.length;
      $("history-empty").hidden = Boolean(rows.length);
    }

    loadRecord();
    loadHistory();
  }

  // -- the properties editor ----------------------------------------------------------------------

  const TYPES = [
    ["string", "string"],
    ["number", "number"],
    ["boolean", "boolean"],
    ["json", "JSON object / array"],
  ];

  class FieldError extends Error {
    constructor(message, element) {
      super(message);
      this.element = element;
    }
  }

  function editorType(value) {
    const type = typeOf(value);
    return type === "string" || type === "number" || type === "boolean" ? type : "json";
  }

  /** The value control for a type: text input, number-ish input, true/false select or JSON textarea. */
  function valueControl(type, text, attrs) {
    if (type === "boolean") {
      const select = h("select", attrs, h("option", { text: "true" }), h("option", { text: "false" }));
      select.value = text === "false" ? "false" : "true";
      return select;
    }
    if (type === "json") {
      const lines = Math.min(8, Math.max(2, text.split("\n").length));
      return h("textarea", { ...attrs, rows: lines, spellcheck: "false", value: text });
    }
    return h("input", { ...attrs, type: "text", autocomplete: "off", inputmode: type === "number" ? "decimal" : null, value: text });
  }

  function valueText(type, value) {
    if (type === "json") return JSON.stringify(value, null, 2);
    return String(value);
  }

  /** Text typed in a control, read as a value of `type`; FieldError (with the control) if it is not. */
  function parseValue(type, text, key, control) {
    if (type === "string") return text;
    if (type === "boolean") return text === "true";
    if (type === "number") {
      const trimmed = text.trim();
      const number = Number(trimmed);
      if (!trimmed || !Number.isFinite(number)) throw new FieldError(`${key}: "${text}" is not a number.`, control);
      return number;
    }
    let value;
    try {
      value = JSON.parse(text);
    } catch (error) {
      throw new FieldError(`${key}: not valid JSON (${error.message}).`, control);
    }
    if (value === null) throw new FieldError(`${key}: null is not a value; use Remove to delete the key.`, control);
    return value;
  }

  /** Convert what a control holds when its row's type changes (keeping what the person typed). */
  function convertText(from, to, text) {
    if (to === "boolean") return ["true", "1", "yes"].includes(text.trim().toLowerCase()) ? "true" : "false";
    if (to === "json" && !text.trim()) return "{}";
    if (from === "json") {
      try {
        const value = JSON.parse(text);
        if (typeof value !== "object" || value === null) return String(value);
      } catch {
        /* keep the text as typed */
      }
    }
    return text;
  }

  function makeEditor(base, { saved, staged }) {
    const form = $("editor");
    const rowsList = $("rows");
    const editButton = $("edit-button");
    const status = $("props-status");
    const error = $("editor-error");
    const jsonText = $("json-text");
    let props = {};
    let building = false;
    let mode = "fields";
    let rowCount = 0;

    function showError(message, element) {
      notice(error, message ? [h("p", {}, message)] : "", "error");
      for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
      if (element) {
        element.setAttribute("aria-invalid", "true");
        element.focus();
      }
    }

    function typeSelect(type, attrs) {
      const select = h("select", attrs, TYPES.map(([value, label]) => h("option", { value, text: label })));
      select.value = type;
      return select;
    }

    /** One editable row: key, type, value, Remove. */
    function row(key, value) {
      const n = ++rowCount;
      const type = editorType(value);
      const keyInput = h("input", { type: "text", class: "key", value: key, autocomplete: "off", spellcheck: "false" });
      const select = typeSelect(type, { class: "type" });
      const slot = h("div", { class: "value" }, valueControl(type, valueText(type, value), { class: "control" }));
      const remove = h("button", { type: "button", class: "remove" }, "Remove");
      const li = h("li", { "data-row": n }, h("div", { class: "row" }, keyInput, select, slot, remove));
      const relabel = () => {
        const name = keyInput.value.trim() || `new property ${n}`;
        keyInput.setAttribute("aria-label", `Key of ${name}`);
        select.setAttribute("aria-label", `Type of ${name}`);
        slot.firstChild.setAttribute("aria-label", `Value of ${name}`);
        remove.setAttribute("aria-label", `Remove ${name}`);
      };
      keyInput.addEventListener("input", relabel);
      select.addEventListener("change", () => {
        const old = slot.firstChild;
        const from = old.dataset.type || type;
        const control = valueControl(select.value, convertText(from, select.value, old.value), { class: "control" });
        control.dataset.type = select.value;
        slot.replaceChildren(control);
        relabel();
      });
      slot.firstChild.dataset.type = type;
      remove.addEventListener("click", () => {
        const next = li.nextElementSibling || li.previousElementSibling;
        li.remove();
        (next ? next.querySelector("button.remove") : $("new-key")).focus();
      });
      relabel();
      return li;
    }

    function readRow(li) {
      const keyInput = li.querySelector("input.key");
      const key = keyInput.value.trim();
      const control = li.querySelector(".control");
      if (!key) throw new FieldError("A key is empty: type one, or remove the row.", keyInput);
      return [key, parseValue(li.querySelector("select.type").value, control.value, key, control), keyInput];
    }

    function newValueControl() {
      const type = $("new-type").value;
      const old = $("new-value");
      const text = old ? convertText(old.dataset.type || "string", type, old.value) : "";
      const control = valueControl(type, text, { id: "new-value" });
      control.dataset.type = type;
      if (old) old.replaceWith(control);
      else $("new-value-field").append(control);
    }

    /** The allowed values of the add row's key, offered as suggestions of its value. */
    async function offerAllowed() {
      const def = (await definitions())[$("new-key").value.trim()];
      const list = $("allowed-values");
      const values = def ? def.allowed_values.map((a) => a.value) : [];
      list.replaceChildren(...values.map((v) => h("option", { value: typeof v === "string" ? v : JSON.stringify(v) })));
      const control = $("new-value");
      if (control && control.tagName === "INPUT") control.setAttribute("list", "allowed-values");
    }
    $("new-key").addEventListener("input", offerAllowed);
    $("new-type").addEventListener("change", offerAllowed);

    /** The add row's key and value, or null when its key is empty. */
    function pending() {
      const keyInput = $("new-key");
      const key = keyInput.value.trim();
      if (!key) return null;
      const control = $("new-value");
      return [key, parseValue($("new-type").value, control.value, key, control)];
    }

    function add() {
      showError("");
      try {
        const entry = pending();
        if (!entry) throw new FieldError("Type a key to add.", $("new-key"));
        const existing = [...rowsList.querySelectorAll("input.key")].find((i) => i.value.trim() === entry[0]);
        if (existing) throw new FieldError(`${entry[0]} is already listed above: change its value there.`, existing);
        rowsList.append(row(...entry));
        $("new-key").value = "";
        $("new-value").value = $("new-type").value === "json" ? "{}" : "";
        $("new-key").focus();
      } catch (e) {
        if (!(e instanceof FieldError)) throw e;
        showError(e.message, e.element);
      }
    }

    /** Every field row (and a filled-in add row) as one object; FieldError on a bad or repeated key. */
    function collectFields() {
      const out = {};
      for (const li of rowsList.children) {
        const [key, value, keyInput] = readRow(li);
        if (Object.hasOwn(out, key)) throw new FieldError(`The key ${key} is listed twice.`, keyInput);
        out[key] = value;
      }
      const extra = pending();
      if (extra) {
        if (Object.hasOwn(out, extra[0])) throw new FieldError(`The key ${extra[0]} is listed twice.`, $("new-key"));
        out[extra[0]] = extra[1];
      }
      return out;
    }

    function collectJson() {
      let value;
      try {
        value = JSON.parse(jsonText.value);
      } catch (e) {
        throw new FieldError(`Not valid JSON: ${e.message}.`, jsonText);
      }
      if (typeOf(value) !== "object") throw new FieldError("The JSON must be one object: {\"key\": value, …}.", jsonText);
      return value;
    }

    function editable() {
      return Object.fromEntries(Object.entries(props).filter(([k]) => !isReserved(k)));
    }

    function fillRows(values) {
      rowsList.replaceChildren(...Object.keys(values).sort(byKey).map((k) => row(k, values[k])));
    }

    function setMode(next) {
      if (next === mode) return;
      try {
        if (next === "json") jsonText.value = JSON.stringify(collectFields(), null, 2);
        else fillRows(collectJson());
      } catch (e) {
        if (!(e instanceof FieldError)) throw e;
        showError(e.message, e.element);
        return;
      }
      if (next === "fields") $("new-key").value = "";
      showError("");
      mode = next;
      $("fields-mode").hidden = mode !== "fields";
      $("json-mode").hidden = mode !== "json";
      $("mode-fields").setAttribute("aria-pressed", String(mode === "fields"));
      $("mode-json").setAttribute("aria-pressed", String(mode === "json"));
      (mode === "json" ? jsonText : $("mode-fields")).focus();
    }

    function open() {
      notice(status, "");
      showError("");
      mode = "fields";
      $("fields-mode").hidden = false;
      $("json-mode").hidden = true;
      $("mode-fields").setAttribute("aria-pressed", "true");
      $("mode-json").setAttribute("aria-pressed", "false");
      fillRows(editable());
      $("new-key").value = "";
      $("new-type").value = "string";
      newValueControl();
      $("new-value").value = "";
      const reserved = Object.keys(props).filter(isReserved).sort();
      $("reserved").hidden = !reserved.length;
      $("reserved-list").replaceChildren(...reserved.flatMap((k) => [h("dt", { text: k }), h("dd", { text: show(props[k]) })]));
      form.hidden = false;
      $("props-view").hidden = true;
      editButton.setAttribute("aria-expanded", "true");
      editButton.disabled = true;
      const first = rowsList.querySelector("input.key");
      (first || $("new-key")).focus();
    }

    function close() {
      form.hidden = true;
      $("props-view").hidden = false;
      editButton.setAttribute("aria-expanded", "false");
      editButton.disabled = false;
      editButton.focus();
    }

    /** The keys to send: changed or new ones with their value, removed ones as null. */
    function changes(next) {
      const out = {};
      for (const key of Object.keys(props)) {
        if (!isReserved(key) && !Object.hasOwn(next, key)) out[key] = null;
      }
      for (const [key, value] of Object.entries(next)) {
        if (!Object.hasOwn(props, key) || !same(props[key], value)) out[key] = value;
      }
      return out;
    }

    async function save(event) {
      event.preventDefault();
      showError("");
      let body;
      try {
        body = changes(mode === "json" ? collectJson() : collectFields());
      } catch (e) {
        if (!(e instanceof FieldError)) throw e;
        showError(e.message, e.element);
        return;
      }
      const count = Object.keys(body).length;
      if (!count) {
        showError("Nothing to save: no property changed.");
        return;
      }
      const saveButton = $("save-button");
      saveButton.disabled = true;
      saveButton.textContent = "Saving…";
      try {
        const answer = await api(`${base}metadata/`, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body),
        });
        close();
        const removed = Object.values(body).filter((v) => v === null).length;
        const summary = [count - removed && plural(count - removed, "key set", "keys set"), removed && plural(removed, "key removed", "keys removed")]
          .filter(Boolean)
          .join(", ");
        if (answer.status === 202) {
          notice(status, `Staged (${summary}): this version is still building, so the change is applied when it completes.`, "warn");
          staged();
        } else {
          notice(status, `Saved: ${summary}.`);
          saved(answer.data);
        }
      } catch (e) {
        const key = e instanceof ApiError && e.data.key ? ` (key ${e.data.key})` : "";
        showError(`Not saved${key}: ${problem(e)}. Nothing was changed.`);
        error.scrollIntoView({ block: "nearest" });
      } finally {
        saveButton.disabled = false;
        saveButton.textContent = "Save";
      }
    }

    editButton.addEventListener("click", open);
    $("cancel-button").addEventListener("click", close);
    $("mode-fields").addEventListener("click", () => setMode("fields"));
    $("mode-json").addEventListener("click", () => setMode("json"));
    $("add-button").addEventListener("click", add);
    $("new-type").addEventListener("change", newValueControl);
    form.addEventListener("submit", save);
    form.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        close();
      } else if (event.key === "Enter" && !event.isComposing && event.target.closest(".add") && event.target.tagName !== "TEXTAREA" && event.target.tagName !== "BUTTON") {
        event.preventDefault(); // Enter in the add row adds instead of saving
        add();
      }
    });

    return {
      setProps(next) {
        props = next;
      },
      setBuilding(value) {
        building = value;
        $("edit-button").title = building ? "This version is still building: changes are staged until it completes" : "";
      },
    };
  }

  // -- start ----------------------------------------------------------------------------------------

  if (body.dataset.page === "list") listPage();
  else if (body.dataset.page === "detail") detailPage();
  else if (body.dataset.page === "datum") datumPage();
})();
