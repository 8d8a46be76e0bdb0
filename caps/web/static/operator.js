// The operator's page: every queue, the totals, the connected clients and
// the latest messages, live from /api/stream; clients from /api/clients.
"use strict";

(() => {
  const {el, fill, text, time, age, count, rate, getJSON, indicator, Feed} = CAPS;

  const RATE_WINDOW = 5; // seconds of snapshots a rate is measured over
  const RECENT_ROWS = 50;
  const CLIENTS_EVERY = 2000;

  const status = document.getElementById("status");
  const notice = document.getElementById("notice");
  const queuesBody = document.querySelector("#queues tbody");
  const clientsBody = document.querySelector("#clients tbody");
  const recentBody = document.querySelector("#recent tbody");
  const updated = document.getElementById("updated");

  // Rates: per queue (and for the totals), the snapshots of the last few
  // seconds' counters, {time, published, delivered}.
  let history = new Map();
  let recent = []; // newest first

  function measure(key, sample) {
    let samples = history.get(key) || [];
    const last = samples[samples.length - 1];
    if (last && (sample.published < last.published || sample.delivered < last.delivered)) {
      samples = []; // counters went back: a new broker
    }
    samples.push(sample);
    while (samples.length > 2 && sample.time - samples[0].time > RATE_WINDOW) samples.shift();
    history.set(key, samples);
    const first = samples[0];
    const span = sample.time - first.time;
    if (samples.length < 2 || span <= 0) return {published: null, delivered: null};
    return {
      published: (sample.published - first.published) / span,
      delivered: (sample.delivered - first.delivered) / span,
    };
  }

  function cell(value, className) {
    return el("td", className ? {className} : {}, value);
  }

  function showQueues(snapshot) {
    const now = typeof snapshot.time === "number" ? snapshot.time : Date.now() / 1000;
    const totals = snapshot.totals || {};
    for (const node of document.querySelectorAll("[data-total]")) {
      const name = node.dataset.total;
      if (name !== "publishRate") node.textContent = count(totals[name]);
    }
    const overall = measure("\u0000totals", {
      time: now,
      published: totals.published || 0,
      delivered: totals.delivered || 0,
    });
    document.querySelector('[data-total="publishRate"]').textContent = rate(overall.published);

    const queues = (snapshot.queues || []).slice().sort(
      (a, b) => text(a.clientId).localeCompare(text(b.clientId)) || text(a.event).localeCompare(text(b.event))
    );
    const live = new Set(["\u0000totals"]);
    const rows = queues.map((q) => {
      const key = text(q.clientId) + "\u0000" + text(q.event);
      live.add(key);
      const rates = measure(key, {time: now, published: q.published || 0, delivered: q.delivered || 0});
      const classes = [];
      if (q.deadLetters > 0) classes.push("has-dead");
      if (q.depth > 0 && !q.consumers) classes.push("unconsumed");
      return el(
        "tr",
        {className: classes.join(" ")},
        cell(text(q.clientId), "id"),
        cell(text(q.event)),
        cell(count(q.depth), "num"),
        cell(count(q.inFlight), "num"),
        cell(count(q.deadLetters), q.deadLetters > 0 ? "num warn" : "num"),
        cell(count(q.consumers), "num"),
        cell(age(q.oldestAge), "num"),
        cell(rate(rates.published), "num"),
        cell(rate(rates.delivered), "num")
      );
    });
    for (const key of history.keys()) if (!live.has(key)) history.delete(key);
    fill(queuesBody, ...rows);
    document.getElementById("queues-empty").hidden = rows.length > 0;
    document.getElementById("queue-count").textContent = rows.length ? "(" + rows.length + ")" : "";
    updated.textContent = "Updated " + time(now);
  }

  function showClients(body) {
    const clients = (body.clients || []).slice().sort(
      (a, b) => text(a.clientId).localeCompare(text(b.clientId)) || text(a.address).localeCompare(text(b.address))
    );
    const rows = clients.map((c) => {
      const subscriptions = el("ul", {className: "subs"});
      for (const s of c.subscriptions || []) {
        const mine = s.clientId === c.clientId;
        subscriptions.append(el("li", {}, mine ? text(s.event) : text(s.clientId) + " / " + text(s.event)));
      }
      return el(
        "tr",
        {},
        cell(text(c.address), "id"),
        cell(c.clientId === null || c.clientId === undefined ? "–" : text(c.clientId)),
        el("td", {}, subscriptions),
        cell(count(c.inFlight), "num")
      );
    });
    fill(clientsBody, ...rows);
    document.getElementById("clients-empty").hidden = rows.length > 0;
    document.getElementById("client-count").textContent = rows.length ? "(" + rows.length + ")" : "";
  }

  async function pollClients() {
    try {
      showClients(await getJSON("/api/clients"));
    } catch (error) {
      // The connection indicator tells; the table keeps what it had.
    }
    setTimeout(pollClients, CLIENTS_EVERY);
  }

  function messageRow(m, fresh) {
    const payload = text(m.payload);
    return el(
      "tr",
      {className: fresh ? "fresh" : ""},
      cell(count(m.seq), "num"),
      cell(time(m.time)),
      cell(text(m.event)),
      cell(m.sender === null || m.sender === undefined ? "–" : text(m.sender), "id"),
      cell((m.recipients || []).map(text).join(", ") || "–", "id"),
      el("td", {className: "payload", title: payload}, payload.length > 160 ? payload.slice(0, 160) + "…" : payload)
    );
  }

  let pending = [];
  let scheduled = false;

  function showMessage(message, replayed) {
    pending.push([message, !replayed]);
    // A hidden tab draws nothing (no animation frames): keep what it would show.
    if (pending.length > 2 * RECENT_ROWS) pending = pending.slice(-RECENT_ROWS);
    if (!scheduled) {
      scheduled = true;
      requestAnimationFrame(flush);
    }
  }

  // Messages that arrive together (a replay) are drawn at once, on top;
  // the rows already there stay (moving them would replay their highlight).
  function flush() {
    scheduled = false;
    const rows = pending.slice(-RECENT_ROWS).map(([message, fresh]) => messageRow(message, fresh));
    pending = [];
    rows.reverse();
    recentBody.prepend(...rows);
    recent = rows.concat(recent);
    for (const row of recent.splice(RECENT_ROWS)) row.remove();
    document.getElementById("recent-empty").hidden = recent.length > 0;
  }

  function reset() {
    history = new Map();
    recent = [];
    pending = [];
    fill(recentBody);
    document.getElementById("recent-empty").hidden = false;
    notice.textContent = "The broker restarted at " + time(Date.now() / 1000) + ": counts and rates start again.";
    notice.hidden = false;
  }

  const feed = new Feed({
    backlog: RECENT_ROWS,
    onMessage: showMessage,
    onQueues: showQueues,
    onReset: reset,
    onState: (state, label) => {
      indicator(status, state, label);
      document.body.dataset.connection = state;
    },
  });
  feed.start();
  pollClients();
})();
