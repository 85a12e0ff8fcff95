// fhirgate review page: lists the patient's prior-auth items live, shows one
// item's determination, the notes' facts, the editable rationale and the PDF
// packet, and submits the packet back into the chart.
//
// Plain DOM code with no dependencies. Everything is built with
// createElement/textContent (never innerHTML) so server text cannot inject
// markup, and nothing relies on inline scripts or styles (strict CSP).
'use strict';

(function () {
  const STATUS_TEXT = {
    processing: 'Processing',
    ready: 'Ready for review',
    submitted: 'Submitted',
    failed: 'Failed',
  };
  const PRIOR_AUTH_TEXT = {
    needed: 'Prior auth needed',
    satisfied: 'Prior auth criteria met',
    'not-needed': 'No prior auth needed',
    unknown: 'Prior auth undetermined',
  };
  const CRITERION_MARK = {
    met: { mark: '✓', label: 'Met' },
    unmet: { mark: '✗', label: 'Not met' },
    unknown: { mark: '?', label: 'Unknown' },
  };

  const state = {
    session: null,
    items: new Map(), // id -> Summary
    selectedId: null,
    detail: null, // detail of the selected item
    loadSeq: 0, // guards against out-of-order detail loads
    savedText: '', // rationale as last saved/loaded for the selected item
    drafts: new Map(), // id -> unsaved rationale text kept across re-renders
    saving: null, // Promise of an in-flight save
    submitting: null, // id of the item being submitted
    expired: false,
    listShown: false, // the first list render happened
    events: null,
    eventsRetry: null,
    hadError: false,
    seen: new Set(), // "id:status" pairs already announced
  };

  const $ = (sel, root) => (root || document).querySelector(sel);

  // ---------- small DOM helper ----------

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === null || value === undefined || value === false) continue;
        if (key === 'class') el.className = value;
        else if (key === 'text') el.textContent = value;
        else if (key === 'dataset') Object.assign(el.dataset, value);
        else if (key.startsWith('on') && typeof value === 'function') {
          el.addEventListener(key.slice(2), value);
        } else if (key in el && typeof value !== 'string') el[key] = value;
        else el.setAttribute(key, value === true ? '' : String(value));
      }
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(el, child);
      else if (child instanceof Node) el.appendChild(child);
      else el.appendChild(document.createTextNode(String(child)));
    }
  }

  // ---------- formatting ----------

  function humanize(value) {
    if (value === null || value === undefined || value === '') return '';
    const text = String(value).replace(/[_-]+/g, ' ').trim();
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  function lowerHumanize(value) {
    if (value === null || value === undefined) return '';
    return String(value).replace(/[_-]+/g, ' ').trim();
  }

  function statusText(status) {
    return STATUS_TEXT[status] || humanize(status) || 'Unknown';
  }

  function duration(days) {
    if (days === null || days === undefined || days === '') return '';
    const n = Number(days);
    if (!Number.isFinite(n)) return String(days);
    if (n !== 0 && n % 7 === 0) {
      const weeks = n / 7;
      return weeks === 1 ? '1 week' : `${weeks} weeks`;
    }
    return n === 1 ? '1 day' : `${n} days`;
  }

  const dateTimeFmt = new Intl.DateTimeFormat(undefined, {
    dateStyle: 'medium',
    timeStyle: 'short',
  });
  const timeFmt = new Intl.DateTimeFormat(undefined, { timeStyle: 'short' });

  function parseDate(value) {
    if (!value) return null;
    const d = new Date(value);
    return Number.isNaN(d.getTime()) ? null : d;
  }

  function formatDateTime(value) {
    const d = parseDate(value);
    return d ? dateTimeFmt.format(d) : value || '';
  }

  function formatWhen(value) {
    const d = parseDate(value);
    if (!d) return value || '';
    const now = new Date();
    if (d.toDateString() === now.toDateString()) return `Today ${timeFmt.format(d)}`;
    return dateTimeFmt.format(d);
  }

  function timeEl(value, formatter) {
    const d = parseDate(value);
    return h('time', { datetime: d ? d.toISOString() : value || '', title: d ? d.toLocaleString() : null },
      (formatter || formatDateTime)(value));
  }

  function badge(status) {
    const s = STATUS_TEXT[status] ? status : 'unknown';
    return h('span', { class: `badge badge-${s}` }, statusText(status));
  }

  // ---------- live announcements ----------

  function announce(message, assertive) {
    const region = assertive ? $('#alerter') : $('#announcer');
    // Clear first so repeating the same message is still announced.
    region.textContent = '';
    window.setTimeout(() => { region.textContent = message; }, 50);
  }

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, options) {
    const opts = Object.assign({ method: 'GET' }, options || {});
    const init = {
      method: opts.method,
      credentials: 'same-origin',
      headers: { Accept: 'application/json' },
      cache: 'no-store',
    };
    if (opts.body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(opts.body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, 'The gateway could not be reached. Check the connection and try again.');
    }
    let body = null;
    const text = await res.text();
    if (text) {
      try { body = JSON.parse(text); } catch (_) { body = null; }
    }
    if (res.status === 401) {
      showExpired(body && body.error);
      throw new ApiError(401, (body && body.error) || 'Session expired');
    }
    if (!res.ok) {
      throw new ApiError(res.status, (body && body.error) || `Request failed (HTTP ${res.status})`);
    }
    return body;
  }

  const itemUrl = (id) => `/app/api/transactions/${encodeURIComponent(id)}`;

  // ---------- session ----------

  function showExpired(detail) {
    if (state.expired) return;
    state.expired = true;
    if (state.events) { state.events.close(); state.events = null; }
    window.clearTimeout(state.eventsRetry);
    $('#main').hidden = true;
    $('#expired').hidden = false;
    $('#expired-detail').textContent = detail ? `Details: ${detail}` : '';
    $('#context').textContent = 'No active session';
    setLive('off', 'Offline');
  }

  function renderSession(s) {
    const ctx = $('#context');
    ctx.textContent = '';
    const parts = [h('span', { class: 'ctx-item' }, h('span', { class: 'ctx-label' }, 'Patient '), s.patient || '—')];
    if (s.encounter) parts.push(h('span', { class: 'ctx-item' }, h('span', { class: 'ctx-label' }, 'Encounter '), s.encounter));
    if (s.practitioner) parts.push(h('span', { class: 'ctx-item' }, h('span', { class: 'ctx-label' }, 'Reviewer '), s.practitioner));
    if (s.expires) {
      parts.push(h('span', { class: 'ctx-item' }, h('span', { class: 'ctx-label' }, 'Session until '),
        timeEl(s.expires, formatWhen)));
    }
    append(ctx, parts);
    $('#dev-mode').hidden = s.mode !== 'dev';
    if (s.tenant) document.title = `Prior authorization review · ${s.tenant} · fhirgate`;
  }

  // ---------- list ----------

  function sortedItems() {
    return Array.from(state.items.values()).sort((a, b) => {
      const ta = parseDate(a.created), tb = parseDate(b.created);
      return (tb ? tb.getTime() : 0) - (ta ? ta.getTime() : 0);
    });
  }

  function renderList() {
    const list = $('#items');
    const focusedId = document.activeElement && list.contains(document.activeElement)
      ? document.activeElement.dataset.id : null;
    const items = sortedItems();
    const seen = new Set();
    let prev = null;
    for (const item of items) {
      seen.add(item.id);
      let li = list.querySelector(`li[data-item="${CSS.escape(item.id)}"]`);
      if (!li) {
        li = h('li', { class: 'item-row', dataset: { item: item.id } });
        li.appendChild(buildItemButton(item));
        if (state.listShown) {
          // Highlight items that arrive live, not the ones present at load.
          li.classList.add('is-new');
          window.setTimeout(() => li.classList.remove('is-new'), 1600);
        }
      } else {
        const old = li.firstElementChild;
        const fresh = buildItemButton(item);
        li.replaceChild(fresh, old);
        if (focusedId === item.id) fresh.focus();
      }
      const expectedNext = prev ? prev.nextElementSibling : list.firstElementChild;
      if (expectedNext !== li) list.insertBefore(li, expectedNext);
      prev = li;
    }
    for (const li of Array.from(list.children)) {
      if (!seen.has(li.dataset.item)) li.remove();
    }
    state.listShown = true;
    $('#items-empty').hidden = items.length > 0;
    $('#items-count').textContent = items.length ? String(items.length) : '';
  }

  function buildItemButton(item) {
    const selected = item.id === state.selectedId;
    const meta = [];
    if (item.payer) meta.push(h('span', null, item.payer));
    const when = item.updated || item.created;
    if (when) meta.push(timeEl(when, formatWhen));
    const btn = h('button', {
      type: 'button',
      class: `item${selected ? ' is-selected' : ''} item-${item.status}`,
      dataset: { id: item.id, status: item.status },
      'aria-current': selected ? 'true' : null,
      onclick: () => selectItem(item.id, { user: true }),
      onkeydown: onItemKeydown,
    },
    h('span', { class: 'item-top' },
      h('span', { class: 'item-title' }, item.title || 'Untitled order'),
      badge(item.status)),
    h('span', { class: 'item-meta' }, joinWithDots(meta)),
    item.priorAuth ? h('span', { class: `item-pa pa-${item.priorAuth}` }, PRIOR_AUTH_TEXT[item.priorAuth] || humanize(item.priorAuth)) : null,
    item.status === 'failed' && item.reason ? h('span', { class: 'item-reason' }, item.reason) : null);
    return btn;
  }

  function joinWithDots(nodes) {
    const out = [];
    nodes.forEach((n, i) => {
      if (i) out.push(h('span', { class: 'sep', 'aria-hidden': 'true' }, ' · '));
      out.push(n);
    });
    return out;
  }

  function onItemKeydown(event) {
    // Buttons already activate on Enter and Space; arrows move between items.
    const keys = ['ArrowDown', 'ArrowUp', 'Home', 'End'];
    if (!keys.includes(event.key)) return;
    const buttons = Array.from($('#items').querySelectorAll('button.item'));
    const i = buttons.indexOf(event.currentTarget);
    let next = null;
    if (event.key === 'ArrowDown') next = buttons[Math.min(i + 1, buttons.length - 1)];
    if (event.key === 'ArrowUp') next = buttons[Math.max(i - 1, 0)];
    if (event.key === 'Home') next = buttons[0];
    if (event.key === 'End') next = buttons[buttons.length - 1];
    if (next) { event.preventDefault(); next.focus(); }
  }

  function upsertSummary(summary) {
    if (!summary || !summary.id) return;
    const prev = state.items.get(summary.id) || {};
    state.items.set(summary.id, Object.assign({}, prev, pickSummary(summary)));
  }

  function pickSummary(obj) {
    const keys = ['id', 'encounter', 'status', 'reason', 'title', 'payer', 'priorAuth', 'created', 'updated'];
    const out = {};
    for (const k of keys) if (k in obj) out[k] = obj[k];
    return out;
  }

  // ---------- selection & detail ----------

  async function selectItem(id, opts) {
    const options = opts || {};
    const changed = state.selectedId !== id;
    if (changed) {
      keepDraft();
      state.selectedId = id;
      state.detail = null;
      renderList();
      renderDetailLoading();
    }
    // An item already shown is kept fresh by live events: no need to reload it.
    if (changed || !state.detail || state.detail.id !== id) await loadDetail(id, { keepDraft: !changed });
    if (options.user && window.matchMedia('(max-width: 860px)').matches) {
      const heading = $('#detail-title');
      if (heading) {
        heading.focus({ preventScroll: true });
        $('#detail').scrollIntoView({ behavior: 'smooth', block: 'start' });
      }
    }
  }

  function keepDraft() {
    const ta = $('#rationale');
    if (ta && state.selectedId && !ta.readOnly && ta.value !== state.savedText) {
      state.drafts.set(state.selectedId, ta.value);
    }
  }

  async function loadDetail(id, opts) {
    const seq = ++state.loadSeq;
    try {
      const detail = await api(itemUrl(id));
      if (seq !== state.loadSeq || state.selectedId !== id) return detail;
      upsertSummary(detail);
      if (opts && opts.keepDraft) keepDraft();
      state.detail = detail;
      renderList();
      renderDetail(detail);
      return detail;
    } catch (err) {
      if (err.status === 401) return null;
      if (seq === state.loadSeq && state.selectedId === id) renderDetailError(err);
      return null;
    }
  }

  function renderDetailLoading() {
    const pane = $('#detail');
    pane.textContent = '';
    pane.setAttribute('aria-busy', 'true');
    pane.appendChild(h('div', { class: 'placeholder' }, h('p', { class: 'placeholder-title' }, 'Loading…')));
  }

  function renderDetailError(err) {
    const pane = $('#detail');
    pane.removeAttribute('aria-busy');
    pane.textContent = '';
    pane.appendChild(h('div', { class: 'placeholder' },
      h('p', { class: 'placeholder-title' }, 'This item could not be loaded'),
      h('p', null, err.message),
      h('button', { type: 'button', class: 'btn', onclick: () => state.selectedId && loadDetail(state.selectedId) }, 'Try again')));
  }

  function renderDetail(d) {
    const pane = $('#detail');
    const hadFocusInPane = pane.contains(document.activeElement) ? document.activeElement.id : null;
    pane.removeAttribute('aria-busy');

    const status = d.status;
    const editable = status === 'ready';
    const frag = document.createDocumentFragment();

    // Header: title, status, meta.
    const meta = [];
    if (d.payer) meta.push(h('div', null, h('dt', null, 'Payer'), h('dd', null, d.payer)));
    if (d.priorAuth) meta.push(h('div', null, h('dt', null, 'Prior auth'), h('dd', null, PRIOR_AUTH_TEXT[d.priorAuth] || humanize(d.priorAuth))));
    if (d.encounter) meta.push(h('div', null, h('dt', null, 'Encounter'), h('dd', { class: 'mono' }, d.encounter)));
    if (d.created) meta.push(h('div', null, h('dt', null, 'Created'), h('dd', null, timeEl(d.created))));
    if (d.updated) meta.push(h('div', null, h('dt', null, 'Updated'), h('dd', null, timeEl(d.updated))));

    frag.appendChild(h('header', { class: 'detail-head' },
      h('div', { class: 'detail-title-row' },
        h('h2', { id: 'detail-title', tabindex: '-1' }, d.title || 'Untitled order'),
        h('span', { id: 'status', class: `badge badge-lg badge-${STATUS_TEXT[status] ? status : 'unknown'}` }, statusText(status))),
      h('dl', { class: 'meta' }, meta)));

    if (status === 'failed') {
      frag.appendChild(h('div', { class: 'callout callout-error', role: 'alert' },
        h('strong', null, 'Processing failed. '), d.reason || 'No reason was given.'));
    } else if (status === 'processing') {
      frag.appendChild(h('div', { class: 'callout callout-info' },
        h('span', { class: 'spinner', 'aria-hidden': 'true' }),
        'Gathering the chart and checking the payer policy. This page updates by itself when the item is ready.'));
    } else if (status === 'submitted') {
      const when = d.submitted || d.submittedAt || d.updated;
      frag.appendChild(h('div', { class: 'callout callout-success', id: 'sent', tabindex: '-1' },
        h('span', { class: 'callout-mark', 'aria-hidden': 'true' }, '✓'),
        h('span', null, h('strong', null, 'Sent to the chart'), when ? [' on ', timeEl(when)] : null, '.')));
    }

    frag.appendChild(renderDeterminations(d));
    frag.appendChild(renderFacts(d));
    frag.appendChild(renderRationale(d, editable));
    frag.appendChild(renderPacket(d));
    frag.appendChild(renderActions(d));

    pane.textContent = '';
    pane.appendChild(frag);
    pane.dataset.updated = d.updated || '';
    pane.dataset.id = d.id || '';
    pane.setAttribute('aria-labelledby', 'detail-title');
    pane.removeAttribute('aria-label');

    if (hadFocusInPane) {
      const again = document.getElementById(hadFocusInPane);
      if (again && !again.disabled) again.focus({ preventScroll: true });
    }
  }

  // Determinations and the nested criteria checklist.
  function renderDeterminations(d) {
    const dets = Array.isArray(d.determinations) ? d.determinations : [];
    const section = h('section', { class: 'card', 'aria-labelledby': 'det-heading' },
      h('h3', { id: 'det-heading' }, dets.length > 1 ? 'Determinations' : 'Determination'));
    const wrap = h('div', { id: 'checklist', class: 'checklist' });
    if (!dets.length) {
      wrap.appendChild(h('p', { class: 'muted' },
        d.status === 'processing' ? 'The determination appears once processing finishes.' : 'No determination was recorded for this item.'));
    }
    const facts = Array.isArray(d.facts) ? d.facts : [];
    dets.forEach((det, i) => {
      const counts = { met: 0, unmet: 0, unknown: 0 };
      if (det.criteria) countLeaves(det.criteria, counts);
      const total = counts.met + counts.unmet + counts.unknown;
      const headId = `det-${i}-title`;
      const block = h('article', { class: 'determination', 'aria-labelledby': headId },
        h('div', { class: 'det-head' },
          h('h4', { id: headId }, det.rule_title || det.order || 'Payer rule'),
          h('div', { class: 'det-tags' },
            det.coverage ? h('span', { class: `tag tag-cov-${det.coverage}` }, `Coverage: ${lowerHumanize(det.coverage)}`) : null,
            det.prior_auth ? h('span', { class: `tag tag-pa-${det.prior_auth}` }, PRIOR_AUTH_TEXT[det.prior_auth] || humanize(det.prior_auth)) : null)),
        h('p', { class: 'det-sub muted small' },
          joinWithDots([det.payer ? h('span', null, `${det.payer} policy`) : null, det.order ? h('span', { class: 'mono' }, det.order) : null].filter(Boolean))),
        det.reason ? h('p', { class: 'det-reason' }, det.reason) : null,
        total ? h('p', { class: 'det-summary small' }, `${counts.met} of ${total} criteria met` +
          (counts.unmet ? `, ${counts.unmet} not met` : '') + (counts.unknown ? `, ${counts.unknown} unknown` : '')) : null,
        det.criteria ? h('ul', { class: 'criteria', 'aria-label': `Criteria for ${det.rule_title || 'this rule'}` }, renderCriterion(det.criteria, facts)) : null,
        listBlock('Missing', det.missing, 'list-missing'),
        listBlock('Documentation to include', det.documentation, 'list-docs'));
      wrap.appendChild(block);
    });
    section.appendChild(wrap);
    return section;
  }

  function countLeaves(c, counts) {
    const parts = Array.isArray(c.parts) ? c.parts : [];
    if (!parts.length) {
      const k = counts[c.status] !== undefined ? c.status : 'unknown';
      counts[k] += 1;
      return;
    }
    parts.forEach((p) => countLeaves(p, counts));
  }

  function renderCriterion(c, facts) {
    const info = CRITERION_MARK[c.status] || CRITERION_MARK.unknown;
    const st = CRITERION_MARK[c.status] ? c.status : 'unknown';
    const parts = Array.isArray(c.parts) ? c.parts : [];
    const evidence = Array.isArray(c.evidence) ? c.evidence : [];
    return h('li', { class: `criterion crit-${st}` },
      h('div', { class: 'crit-row' },
        h('span', { class: 'crit-mark', role: 'img', 'aria-label': info.label, title: info.label }, info.mark),
        h('div', { class: 'crit-body' },
          h('span', { class: 'crit-label' }, c.label || 'Criterion'),
          c.detail ? h('span', { class: 'crit-detail small' }, c.detail) : null,
          evidence.length ? h('span', { class: 'crit-evidence small' },
            h('span', { class: 'muted' }, 'Evidence: '),
            evidence.map((e) => evidenceChip(e, facts))) : null)),
      parts.length ? h('ul', { class: 'criteria criteria-nested' }, parts.map((p) => renderCriterion(p, facts))) : null);
  }

  function evidenceChip(ref, facts) {
    // "note DocumentReference/9 [10..42]" can be matched to a fact's quote.
    let quote = null;
    const m = /^note\s+(\S+)\s+\[(\d+)\.\.(\d+)\]$/.exec(String(ref));
    if (m) {
      const fact = facts.find((f) => f.note === m[1] && Number(f.start) === Number(m[2]) && Number(f.end) === Number(m[3]));
      if (fact && fact.text) quote = fact.text;
    }
    return h('span', { class: 'chip mono', title: quote ? `“${quote}”` : null }, String(ref));
  }

  function listBlock(title, entries, cls) {
    if (!Array.isArray(entries) || !entries.length) return null;
    return h('div', { class: `det-list ${cls}` },
      h('p', { class: 'det-list-title' }, title),
      h('ul', null, entries.map((e) => h('li', null, String(e)))));
  }

  // Facts extracted from the notes.
  function renderFacts(d) {
    const facts = Array.isArray(d.facts) ? d.facts : [];
    const section = h('section', { class: 'card', 'aria-labelledby': 'facts-heading' },
      h('h3', { id: 'facts-heading' }, 'What the notes say'));
    if (!facts.length) {
      section.appendChild(h('p', { class: 'muted', id: 'facts-empty' },
        d.status === 'processing' ? 'Facts appear once the notes have been read.' : 'No relevant facts were found in the notes.'));
      return section;
    }
    const rows = facts.map((f) => {
      const source = f.note
        ? [h('span', { class: 'mono' }, f.note), (f.start !== null && f.start !== undefined && f.end !== null && f.end !== undefined) ? h('span', { class: 'mono muted' }, ` [${f.start}..${f.end}]`) : null]
        : '—';
      const dash = () => h('span', { class: 'muted' }, '—');
      return h('tr', null,
        h('th', { scope: 'row' }, humanize(f.kind) || '—'),
        h('td', { 'data-label': 'Detail' }, f.value ? lowerHumanize(f.value) : dash()),
        h('td', { class: 'nowrap', 'data-label': 'Duration' }, f.days !== null && f.days !== undefined ? duration(f.days) : dash()),
        h('td', { class: 'nowrap', 'data-label': 'Date' }, f.date || dash()),
        h('td', { 'data-label': 'Quote' }, f.text ? h('q', { class: 'quote' }, f.text) : dash()),
        h('td', { class: 'small', 'data-label': 'Source' }, h('span', null, source)));
    });
    section.appendChild(h('div', { class: 'table-wrap', role: 'region', 'aria-labelledby': 'facts-heading', tabindex: '0' },
      h('table', { id: 'facts', class: 'facts' },
        h('caption', { class: 'visually-hidden' }, 'Facts extracted from the clinical notes'),
        h('thead', null, h('tr', null,
          h('th', { scope: 'col' }, 'Finding'),
          h('th', { scope: 'col' }, 'Detail'),
          h('th', { scope: 'col' }, 'Duration'),
          h('th', { scope: 'col' }, 'Date'),
          h('th', { scope: 'col' }, 'Quoted text'),
          h('th', { scope: 'col' }, 'Source'))),
        h('tbody', null, rows))));
    return section;
  }

  // Rationale: editable while ready.
  function renderRationale(d, editable) {
    const server = typeof d.rationale === 'string' ? d.rationale : '';
    if (!editable && !server.trim()) {
      state.savedText = '';
      return h('section', { class: 'card', 'aria-labelledby': 'rationale-heading' },
        h('h3', { id: 'rationale-heading' }, 'Rationale'),
        h('p', { class: 'muted' }, d.status === 'processing'
          ? 'The rationale appears once the notes have been read.'
          : 'No rationale was extracted for this item.'),
        d.extractor && d.status !== 'processing' ? h('p', { class: 'small muted extractor', id: 'extractor' }, `Rationale extracted by ${d.extractor}`) : null);
    }
    let value = server;
    state.savedText = server;
    if (editable && state.drafts.has(d.id)) value = state.drafts.get(d.id);
    state.drafts.delete(d.id);

    const ta = h('textarea', {
      id: 'rationale',
      class: 'rationale',
      rows: String(Math.min(14, Math.max(6, value.split('\n').length + 1))),
      spellcheck: 'true',
      'aria-describedby': 'rationale-help rationale-state',
    });
    ta.value = value;
    ta.readOnly = !editable;
    // aria-disabled rather than disabled so keyboard focus stays on the button after saving.
    const saveBtn = h('button', { type: 'button', class: 'btn', id: 'save-rationale', 'aria-disabled': value === server ? 'true' : 'false' }, 'Save rationale');
    const stateEl = h('span', { id: 'rationale-state', class: 'small muted', 'aria-live': 'polite' },
      editable ? (value === server ? '' : 'Unsaved changes') : '');

    ta.addEventListener('input', () => {
      const dirty = ta.value !== state.savedText;
      saveBtn.setAttribute('aria-disabled', dirty ? 'false' : 'true');
      stateEl.textContent = dirty ? 'Unsaved changes' : '';
      stateEl.classList.remove('is-error');
    });
    ta.addEventListener('blur', (event) => {
      // Auto-save on blur, unless focus moves to a button that saves or submits anyway.
      const to = event.relatedTarget;
      if (to && (to.id === 'submit' || to.id === 'save-rationale')) return;
      if (ta.value !== state.savedText && !state.submitting) saveRationale();
    });
    saveBtn.addEventListener('click', () => saveRationale());

    const extractor = d.extractor ? h('p', { class: 'small muted extractor', id: 'extractor' }, `Rationale extracted by ${d.extractor}`) : null;
    return h('section', { class: 'card', 'aria-labelledby': 'rationale-heading' },
      h('h3', { id: 'rationale-heading' }, h('label', { for: 'rationale' }, 'Rationale')),
      h('p', { id: 'rationale-help', class: 'small muted' }, editable
        ? 'Medical-necessity rationale drawn from the notes. Edit it before submitting; it is included in the packet.'
        : d.status === 'submitted' ? 'Rationale as submitted with the packet.' : 'The rationale can be edited while the item is ready for review.'),
      ta,
      h('div', { class: 'row' }, editable ? saveBtn : null, stateEl, h('span', { class: 'spacer' }), extractor));
  }

  async function saveRationale() {
    const id = state.selectedId;
    const ta = $('#rationale');
    if (!id || !ta || ta.readOnly) return;
    if (state.saving) await state.saving.catch(() => {});
    if (state.submitting === id) return;
    const text = ta.value;
    if (text === state.savedText) {
      const el = $('#rationale-state');
      if (el) el.textContent = 'No changes to save';
      return;
    }
    const stateEl = $('#rationale-state');
    if (stateEl) { stateEl.textContent = 'Saving…'; stateEl.classList.remove('is-error'); }
    const run = (async () => {
      try {
        const detail = await api(`${itemUrl(id)}/rationale`, { method: 'PUT', body: { rationale: text } });
        if (state.selectedId !== id) return;
        if (detail && detail.id) {
          upsertSummary(detail);
          renderList();
        }
        if (detail && detail.id && detail.status !== 'ready') {
          keepDraft();
          state.detail = detail;
          renderDetail(detail);
          return;
        }
        if (detail && detail.id) state.detail = detail;
        // The server may normalise the text; adopt it unless the user typed on.
        const current = $('#rationale');
        const saved = detail && typeof detail.rationale === 'string' ? detail.rationale : text;
        state.savedText = saved;
        if (current && current.value === text && saved !== text) current.value = saved;
        const dirty = current ? current.value !== state.savedText : false;
        const btn = $('#save-rationale');
        if (btn) btn.setAttribute('aria-disabled', dirty ? 'false' : 'true');
        const el = $('#rationale-state');
        if (el) el.textContent = dirty ? 'Unsaved changes' : `Saved at ${timeFmt.format(new Date())}`;
        const ex = $('#extractor');
        if (ex && detail && detail.extractor) ex.textContent = `Rationale extracted by ${detail.extractor}`;
        reloadPacket();
      } catch (err) {
        if (err.status === 401) return;
        const el = $('#rationale-state');
        if (el) { el.textContent = `Not saved: ${err.message}`; el.classList.add('is-error'); }
        announce(`Rationale not saved: ${err.message}`, true);
        if (err.status === 409) loadDetail(id, { keepDraft: true });
      }
    })();
    state.saving = run;
    try { await run; } finally { if (state.saving === run) state.saving = null; }
  }

  // Packet PDF.
  function renderPacket(d) {
    const section = h('section', { class: 'card', 'aria-labelledby': 'packet-heading' },
      h('div', { class: 'card-head' },
        h('h3', { id: 'packet-heading' }, 'Packet'),
        d.packetUrl ? h('a', { class: 'btn btn-small', id: 'open-packet', href: d.packetUrl, target: '_blank', rel: 'noopener' }, 'Open PDF',
          h('span', { class: 'visually-hidden' }, ' (opens in a new tab)')) : null));
    if (!d.packetUrl) {
      section.appendChild(h('p', { class: 'muted' },
        d.status === 'processing' ? 'The PDF packet is built once processing finishes.' : 'No packet is available for this item.'));
      return section;
    }
    const frame = h('iframe', { id: 'packet', class: 'packet', title: 'Packet PDF' });
    // The fragment only tells the browser's PDF viewer how to open it (page width, no thumbnails).
    frame.setAttribute('src', d.packetUrl.includes('#') ? d.packetUrl : `${d.packetUrl}#view=FitH&navpanes=0`);
    section.appendChild(frame);
    return section;
  }

  // The packet is rebuilt when the rationale changes: load the frame again.
  function reloadPacket() {
    const frame = $('#packet');
    if (!frame) return;
    const src = frame.getAttribute('src');
    const fresh = h('iframe', { id: 'packet', class: 'packet', title: 'Packet PDF' });
    fresh.setAttribute('src', src);
    frame.replaceWith(fresh);
  }

  // Submit bar.
  function renderActions(d) {
    const status = d.status;
    const busy = state.submitting === d.id;
    const canSubmit = status === 'ready' && !busy;
    let label = 'Submit to chart';
    if (busy) label = 'Submitting…';
    else if (status === 'submitted') label = 'Submitted';
    const btn = h('button', {
      type: 'button',
      id: 'submit',
      class: `btn btn-primary${status === 'submitted' ? ' is-done' : ''}`,
      disabled: !canSubmit,
      'aria-busy': busy ? 'true' : null,
      'aria-describedby': 'submit-help',
    }, label);
    btn.addEventListener('click', onSubmit);
    let help;
    if (status === 'ready') help = busy ? 'Writing the packet into the chart…' : 'Writes the packet and rationale into the patient’s chart.';
    else if (status === 'submitted') help = 'The packet is in the chart.';
    else if (status === 'processing') help = 'Available once the item is ready for review.';
    else if (status === 'failed') help = 'A failed item cannot be submitted.';
    else help = 'This item cannot be submitted.';
    return h('div', { class: 'actions' },
      h('p', { id: 'submit-help', class: 'small muted' }, help),
      h('p', { id: 'submit-error', class: 'small error', role: 'alert', hidden: true }),
      btn);
  }

  async function onSubmit(event) {
    const btn = event.currentTarget;
    const id = state.selectedId;
    if (!id || btn.disabled || state.submitting) return;
    // Disable synchronously: a second click in the same tick is ignored.
    btn.disabled = true;
    btn.setAttribute('aria-busy', 'true');
    btn.textContent = 'Submitting…';
    state.submitting = id;
    const errEl = $('#submit-error');
    if (errEl) { errEl.hidden = true; errEl.textContent = ''; }
    const ta = $('#rationale');
    const text = ta ? ta.value : (state.detail && state.detail.rationale) || '';
    const title = (state.items.get(id) || {}).title || 'Item';
    try {
      if (state.saving) await state.saving.catch(() => {});
      const result = await api(`${itemUrl(id)}/submit`, { method: 'POST', body: { rationale: text } });
      if (result && result.id) upsertSummary(result);
      else if (result && result.status) upsertSummary(Object.assign({ id }, result));
      state.drafts.delete(id);
      const done = result && result.status === 'submitted';
      if (done) {
        state.submitting = null;
        announceOnce(id, 'submitted', `${title}: sent to the chart.`);
      } else {
        // Accepted but still being written: keep the button disabled until the
        // transaction.submitted/failed event (or a later look) says how it went.
        announce(`${title}: submission accepted, writing to the chart…`);
        window.setTimeout(() => {
          if (state.submitting !== id) return;
          state.submitting = null;
          if (state.selectedId === id) loadDetail(id);
        }, 30000);
      }
      renderList();
      if (state.selectedId === id) {
        await loadDetail(id);
        // The button was disabled under the keyboard focus: move focus to the result.
        if (document.activeElement === document.body || !document.activeElement) {
          const sent = $('#sent') || $('#detail-title');
          if (sent) sent.focus({ preventScroll: true });
        }
      }
    } catch (err) {
      state.submitting = null;
      if (err.status === 401) return;
      announce(`Submit failed: ${err.message}`, true);
      if (state.selectedId === id) {
        if (ta && !ta.readOnly) state.drafts.set(id, text);
        await loadDetail(id);
        const e2 = $('#submit-error');
        if (e2) { e2.textContent = `Not submitted: ${err.message}`; e2.hidden = false; }
      }
    }
  }

  // ---------- live updates (SSE) ----------

  function setLive(kind, text) {
    const live = $('#live');
    live.dataset.state = kind;
    $('#live-text').textContent = text;
  }

  function pulseLive() {
    const live = $('#live');
    live.classList.remove('pulse');
    void live.offsetWidth; // restart the animation
    live.classList.add('pulse');
  }

  function connectEvents() {
    if (state.expired || typeof window.EventSource !== 'function') return;
    if (state.events) state.events.close();
    setLive('connecting', state.hadError ? 'Reconnecting…' : 'Connecting…');
    const es = new EventSource('/events');
    state.events = es;
    es.addEventListener('open', () => {
      setLive('live', 'Live');
      if (state.hadError) {
        state.hadError = false;
        refreshList(); // catch up on anything missed while disconnected
      }
    });
    es.addEventListener('error', () => {
      if (state.expired) return;
      state.hadError = true;
      setLive('reconnecting', 'Reconnecting…');
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. HTTP error): check the session, then retry.
        window.clearTimeout(state.eventsRetry);
        state.eventsRetry = window.setTimeout(async () => {
          try {
            await api('/app/api/session');
            connectEvents();
          } catch (err) {
            if (err.status !== 401) state.eventsRetry = window.setTimeout(connectEvents, 5000);
          }
        }, 3000);
      }
    });
    es.addEventListener('heartbeat', () => {
      if ($('#live').dataset.state !== 'live') setLive('live', 'Live');
      pulseLive();
    });
    for (const name of ['transaction.ready', 'transaction.submitted', 'transaction.failed']) {
      es.addEventListener(name, (ev) => onTransactionEvent(name.slice('transaction.'.length), ev));
    }
  }

  async function onTransactionEvent(kind, ev) {
    let summary;
    try { summary = JSON.parse(ev.data); } catch (_) { return; }
    if (!summary || typeof summary.id !== 'string') return;
    if (state.session && state.session.patient && summary.patient && summary.patient !== state.session.patient) return;
    // Only keep items this session can actually read.
    let detail;
    try {
      detail = await api(itemUrl(summary.id));
    } catch (_) {
      return;
    }
    if (!detail || !detail.id) return;
    upsertSummary(detail);
    const isSelected = state.selectedId === detail.id;
    if (state.submitting === detail.id && detail.status !== 'ready') state.submitting = null;
    if (isSelected) {
      keepDraft();
      state.detail = detail;
      renderDetail(detail);
    }
    renderList();
    const title = detail.title || 'An item';
    const status = detail.status || kind;
    if (status === 'ready') announceOnce(detail.id, 'ready', `${title} is ready for review.`);
    else if (status === 'submitted') announceOnce(detail.id, 'submitted', `${title}: sent to the chart.`);
    else if (status === 'failed') announceOnce(detail.id, 'failed', `${title} failed${detail.reason ? `: ${detail.reason}` : '.'}`, true);
    if (!state.selectedId && status === 'ready') selectItem(detail.id);
  }

  function announceOnce(id, status, message, assertive) {
    const key = `${id}:${status}`;
    if (state.seen.has(key)) return;
    state.seen.add(key);
    announce(message, assertive);
  }

  async function refreshList() {
    try {
      const data = await api('/app/api/transactions');
      const items = (data && Array.isArray(data.items)) ? data.items : [];
      const ids = new Set(items.map((i) => i.id));
      for (const id of Array.from(state.items.keys())) if (!ids.has(id)) state.items.delete(id);
      items.forEach(upsertSummary);
      for (const it of items) state.seen.add(`${it.id}:${it.status}`);
      renderList();
      if (state.selectedId && ids.has(state.selectedId)) loadDetail(state.selectedId, { keepDraft: true });
      return items;
    } catch (err) {
      if (err.status !== 401) announce(`Could not refresh the list: ${err.message}`);
      return null;
    }
  }

  // ---------- start ----------

  async function start() {
    try {
      state.session = await api('/app/api/session');
    } catch (err) {
      if (err.status !== 401) {
        $('#context').textContent = `Could not load the session: ${err.message}`;
        setLive('off', 'Offline');
      }
      return;
    }
    renderSession(state.session);

    let items = [];
    try {
      const data = await api('/app/api/transactions');
      items = (data && Array.isArray(data.items)) ? data.items : [];
    } catch (err) {
      if (err.status === 401) return;
      $('#items-empty').hidden = false;
      $('#items-empty').textContent = `Could not load items: ${err.message}`;
    }
    items.forEach(upsertSummary);
    for (const it of items) state.seen.add(`${it.id}:${it.status}`);
    renderList();

    const sorted = sortedItems();
    const first = sorted.find((i) => i.status === 'ready') || sorted[0];
    if (first) selectItem(first.id);
    connectEvents();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
