// Portico console: one page, plain browser JavaScript, no build step and no third-party code.
//
// Security model (see docs/console.md):
// - The admin token lives in sessionStorage only (gone when the tab closes) and travels only in
//   the Authorization header of same-origin fetches; never in a URL the server sees, never in a
//   cookie.
// - A token handed over in the URL fragment (#token=...) is moved to sessionStorage and erased
//   from the address bar at once with history.replaceState; fragments are never sent to servers.
// - Everything from the API is inserted with textContent / setAttribute, never parsed as HTML,
//   so a hostile display name cannot inject markup.
// - API key strings are fetched only when the user clicks "Show key".
'use strict';

const TOKEN_KEY = 'portico.adminToken';
const DEFAULT_PROJECT = 'demo-proj';
const WINDOWS = [
  { since: '1h', label: 'Last hour', period: 60 },
  { since: '6h', label: 'Last 6 hours', period: 300 },
  { since: '24h', label: 'Last 24 hours', period: 1200 },
];
const STATUS_CLASSES = ['1xx', '2xx', '3xx', '4xx', '5xx'];

// ------------------------------------------------------------------------------------------
// Token and route state

function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  } catch (_) {
    return '';
  }
}

function setToken(t) {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function readRoute() {
  const p = new URLSearchParams(location.hash.replace(/^#/, ''));
  return {
    view: p.get('view') || 'services',
    project: (p.get('project') || '').trim() || DEFAULT_PROJECT,
    service: p.get('service') || '',
    since: p.get('since') || '1h',
    status: p.get('status') || '',
    trace: p.get('trace') || '',
    root: p.get('root') || '',
    minms: p.get('minms') || '',
  };
}

function routeHash(r) {
  const p = new URLSearchParams();
  p.set('view', r.view);
  if (r.project && r.project !== DEFAULT_PROJECT) p.set('project', r.project);
  if (r.service) p.set('service', r.service);
  if (r.since && r.since !== '1h') p.set('since', r.since);
  if (r.status) p.set('status', r.status);
  if (r.trace) p.set('trace', r.trace);
  if (r.root) p.set('root', r.root);
  if (r.minms) p.set('minms', r.minms);
  return '#' + p.toString();
}

function navigate(changes) {
  const next = Object.assign(readRoute(), changes);
  const hash = routeHash(next);
  if (hash === location.hash) render();
  else location.hash = hash;
}

// A token in the fragment is a hand-over (scripts, tests): keep it for this tab and scrub it
// from the address bar and history before anything else runs.
function absorbFragmentToken() {
  const p = new URLSearchParams(location.hash.replace(/^#/, ''));
  if (!p.has('token')) return;
  const t = (p.get('token') || '').trim();
  p.delete('token');
  if (t) setToken(t);
  const rest = p.toString();
  history.replaceState(null, '', location.pathname + location.search + (rest ? '#' + rest : ''));
}

// ------------------------------------------------------------------------------------------
// API access

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

const enc = encodeURIComponent;

// `name` values such as projects/123/locations/global/keys/abc keep their slashes.
function encPath(name) {
  return String(name).split('/').map(enc).join('/');
}

async function api(path) {
  let resp;
  try {
    resp = await fetch(path, {
      headers: { Authorization: 'Bearer ' + getToken(), Accept: 'application/json' },
      cache: 'no-store',
      credentials: 'omit',
      referrerPolicy: 'no-referrer',
    });
  } catch (e) {
    throw new ApiError('UNAVAILABLE: cannot reach the control plane (' + e.message + ')', 0);
  }
  const text = await resp.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : {};
  } catch (_) {
    body = null;
  }
  if (!resp.ok) {
    const e = body && body.error;
    // Google's error shape: the canonical status then the message, as gcloud prints them.
    const msg = e && e.status
      ? e.status + ': ' + e.message
      : 'HTTP ' + resp.status + ': ' + text.slice(0, 500);
    throw new ApiError(msg, resp.status);
  }
  if (body === null) throw new ApiError('Unexpected non-JSON answer from ' + path, resp.status);
  return body;
}

// Follows nextPageToken; `cap` bounds the number of pages so a broken server cannot loop us.
async function apiAll(path, field, cap = 20) {
  const out = [];
  let token = '';
  for (let i = 0; i < cap; i++) {
    const sep = path.includes('?') ? '&' : '?';
    const body = await api(token ? path + sep + 'pageToken=' + enc(token) : path);
    out.push(...(body[field] || []));
    token = body.nextPageToken || '';
    if (!token) break;
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// DOM helpers: text nodes and attributes only, nothing is ever parsed as markup

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function appendAll(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// columns: [{label, num}]; rows: arrays of cells, a cell being a value, a Node, or
// {value, class}.
function table(caption, columns, rows, emptyText) {
  if (!rows.length) return h('p', { class: 'empty' }, emptyText);
  return h('table', {},
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, columns.map((c) =>
      h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)))),
    h('tbody', {}, rows.map((r) => h('tr', {}, r.map((cell, i) => {
      const cls = [columns[i] && columns[i].num ? 'num' : '', cell && cell.class ? cell.class : '']
        .filter(Boolean).join(' ');
      const value = cell && typeof cell === 'object' && !(cell instanceof Node) ? cell.value : cell;
      return h(i === 0 ? 'th' : 'td', { scope: i === 0 ? 'row' : null, class: cls || null },
        value === '' || value === null || value === undefined ? '—' : value);
    })))));
}

function lastSegment(name) {
  const parts = String(name || '').split('/');
  return parts[parts.length - 1];
}

function num(v) {
  const n = Number(v);
  return Number.isFinite(n) ? n : 0;
}

// RFC 3339 from the API → "2026-11-23 19:21:27" (UTC, whole seconds); unparsable text as is.
function fmtTime(v) {
  const t = Date.parse(v);
  return Number.isFinite(t) ? new Date(t).toISOString().slice(0, 19).replace('T', ' ') : (v || '');
}

function fmtInt(n) {
  return num(n).toLocaleString('en-US');
}

// ------------------------------------------------------------------------------------------
// Banner and page state

const errors = [];

function showError(msg) {
  if (!errors.includes(msg)) errors.push(msg);
  const b = document.getElementById('banner');
  b.textContent = errors.join('\n');
  b.hidden = false;
}

function clearErrors() {
  errors.length = 0;
  const b = document.getElementById('banner');
  b.textContent = '';
  b.hidden = true;
}

// Runs `fn`; an API failure becomes a banner line and `fallback` is returned instead.
async function guarded(fn, fallback) {
  try {
    return await fn();
  } catch (e) {
    showError(e instanceof ApiError ? e.message : 'Console error: ' + e.message);
    if (e instanceof ApiError && e.status === 401) document.getElementById('sign-in').hidden = false;
    return fallback;
  }
}

// ------------------------------------------------------------------------------------------
// Views

async function viewServices(r) {
  const services = await guarded(() =>
    apiAll('/v1/services?producerProjectId=' + enc(r.project), 'services'), null);
  if (services === null) return [h('h2', {}, 'Services')];
  const rows = await Promise.all(services.map(async (svc) => {
    const name = svc.serviceName;
    const base = '/v1/services/' + enc(name);
    const [configs, rollouts] = await Promise.all([
      guarded(() => api(base + '/configs?pageSize=1'), {}),
      guarded(() => api(base + '/rollouts?pageSize=1'), {}),
    ]);
    const cfg = (configs.serviceConfigs || [])[0];
    const ro = (rollouts.rollouts || [])[0];
    return [
      h('a', { href: routeHash(Object.assign({}, r, { view: 'service', service: name })) }, name),
      (cfg && cfg.title) || (svc.serviceConfig && svc.serviceConfig.title) || '',
      cfg ? h('code', {}, cfg.id) : '',
      ro ? rolloutSummary(ro) : '',
    ];
  }));
  return [
    h('h2', {}, 'Services'),
    h('p', { class: 'subtitle' }, 'Producer project ', h('code', {}, r.project)),
    table('Managed services produced by ' + r.project,
      [{ label: 'Name' }, { label: 'Title' }, { label: 'Latest config' }, { label: 'Latest rollout' }],
      rows, 'No services in project ' + r.project + '.'),
  ];
}

function trafficText(ro) {
  const pct = (ro.trafficPercentStrategy && ro.trafficPercentStrategy.percentages) || {};
  return Object.entries(pct).map(([id, p]) => id + ': ' + num(p) + '%').join(', ');
}

function rolloutSummary(ro) {
  return h('span', {}, h('code', {}, ro.rolloutId), ' ', ro.status || '',
    trafficText(ro) ? ' (' + trafficText(ro) + ')' : '');
}

async function viewService(r) {
  if (!r.service) {
    showError('INVALID_ARGUMENT: no service named in the address (#view=service&service=NAME).');
    return [h('h2', {}, 'Service')];
  }
  const win = WINDOWS.find((w) => w.since === r.since) || WINDOWS[0];
  const base = '/v1/services/' + enc(r.service);
  const q = '/portico/v1/services/' + enc(r.service);
  const logQuery = '?since=' + enc(win.since) + '&pageSize=50' +
    (r.status ? '&statusClass=' + enc(r.status) : '');
  const [configs, rollouts, series, consumers, logs] = await Promise.all([
    guarded(() => apiAll(base + '/configs', 'serviceConfigs'), null),
    guarded(() => apiAll(base + '/rollouts', 'rollouts'), null),
    guarded(() => api(q + '/timeseries?since=' + enc(win.since) +
      '&alignmentPeriod=' + win.period + 's'), null),
    guarded(() => api(q + '/topConsumers?since=' + enc(win.since) + '&pageSize=10'), null),
    guarded(() => api(q + '/logs' + logQuery), null),
  ]);
  const title = configs && configs[0] && configs[0].title;
  const out = [
    h('p', {}, h('a', { href: routeHash({ view: 'services', project: r.project }) }, '← All services')),
    h('h2', {}, r.service),
    title ? h('p', { class: 'subtitle' }, title) : null,
    h('p', {}, h('a', {
      id: 'service-traces',
      href: routeHash({ view: 'traces', project: r.project, root: r.service + '/' }),
    }, 'Traces of this service'), ' (ESP names root spans SERVICE/METHOD; the project is the tracing project)'),
    h('div', { class: 'controls' },
      h('label', { for: 'window' }, 'Time window'),
      h('select', {
        id: 'window',
        onchange: (e) => navigate({ since: e.target.value }),
      }, WINDOWS.map((w) => h('option', { value: w.since, selected: w === win }, w.label)))),
  ];

  out.push(h('h3', { id: 'traffic' }, 'Traffic'));
  if (series) out.push(trafficSection(series, win));

  out.push(h('h3', { id: 'latency' }, 'Latency by method'));
  if (series) out.push(latencyTable(series));

  out.push(h('h3', { id: 'consumers' }, 'Top consumers'));
  if (consumers) {
    out.push(table('Busiest consumers, ' + win.label.toLowerCase(),
      [{ label: 'Consumer' }, { label: 'Requests', num: true }, { label: 'Errors', num: true }],
      (consumers.consumers || []).map((c) => [c.consumer, fmtInt(c.requestCount), fmtInt(c.errorCount)]),
      'No traffic in this window.'));
  }

  out.push(h('h3', { id: 'logs' }, 'Recent requests'));
  out.push(h('div', { class: 'controls' },
    h('label', { for: 'status-filter' }, 'Status class'),
    h('select', {
      id: 'status-filter',
      onchange: (e) => navigate({ status: e.target.value }),
    },
    h('option', { value: '', selected: !r.status }, 'All'),
    STATUS_CLASSES.map((c) => h('option', { value: c, selected: c === r.status }, c)))));
  if (logs) {
    out.push(table('Newest first (at most 50)',
      [{ label: 'Time (UTC)' }, { label: 'Method' }, { label: 'Status', num: true },
        { label: 'Consumer' }, { label: 'Severity' }, { label: 'Trace' }],
      (logs.entries || []).map((e) => [
        { value: fmtTime(e.timestamp), class: 'nowrap' },
        e.method,
        { value: e.httpResponseCode ? String(e.httpResponseCode) : '', class: 'status-' + e.responseCodeClass },
        e.consumer,
        e.severity,
        traceLink(e.logEntry && e.logEntry.trace),
      ]),
      r.status ? 'No ' + r.status + ' requests in this window.' : 'No requests logged in this window.'));
  }

  out.push(h('h3', { id: 'configs' }, 'Configs'));
  if (configs) {
    out.push(table('Newest first',
      [{ label: 'Config ID' }, { label: 'Title' }, { label: 'APIs' }, { label: 'Methods', num: true }],
      configs.map((c) => [
        h('code', {}, c.id),
        c.title || '',
        (c.apis || []).map((a) => a.name).join(', '),
        String((c.apis || []).reduce((n, a) => n + (a.methods || []).length, 0)),
      ]),
      'No configs submitted yet.'));
  }

  out.push(h('h3', { id: 'rollouts' }, 'Rollouts'));
  if (rollouts) {
    out.push(table('Newest first',
      [{ label: 'Rollout ID' }, { label: 'Status' }, { label: 'Traffic' }, { label: 'Created (UTC)' },
        { label: 'Created by' }],
      rollouts.map((ro) => [h('code', {}, ro.rolloutId), ro.status || '', trafficText(ro),
        { value: fmtTime(ro.createTime), class: 'nowrap' }, ro.createdBy || '']),
      'No rollouts yet.'));
  }
  return out;
}

// Per-slot totals over every method; slots cover the whole window so quiet minutes show as gaps.
function slotTotals(series, win) {
  const periodMs = win.period * 1000;
  const slots = new Map();
  for (const ts of series.timeSeries || []) {
    for (const p of ts.points || []) {
      const t = Date.parse(p.startTime);
      if (!Number.isFinite(t)) continue;
      const cur = slots.get(t) || { req: 0, err: 0 };
      cur.req += num(p.requestCount);
      cur.err += num(p.errorCount);
      slots.set(t, cur);
    }
  }
  const hours = { '1h': 1, '6h': 6, '24h': 24 }[win.since] || 1;
  let end = Math.floor(Date.now() / periodMs) * periodMs;
  let start = end - Math.round((hours * 3600000) / periodMs - 1) * periodMs;
  // The server's clock decides which slot a report lands in; widen rather than drop.
  for (const t of slots.keys()) {
    if (t < start) start = t;
    if (t > end) end = t;
  }
  const out = [];
  for (let t = start; t <= end; t += periodMs) out.push(Object.assign({ t }, slots.get(t) || { req: 0, err: 0 }));
  return out;
}

function hhmm(t) {
  return new Date(t).toISOString().slice(11, 16);
}

function niceMax(v) {
  if (v <= 5) return 5;
  const mag = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= v) return m * mag;
  return 10 * mag;
}

function trafficSection(series, win) {
  const slots = slotTotals(series, win);
  const totalReq = slots.reduce((n, x) => n + x.req, 0);
  const totalErr = slots.reduce((n, x) => n + x.err, 0);
  const unit = win.period === 60 ? 'minute' : win.period / 60 + ' minutes';
  const W = 960, H = 240, L = 48, R = 12, T = 12, B = 28;
  const pw = W - L - R, ph = H - T - B;
  const max = niceMax(Math.max(1, ...slots.map((x) => x.req)));
  const bw = pw / slots.length;
  const y = (v) => T + ph - (v / max) * ph;
  const label = 'Requests and errors per ' + unit + ', ' + win.label.toLowerCase() + ': ' +
    fmtInt(totalReq) + ' requests, ' + fmtInt(totalErr) + ' errors.';
  const grid = [0, max / 2, max].map((v) => [
    s('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }),
    s('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmtInt(v)),
  ]);
  const every = Math.max(1, Math.ceil(slots.length / 8));
  const bars = slots.map((x, i) => {
    const x0 = L + i * bw;
    const w = Math.max(1, bw - 1);
    return s('g', {},
      s('title', {}, hhmm(x.t) + ' UTC: ' + fmtInt(x.req) + ' requests, ' + fmtInt(x.err) + ' errors'),
      x.req > 0 ? s('rect', { class: 'bar-req', x: x0, width: w, y: y(x.req), height: T + ph - y(x.req) }) : null,
      x.err > 0 ? s('rect', { class: 'bar-err', x: x0, width: w, y: y(x.err), height: T + ph - y(x.err) }) : null,
      i % every === 0
        ? s('text', { x: x0, y: H - 8, 'text-anchor': 'start' }, hhmm(x.t))
        : null);
  });
  const chart = s('svg', {
    class: 'chart', viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-labelledby': 'chart-title',
  },
  s('title', { id: 'chart-title' }, label),
  grid,
  s('line', { class: 'axis', x1: L, x2: W - R, y1: T + ph, y2: T + ph }),
  bars);
  const busy = slots.filter((x) => x.req > 0 || x.err > 0);
  return h('div', {},
    h('p', { class: 'totals' },
      'Requests: ', h('strong', { id: 'total-requests' }, fmtInt(totalReq)),
      ' · Errors: ', h('strong', { id: 'total-errors' }, fmtInt(totalErr)),
      ' · per ' + unit + ', ' + win.label.toLowerCase() + ' (UTC)'),
    h('div', { class: 'legend', 'aria-hidden': 'true' },
      h('span', {}, h('span', { class: 'swatch req' }), 'Requests'),
      h('span', {}, h('span', { class: 'swatch err' }), 'Errors')),
    chart,
    h('details', {},
      h('summary', {}, 'Chart data as a table'),
      table('Per ' + unit + ' (UTC), non-empty slots only',
        [{ label: 'Start' }, { label: 'Requests', num: true }, { label: 'Errors', num: true }],
        busy.map((x) => [new Date(x.t).toISOString(), fmtInt(x.req), fmtInt(x.err)]),
        'No traffic in this window.')));
}

// Percentiles come from the merged fixed histogram, so they are bucket upper bounds.
function percentile(bounds, counts, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (!total) return '';
  const rank = Math.max(1, Math.ceil(q * total));
  let acc = 0;
  for (let i = 0; i < counts.length; i++) {
    acc += counts[i];
    if (acc >= rank) return i < bounds.length ? '≤ ' + bounds[i] + ' ms' : '> ' + bounds[bounds.length - 1] + ' ms';
  }
  return '';
}

function latencyTable(series) {
  const rows = (series.timeSeries || []).map((ts) => {
    let bounds = [];
    let counts = [];
    let req = 0, err = 0, meanSum = 0, observed = 0;
    for (const p of ts.points || []) {
      req += num(p.requestCount);
      err += num(p.errorCount);
      const lat = p.latency || {};
      if (Array.isArray(lat.bucketBoundsMs)) bounds = lat.bucketBoundsMs;
      const c = (lat.bucketCounts || []).map(num);
      if (counts.length < c.length) counts = counts.concat(new Array(c.length - counts.length).fill(0));
      c.forEach((v, i) => { counts[i] += v; });
      const n = c.reduce((a, b) => a + b, 0);
      if (lat.meanMs !== null && lat.meanMs !== undefined) {
        meanSum += num(lat.meanMs) * n;
        observed += n;
      }
    }
    return [ts.method, fmtInt(req), fmtInt(err),
      observed ? (meanSum / observed).toFixed(1) + ' ms' : '',
      percentile(bounds, counts, 0.5), percentile(bounds, counts, 0.99)];
  });
  return table('Over the selected window; percentiles are histogram bucket bounds',
    [{ label: 'Method' }, { label: 'Requests', num: true }, { label: 'Errors', num: true },
      { label: 'Mean', num: true }, { label: 'p50', num: true }, { label: 'p99', num: true }],
    rows, 'No traffic in this window.');
}

// ------------------------------------------------------------------------------------------
// Traces: the Cloud Trace v1 read API (GET /v1/projects/P/traces[/T]) of the tracing project

const TRACE_ID = /^[0-9a-fA-F]{32}$/;
const TRACE_NAME = /^projects\/([^/]+)\/traces\/([0-9a-fA-F]{32})$/;

// A log entry's `trace` (projects/P/traces/T) as a link to that trace; anything else is no link.
function traceLink(trace) {
  const m = TRACE_NAME.exec(String(trace || ''));
  if (!m) return '';
  return h('a', { class: 'trace-link', href: routeHash({ view: 'trace', project: m[1], trace: m[2] }) },
    m[2].slice(0, 8) + '…');
}

function nanos(t) {
  // RFC 3339 with up to nanosecond fractions; Date keeps milliseconds, the rest is added back.
  const m = /^(.*?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/.exec(String(t || ''));
  if (!m) return NaN;
  const ms = Date.parse(m[1] + m[3]);
  const frac = (m[2] || '').padEnd(9, '0').slice(0, 9);
  return ms * 1e6 + Number(frac);
}

function fmtMs(ns) {
  if (!Number.isFinite(ns)) return '';
  const ms = ns / 1e6;
  return (ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2)) + ' ms';
}

// Span ids are decimal u64 strings: compared as strings, never as Numbers (2^53).
function isRootSpan(sp, ids) {
  const p = sp.parentSpanId;
  return !p || p === '0' || !ids.has(p);
}

// The trace's spans as a tree in start order: [{span, depth}], roots first.
function spanTree(spans) {
  const ids = new Set(spans.map((sp) => sp.spanId));
  const kids = new Map();
  const roots = [];
  for (const sp of spans) {
    if (isRootSpan(sp, ids)) roots.push(sp);
    else {
      if (!kids.has(sp.parentSpanId)) kids.set(sp.parentSpanId, []);
      kids.get(sp.parentSpanId).push(sp);
    }
  }
  const byStart = (a, b) => nanos(a.startTime) - nanos(b.startTime);
  const out = [];
  const seen = new Set();
  // Iterative walk; `seen` guards against a stored cycle.
  const stack = roots.sort(byStart).reverse().map((sp) => ({ span: sp, depth: 0 }));
  while (stack.length) {
    const cur = stack.pop();
    if (seen.has(cur.span.spanId)) continue;
    seen.add(cur.span.spanId);
    out.push(cur);
    const children = (kids.get(cur.span.spanId) || []).slice().sort(byStart).reverse();
    for (const c of children) stack.push({ span: c, depth: cur.depth + 1 });
  }
  return out;
}

function traceBounds(spans) {
  let start = Infinity, end = -Infinity;
  for (const sp of spans) {
    start = Math.min(start, nanos(sp.startTime));
    end = Math.max(end, nanos(sp.endTime));
  }
  return { start, end, duration: end - start };
}

// HTTP status of a trace, from its root span's labels as ESP, ESPv2 and OpenTelemetry spell it.
const STATUS_LABELS = ['/http/status_code', 'http.status_code', 'http.response.status_code'];

function spanStatus(sp) {
  const labels = (sp && sp.labels) || {};
  for (const k of STATUS_LABELS) if (labels[k]) return String(labels[k]);
  return '';
}

function statusClass(code) {
  return /^[1-5]\d\d$/.test(code) ? 'status-' + code[0] + 'xx' : '';
}

async function viewTraces(r) {
  const terms = [];
  if (r.root) terms.push('root:' + (/[\s"]/.test(r.root) ? '"' + r.root.replace(/"/g, '') + '"' : r.root));
  const minms = r.minms === '' ? null : Number(r.minms);
  if (minms !== null) {
    if (!Number.isFinite(minms) || minms < 0) {
      showError('INVALID_ARGUMENT: minimum latency must be a number of milliseconds, 0 or more.');
    } else if (minms > 0) {
      terms.push('latency:' + minms + 'ms');
    }
  }
  const path = '/v1/projects/' + enc(r.project) + '/traces?view=COMPLETE&pageSize=50' +
    (terms.length ? '&filter=' + enc(terms.join(' ')) : '');
  const body = await guarded(() => api(path), null);
  const rootInput = h('input', { id: 'trace-root', name: 'root', value: r.root, spellcheck: 'false',
    autocomplete: 'off', placeholder: 'e.g. SERVICE/METHOD or ingress' });
  const minInput = h('input', { id: 'trace-minms', name: 'minms', value: r.minms, inputmode: 'decimal',
    autocomplete: 'off', size: 6 });
  const out = [
    h('h2', {}, 'Traces'),
    h('p', { class: 'subtitle' }, 'Tracing project ', h('code', {}, r.project),
      '. Newest first, at most 50; the proxies export here (docs/tracing.md).'),
    h('form', {
      class: 'controls', id: 'trace-filter',
      onsubmit: (e) => {
        e.preventDefault();
        navigate({ root: rootInput.value.trim(), minms: minInput.value.trim() });
      },
    },
    h('label', { for: 'trace-root' }, 'Root span starts with'), rootInput,
    h('label', { for: 'trace-minms' }, 'Minimum latency (ms)'), minInput,
    h('button', { type: 'submit' }, 'Filter')),
  ];
  if (body === null) return out;
  const rows = (body.traces || []).map((t) => {
    const spans = t.spans || [];
    const ids = new Set(spans.map((sp) => sp.spanId));
    const root = spans.filter((sp) => isRootSpan(sp, ids))
      .sort((a, b) => nanos(a.startTime) - nanos(b.startTime))[0];
    const b = traceBounds(spans);
    const code = spanStatus(root);
    return [
      { value: fmtTime(root ? root.startTime : ''), class: 'nowrap' },
      h('a', { href: routeHash({ view: 'trace', project: r.project, trace: t.traceId }) },
        root ? root.name : t.traceId),
      fmtMs(b.duration),
      String(spans.length),
      { value: code, class: statusClass(code) },
    ];
  });
  out.push(h('div', { id: 'trace-list' }, table(terms.length ? 'Matching ' + terms.join(' ') : 'All traces',
    [{ label: 'Start (UTC)' }, { label: 'Root span' }, { label: 'Latency', num: true },
      { label: 'Spans', num: true }, { label: 'Status', num: true }],
    rows, terms.length ? 'No trace matches this filter.' : 'No traces stored for this project yet.')));
  return out;
}

// One trace: the span tree as a waterfall on a shared time axis; each row opens to its labels.
async function viewTrace(r) {
  const back = h('p', {}, h('a', { href: routeHash({ view: 'traces', project: r.project }) }, '← All traces'));
  if (!TRACE_ID.test(r.trace)) {
    showError('INVALID_ARGUMENT: the address names no trace id of 32 hex digits (#view=trace&trace=ID).');
    return [back, h('h2', {}, 'Trace')];
  }
  const t = await guarded(() => api('/v1/projects/' + enc(r.project) + '/traces/' + enc(r.trace)), null);
  const out = [back, h('h2', {}, 'Trace ', h('code', {}, r.trace))];
  if (t === null) return out;
  const spans = t.spans || [];
  const b = traceBounds(spans);
  const total = b.duration > 0 ? b.duration : 1;
  out.push(h('p', { class: 'subtitle' }, fmtTime(spans.length ? new Date(b.start / 1e6).toISOString() : ''),
    ' UTC · ', fmtMs(b.duration), ' · ', String(spans.length), ' spans · project ', h('code', {}, r.project)));
  const rows = spanTree(spans).map(({ span, depth }) => {
    const s0 = nanos(span.startTime) - b.start;
    const d = nanos(span.endTime) - nanos(span.startTime);
    const x = Math.max(0, Math.min(1000, (s0 / total) * 1000));
    const w = Math.max(2, Math.min(1000 - x, (d / total) * 1000));
    const labels = Object.entries(span.labels || {}).sort(([a], [b2]) => (a < b2 ? -1 : a > b2 ? 1 : 0));
    return h('details', { class: 'span-row', 'data-depth': depth },
      h('summary', {},
        h('span', { class: 'span-name depth-' + Math.min(depth, 8) }, span.name),
        s('svg', { class: 'span-bar', viewBox: '0 0 1000 12', preserveAspectRatio: 'none', 'aria-hidden': 'true' },
          s('rect', { x: x.toFixed(1), y: 1, width: w.toFixed(1), height: 10 })),
        h('span', { class: 'span-ms' }, fmtMs(d))),
      h('div', { class: 'span-detail' },
        h('p', {}, 'Span ', h('code', {}, span.spanId), ' · ', span.kind || 'SPAN_KIND_UNSPECIFIED',
          ' · starts +', fmtMs(s0), ' · ', fmtTime(span.startTime), ' UTC'),
        table('Labels', [{ label: 'Key' }, { label: 'Value' }],
          labels.map(([k, v]) => [k, h('code', {}, v)]), 'No labels.')));
  });
  out.push(h('div', { id: 'waterfall' }, rows.length ? rows : h('p', { class: 'empty' }, 'No spans.')));
  return out;
}

async function viewAccounts(r) {
  const base = '/v1/projects/' + enc(r.project) + '/serviceAccounts';
  const accounts = await guarded(() => apiAll(base, 'accounts'), null);
  const out = [h('h2', {}, 'Service accounts'),
    h('p', { class: 'subtitle' }, 'Project ', h('code', {}, r.project),
      '. Only public key ids are listed; private keys are never stored.')];
  if (accounts === null) return out;
  const rows = await Promise.all(accounts.map(async (a) => {
    const keys = await guarded(() => apiAll(base + '/' + enc(a.email) + '/keys', 'keys'), null);
    const keyList = keys === null
      ? 'unavailable'
      : keys.length
        ? h('ul', {}, keys.map((k) => h('li', {}, h('code', {}, lastSegment(k.name)),
          k.keyType ? ' (' + k.keyType + ')' : '')))
        : 'none';
    return [a.email, a.displayName || '', { value: h('code', {}, a.uniqueId || ''), class: 'nowrap' },
      a.disabled ? 'Disabled' : 'Enabled', keyList];
  }));
  out.push(table('Service accounts in ' + r.project,
    [{ label: 'Email' }, { label: 'Display name' }, { label: 'Unique ID' }, { label: 'State' },
      { label: 'Key ids' }],
    rows, 'No service accounts in project ' + r.project + '.'));
  return out;
}

function restrictionList(rs) {
  const items = [];
  for (const t of (rs && rs.apiTargets) || []) {
    items.push('API target: ' + t.service + (t.methods && t.methods.length ? ' (' + t.methods.join(', ') + ')' : ''));
  }
  const ips = rs && rs.serverKeyRestrictions && rs.serverKeyRestrictions.allowedIps;
  if (ips && ips.length) items.push('Server IPs: ' + ips.join(', '));
  const refs = rs && rs.browserKeyRestrictions && rs.browserKeyRestrictions.allowedReferrers;
  if (refs && refs.length) items.push('HTTP referrers: ' + refs.join(', '));
  const apps = rs && rs.androidKeyRestrictions && rs.androidKeyRestrictions.allowedApplications;
  if (apps && apps.length) items.push('Android apps: ' + apps.map((a) => a.packageName).join(', '));
  const ios = rs && rs.iosKeyRestrictions && rs.iosKeyRestrictions.allowedBundleIds;
  if (ios && ios.length) items.push('iOS bundle ids: ' + ios.join(', '));
  if (!items.length) return 'None (unrestricted)';
  return h('ul', {}, items.map((t) => h('li', {}, t)));
}

function showKeyButton(key) {
  const label = key.displayName || lastSegment(key.name);
  const cell = h('td', {});
  const btn = h('button', { type: 'button', 'aria-label': 'Show key string of ' + label }, 'Show key');
  let shown = null;
  btn.addEventListener('click', async () => {
    if (shown) {
      shown.remove();
      shown = null;
      btn.textContent = 'Show key';
      btn.setAttribute('aria-label', 'Show key string of ' + label);
      return;
    }
    btn.disabled = true;
    const body = await guarded(() => api('/v2/' + encPath(key.name) + '/keyString'), null);
    btn.disabled = false;
    if (!body) return;
    shown = h('code', { class: 'key-string' }, body.keyString || '');
    cell.append(shown);
    btn.textContent = 'Hide key';
    btn.setAttribute('aria-label', 'Hide key string of ' + label);
  });
  cell.append(btn);
  return cell;
}

async function viewKeys(r) {
  const keys = await guarded(() =>
    apiAll('/v2/projects/' + enc(r.project) + '/locations/global/keys', 'keys'), null);
  const out = [h('h2', {}, 'API keys'),
    h('p', { class: 'subtitle' }, 'Project ', h('code', {}, r.project),
      '. Key strings are fetched only when you ask for them.')];
  if (keys === null) return out;
  const t = table('API keys in ' + r.project,
    [{ label: 'Display name' }, { label: 'UID' }, { label: 'Key ID' }, { label: 'Restrictions' },
      { label: 'Created (UTC)' }, { label: 'Key string' }],
    keys.map((k) => [k.displayName || '', h('code', {}, k.uid || ''), h('code', {}, lastSegment(k.name)),
      restrictionList(k.restrictions), { value: fmtTime(k.createTime), class: 'nowrap' }, '']),
    'No API keys in project ' + r.project + '.');
  // The last column holds a live button; swap the placeholder cells for them.
  if (t.tagName === 'TABLE') {
    t.querySelectorAll('tbody tr').forEach((tr, i) => tr.lastElementChild.replaceWith(showKeyButton(keys[i])));
  }
  out.push(t);
  return out;
}

const VIEWS = {
  services: { title: 'Services', nav: 'services', run: viewServices },
  service: { title: 'Service', nav: 'services', run: viewService },
  accounts: { title: 'Service accounts', nav: 'accounts', run: viewAccounts },
  keys: { title: 'API keys', nav: 'keys', run: viewKeys },
  traces: { title: 'Traces', nav: 'traces', run: viewTraces },
  trace: { title: 'Trace', nav: 'traces', run: viewTrace },
};

// ------------------------------------------------------------------------------------------
// Rendering

let renderSeq = 0;

async function render() {
  const seq = ++renderSeq;
  const main = document.getElementById('main');
  const view = document.getElementById('view');
  const signedIn = Boolean(getToken());
  clearErrors();
  main.dataset.state = 'loading';
  main.setAttribute('aria-busy', 'true');
  document.getElementById('sign-in').hidden = signedIn;
  document.getElementById('nav').hidden = !signedIn;
  document.getElementById('project-form').hidden = !signedIn;
  document.getElementById('sign-out').hidden = !signedIn;
  document.getElementById('refresh').hidden = !signedIn;
  view.replaceChildren();
  if (!signedIn) {
    main.dataset.state = 'signed-out';
    main.removeAttribute('aria-busy');
    document.title = 'Sign in · Portico console';
    return;
  }
  const r = readRoute();
  document.getElementById('project').value = r.project;
  const v = VIEWS[r.view];
  for (const a of document.querySelectorAll('#nav a')) {
    a.href = routeHash({ view: a.dataset.view, project: r.project });
    if (v && a.dataset.view === v.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!v) {
    showError('NOT_FOUND: unknown view "' + r.view + '".');
    main.dataset.state = 'error';
    main.removeAttribute('aria-busy');
    return;
  }
  document.title = v.title + ' · Portico console';
  view.append(h('p', { class: 'empty' }, 'Loading…'));
  let nodes;
  try {
    nodes = await v.run(r);
  } catch (e) {
    nodes = [];
    showError('Console error: ' + e.message);
  }
  if (seq !== renderSeq) return; // a newer navigation owns the page now
  view.replaceChildren();
  appendAll(view, nodes);
  main.dataset.state = errors.length ? 'error' : 'ready';
  main.removeAttribute('aria-busy');
}

function init() {
  absorbFragmentToken();
  document.getElementById('sign-in-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = document.getElementById('token');
    const t = input.value.trim();
    input.value = '';
    if (t) setToken(t);
    render();
  });
  // Data is read once per view; this re-reads it without touching the route.
  document.getElementById('refresh').addEventListener('click', () => render());
  document.getElementById('sign-out').addEventListener('click', () => {
    setToken('');
    render();
  });
  document.getElementById('project-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const project = document.getElementById('project').value.trim() || DEFAULT_PROJECT;
    const cur = readRoute();
    // A service or a trace belongs to one project: switching project goes back to the list.
    const list = { service: 'services', trace: 'traces' };
    navigate({ project, view: list[cur.view] || cur.view, service: '', trace: '' });
  });
  window.addEventListener('hashchange', () => {
    // A token pasted into the address bar later is absorbed the same way.
    absorbFragmentToken();
    render();
  });
  render();
}

document.addEventListener('DOMContentLoaded', init);
