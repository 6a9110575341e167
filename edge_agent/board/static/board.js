// The triage board's page. Everything a box sent is shown with textContent only: a finding
// name, reason or narrative holding markup stays text. The order of rows is the server's
// (each row carries its rank); this file only keeps it while rows arrive live.
"use strict";

(function () {
  const data = JSON.parse(document.getElementById("board-data").textContent);
  const config = data.config;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const LEVEL_TEXT = { urgent: "URGENT", review: "REVIEW", routine: "ROUTINE", not_scored: "NOT SCORED" };

  const rowsBody = document.getElementById("rows");
  const studies = new Map(); // StudyInstanceUID -> {row, el}
  let order = []; // UIDs in display order
  let clockSkew = Date.now() / 1000 - data.state.now; // browser clock minus server clock

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setText(node, text) {
    // Writing only what changed spares the browser a layout (rows arrive many a second).
    if (node.textContent !== text) node.textContent = text;
  }

  function nowServer() {
    return Date.now() / 1000 - clockSkew;
  }

  function age(seconds) {
    if (seconds < 0) seconds = 0;
    const s = Math.floor(seconds);
    if (s < 60) return s + " s";
    const m = Math.floor(s / 60);
    // Seconds only while they matter: a row whose text changes costs the browser a frame.
    if (m < 10) return m + " min " + String(s % 60).padStart(2, "0") + " s";
    if (m < 60) return m + " min";
    const h = Math.floor(m / 60);
    if (h < 24) return h + " h " + String(m % 60).padStart(2, "0") + " min";
    return Math.floor(h / 24) + " d " + (h % 24) + " h";
  }

  function clock(iso) {
    const t = new Date(iso);
    if (isNaN(t.getTime())) return String(iso || "");
    return t.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function key(row) {
    return [row.rank, -(row.complete_ts || 0)];
  }

  function before(a, b) {
    const ka = key(a), kb = key(b);
    return ka[0] < kb[0] || (ka[0] === kb[0] && ka[1] < kb[1]);
  }

  // -- one row ------------------------------------------------------------------------------
  function renderRow(row, live) {
    const tr = el("tr", "study level-" + row.triage);
    tr.dataset.studyUid = row.study_instance_uid;
    tr.dataset.triage = row.triage;
    tr.dataset.completeTs = row.complete_ts || "";
    if (row.acked_by) tr.classList.add("acked");

    const level = el("td", "level");
    level.appendChild(el("span", "badge badge-" + row.triage, LEVEL_TEXT[row.triage] || row.triage));
    if (row.demo) level.appendChild(el("span", "demo", "DEMO"));
    if (row.previous_triage && row.previous_triage !== row.triage) {
      // A level never changes silently: the row says what an earlier revision said.
      const was = (LEVEL_TEXT[row.previous_triage] || row.previous_triage).toLowerCase();
      const note = el("span", "was", "↓ was " + was);
      note.title = "an earlier revision of this study was " + was;
      level.appendChild(note);
    }
    tr.appendChild(level);

    const finding = el("td", "finding");
    if (row.triage === "not_scored") {
      finding.appendChild(el("span", "reason", row.reason || "not scored"));
    } else if (row.top_label) {
      finding.appendChild(el("span", "label", row.top_label));
      finding.appendChild(el("span", "score", Number(row.top_score).toFixed(2)));
    }
    const uid = el("div", "uid", row.study_instance_uid);
    uid.title = row.study_instance_uid;
    finding.appendChild(uid);
    if (row.accession_number) finding.appendChild(el("div", "uid", "Acc. " + row.accession_number));
    tr.appendChild(finding);

    tr.appendChild(el("td", "box", row.box));
    tr.appendChild(el("td", "modality", row.modality));

    const waiting = el("td", "age");
    if (live) {
      waiting.appendChild(el("span", "age-text"));
      waiting.appendChild(el("span", "overdue-text", "past max wait"));
    } else {
      waiting.textContent = clock(row.complete_at);
    }
    waiting.title = "complete " + row.complete_at;
    tr.appendChild(waiting);

    tr.appendChild(el("td", "revision", row.revision));

    const narrative = el("td", "narrative");
    if (row.narrative) {
      const details = el("details");
      details.appendChild(el("summary", null, "Draft narrative"));
      details.appendChild(el("p", "narrative-text", row.narrative));
      details.appendChild(el("p", "disclaimer", row.narrative_disclaimer));
      narrative.appendChild(details);
    } else if (row.narrative_status) {
      narrative.appendChild(el("span", "muted", row.narrative_status === "pending" ? "pending…" : row.narrative_status));
    }
    tr.appendChild(narrative);

    const acked = el("td", "ack");
    if (row.acked_by) {
      acked.appendChild(el("span", "acked-by", row.acked_by));
      acked.appendChild(el("span", "acked-at", clock(row.acked_at)));
    } else if (row.triage === "urgent" && live) {
      const button = el("button", "ack-button", "Acknowledge");
      button.type = "button";
      button.dataset.action = "ack";
      button.addEventListener("click", function () { acknowledge(row, button); });
      acked.appendChild(button);
    }
    tr.appendChild(acked);

    const open = el("td", "open");
    if (row.viewer_url) {
      const link = el("a", null, "Open");
      link.href = row.viewer_url;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      open.appendChild(link);
    }
    tr.appendChild(open);
    if (live) tick(tr, row);
    return tr;
  }

  function tick(tr, row, text) {
    text = text || tr.querySelector(".age-text");
    if (!text) return;
    const waited = row.complete_ts ? nowServer() - row.complete_ts : 0;
    setText(text, age(waited)); // most rows' text changes once a minute
    const overdue = !row.acked_by && waited > config.max_wait_seconds;
    if (tr.classList.contains("overdue") !== overdue) tr.classList.toggle("overdue", overdue);
  }

  // -- the worklist -------------------------------------------------------------------------
  function upsert(row) {
    const uid = row.study_instance_uid;
    const old = studies.get(uid);
    const wasUrgentUnacked = old && old.row.rank === 0;
    const wasOpen = old && old.el.querySelector("details[open]") !== null;
    if (old) {
      old.el.remove();
      order.splice(order.indexOf(uid), 1);
    }
    let lo = 0, hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (before(studies.get(order[mid]).row, row)) lo = mid + 1; else hi = mid;
    }
    const tr = renderRow(row, true);
    const details = tr.querySelector("details");
    if (wasOpen && details) details.open = true; // a narrative the user opened stays open
    const next = order[lo];
    rowsBody.insertBefore(tr, next ? studies.get(next).el : null);
    order.splice(lo, 0, uid);
    studies.set(uid, { row: row, el: tr, age: tr.querySelector(".age-text") });
    // The page holds as many rows as the server sends on a load: the last one goes (never
    // an unacknowledged urgent one, which sort first).
    while (order.length > config.max_rows && studies.get(order[order.length - 1]).row.rank > 0) {
      studies.get(order[order.length - 1]).el.remove();
      studies.delete(order.pop());
    }
    return row.rank === 0 && !wasUrgentUnacked;
  }

  function loadStudies(list) {
    rowsBody.textContent = "";
    studies.clear();
    order = [];
    const fragment = document.createDocumentFragment();
    for (const row of list) {
      const tr = renderRow(row, true);
      fragment.appendChild(tr);
      studies.set(row.study_instance_uid, { row: row, el: tr, age: tr.querySelector(".age-text") });
      order.push(row.study_instance_uid);
    }
    rowsBody.appendChild(fragment);
    summarize();
  }

  function summarize() {
    let urgent = 0, review = 0;
    for (const uid of order) {
      const r = studies.get(uid).row;
      if (r.rank === 0) urgent += 1;
      if (r.triage === "review") review += 1;
    }
    setText(document.getElementById("counts"),
      urgent + " urgent unacknowledged · " + review + " review · " + order.length + " studies");
    document.getElementById("empty").hidden = order.length > 0;
    const title = urgent ? "(" + urgent + " URGENT) Triage board" : "Triage board";
    if (document.title !== title) document.title = title;
    document.body.classList.toggle("has-urgent", urgent > 0);
  }

  // -- acknowledge --------------------------------------------------------------------------
  async function acknowledge(row, button) {
    button.disabled = true;
    button.textContent = "Sending…";
    try {
      const response = await fetch("/api/ack", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ study_instance_uid: row.study_instance_uid, alert_id: row.alert_id }),
        credentials: "same-origin",
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || response.statusText);
      upsert(body);
      summarize();
      refreshAudit();
    } catch (err) {
      button.disabled = false;
      button.textContent = "Acknowledge";
      button.title = "Not acknowledged: " + err.message;
      button.classList.add("failed");
    }
  }

  // -- boxes, rejected files, audit ---------------------------------------------------------
  const boxes = new Map();

  function renderBox(box) {
    const div = el("div", "box-card state-" + box.state);
    div.dataset.box = box.box;
    div.dataset.state = box.state;
    const head = el("div", "box-head");
    head.appendChild(el("span", "box-name", box.box));
    head.appendChild(el("span", "state", box.state));
    if (box.demo) head.appendChild(el("span", "demo", "DEMO"));
    div.appendChild(head);
    if (box.state === "offline") div.appendChild(el("div", "problem", "Offline: its scanner's studies are not being triaged"));
    if (box.model) div.appendChild(el("div", "muted", box.model + " " + (box.model_version || "")));
    const facts = el("div", "facts");
    facts.appendChild(el("span", null, "outbox " + (box.outbox_depth ?? "?")));
    const unacked = el("span", box.urgent_unacknowledged ? "hot" : null, "urgent unacked " + (box.urgent_unacknowledged ?? "?"));
    facts.appendChild(unacked);
    const seen = el("span", "seen");
    seen.dataset.seen = box.seen_age_ts;
    facts.appendChild(seen);
    div.appendChild(facts);
    return div;
  }

  function upsertBox(box) {
    const container = document.getElementById("boxes");
    const old = boxes.get(box.box);
    if (box.removed) {
      if (old) old.remove();
      boxes.delete(box.box);
      return;
    }
    const div = renderBox(box);
    if (old) container.replaceChild(div, old);
    else container.appendChild(div);
    boxes.set(box.box, div);
    tickBoxes();
  }

  function tickBoxes() {
    for (const div of boxes.values()) {
      const seen = div.querySelector(".seen");
      setText(seen, "seen " + age(nowServer() - Number(seen.dataset.seen)) + " ago");
    }
  }

  function rejectedRow(item) {
    const tr = el("tr");
    tr.appendChild(el("td", null, item.box));
    tr.appendChild(el("td", null, clock(new Date(item.received_ts * 1000).toISOString())));
    tr.appendChild(el("td", null, item.reason));
    tr.appendChild(el("td", "uid", item.path || item.file_id || item.sop_instance_uid || ""));
    return tr;
  }

  function loadRejected(list) {
    const body = document.getElementById("rejected");
    body.textContent = "";
    for (const item of list) body.appendChild(rejectedRow(item));
  }

  function loadAudit(list) {
    const body = document.getElementById("audit");
    body.textContent = "";
    for (const item of list) {
      const tr = el("tr");
      tr.appendChild(el("td", null, clock(item.at)));
      tr.appendChild(el("td", null, item.user));
      tr.appendChild(el("td", "uid", item.study_instance_uid));
      tr.appendChild(el("td", "uid", item.alert_id));
      tr.appendChild(el("td", null, item.outcome));
      body.appendChild(tr);
    }
  }

  async function refreshAudit() {
    const state = await fetchState();
    if (state) loadAudit(state.audit);
  }

  function setBroker(connected) {
    const node = document.getElementById("broker");
    node.dataset.connected = connected ? "yes" : "no";
    node.textContent = connected ? "broker connected" : "broker unreachable";
    document.getElementById("broker-down").hidden = connected;
  }

  function loadState(state) {
    clockSkew = Date.now() / 1000 - state.now;
    loadStudies(state.studies);
    document.getElementById("boxes").textContent = "";
    boxes.clear();
    for (const box of state.boxes) upsertBox(box);
    loadRejected(state.rejected);
    loadAudit(state.audit);
    setBroker(state.broker.connected);
  }

  async function fetchState() {
    const response = await fetch("/api/state", { credentials: "same-origin" });
    if (response.status === 401) {
      window.location.href = "/login";
      return null;
    }
    return response.ok ? response.json() : null;
  }

  // -- search -------------------------------------------------------------------------------
  document.getElementById("search").addEventListener("submit", async function (event) {
    event.preventDefault();
    const q = new FormData(event.target).get("q").trim();
    if (!q) return;
    const response = await fetch("/api/search?q=" + encodeURIComponent(q), { credentials: "same-origin" });
    const body = await response.json();
    const tbody = document.getElementById("search-rows");
    tbody.textContent = "";
    for (const row of body.studies || []) tbody.appendChild(renderRow(row, false));
    document.getElementById("search-empty").hidden = (body.studies || []).length > 0;
    document.getElementById("search-results").hidden = false;
  });
  document.getElementById("search-close").addEventListener("click", function () {
    document.getElementById("search-results").hidden = true;
  });

  // -- sound --------------------------------------------------------------------------------
  let audio = null;
  const soundButton = document.getElementById("sound");
  if (!config.sound) soundButton.hidden = true;
  function setSound(on) {
    if (on && !audio) audio = new (window.AudioContext || window.webkitAudioContext)();
    soundButton.setAttribute("aria-pressed", on ? "true" : "false");
    soundButton.textContent = on ? "Sound: on" : "Sound: off";
    try { localStorage.setItem("edge-board-sound", on ? "on" : "off"); } catch (e) { /* private mode */ }
  }
  soundButton.addEventListener("click", function () {
    setSound(soundButton.getAttribute("aria-pressed") !== "true");
  });
  function beep() {
    if (!audio || soundButton.getAttribute("aria-pressed") !== "true") return;
    for (const start of [0, 0.25]) {
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.frequency.value = 880;
      gain.gain.value = 0.15;
      osc.connect(gain).connect(audio.destination);
      osc.start(audio.currentTime + start);
      osc.stop(audio.currentTime + start + 0.15);
    }
  }

  // -- live ---------------------------------------------------------------------------------
  // Rows arriving within BATCH_MS are put in the page together: one layout and paint for
  // all of them instead of one each (at 20 results a second, most of a page's CPU). A new
  // urgent row is put in at once, with whatever waits.
  const BATCH_MS = 200;
  const pending = new Map();
  let flushTimer = null;

  function receive(row) {
    pending.set(row.study_instance_uid, row);
    const old = studies.get(row.study_instance_uid);
    if (row.rank === 0 && !(old && old.row.rank === 0)) {
      flush();
    } else if (flushTimer === null) {
      flushTimer = setTimeout(flush, BATCH_MS);
    }
  }

  function flush() {
    if (flushTimer !== null) clearTimeout(flushTimer);
    flushTimer = null;
    let urgent = false;
    for (const row of pending.values()) urgent = upsert(row) || urgent;
    pending.clear();
    summarize();
    if (urgent) beep();
  }

  let opened = false;
  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("open", async function () {
      if (opened) {
        const state = await fetchState(); // events may have been missed while away
        if (state) {
          pending.clear();
          loadState(state);
        }
      }
      opened = true;
    });
    source.addEventListener("study", function (event) { receive(JSON.parse(event.data)); });
    source.addEventListener("box", function (event) { upsertBox(JSON.parse(event.data)); });
    source.addEventListener("rejected", function (event) {
      const body = document.getElementById("rejected");
      body.insertBefore(rejectedRow(JSON.parse(event.data)), body.firstChild);
    });
    source.addEventListener("broker", function (event) { setBroker(JSON.parse(event.data).connected); });
    source.addEventListener("error", function () {
      setBroker(false);
      document.getElementById("broker").textContent = "board unreachable";
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(async function () { if (await fetchState()) connect(); }, 2000);
      }
    });
  }

  loadState(data.state);
  performance.mark("board-rendered"); // first render done (benchmarks/board.py reads it)
  connect();
  setInterval(function () {
    for (const uid of order) {
      const entry = studies.get(uid);
      tick(entry.el, entry.row, entry.age);
    }
    tickBoxes();
  }, 1000);
})();
