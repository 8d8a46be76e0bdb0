// What both pages share: building elements from data (text only, never
// HTML), formatting, the JSON API, and Feed, the live connection.
//
// Payloads are user data: every value reaches the page through
// textContent or createTextNode, never innerHTML.
"use strict";

const CAPS = (() => {
  // el("td", {className: "num"}, "3", child, ...): children are text or
  // nodes; null and undefined are left out.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "dataset") {
        Object.assign(node.dataset, value);
      } else {
        node[key] = value;
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // Replace every child of node with the given ones.
  function fill(node, ...children) {
    node.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
  }

  // A payload value as text: strings as they are, anything else as JSON.
  function text(value) {
    if (value === null || value === undefined) return "";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // Seconds since the epoch: the time of day, with the date if not today.
  function time(seconds) {
    if (typeof seconds !== "number") return "";
    const when = new Date(seconds * 1000);
    const now = new Date();
    const clock = when.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"});
    if (when.toDateString() === now.toDateString()) return clock;
    return when.toLocaleDateString([], {month: "short", day: "numeric"}) + " " + clock;
  }

  // An age in seconds: "4.2 s", "3 m 10 s", "2 h 5 m", "3 d 4 h"; "–" for none.
  function age(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    const s = Math.max(0, seconds);
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.floor(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + Math.floor(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function count(n) {
    return typeof n === "number" ? n.toLocaleString() : "–";
  }

  function rate(perSecond) {
    if (typeof perSecond !== "number" || !isFinite(perSecond)) return "–";
    if (perSecond === 0) return "0";
    if (perSecond < 10) return perSecond.toFixed(1);
    return Math.round(perSecond).toLocaleString();
  }

  async function getJSON(url) {
    const response = await fetch(url, {credentials: "same-origin", cache: "no-store"});
    if (!response.ok) {
      const error = new Error(url + ": HTTP " + response.status);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  // The connection indicator: an element with data-state="connecting",
  // "live", "reconnecting" or "failed", and its text.
  function indicator(node, state, label) {
    node.dataset.state = state;
    node.textContent = label;
    node.title = label;
  }

  // Feed: the broker's messages and queue snapshots, live, for one clientId
  // (or for everyone, the operator), across reconnects and broker restarts.
  //
  // The pages are told of each message once (by seq within one broker run,
  // and by messageId), in order, with no gap:
  //   1. /api/events?after=0 gives what is in the broker's recent log (the
  //      operator asks for the last `backlog` only), and its last seq;
  //   2. /api/stream?after=LAST goes on from there, live.
  // EventSource would reconnect by itself, but with the last seq of the old
  // broker: after a restart (seq numbers start again; or go on from the
  // store) the new broker's first messages would be skipped.  So a lost
  // stream is closed here, and once the broker answers again, Feed asks it
  // for the last message it saw: still there, same messageId, it is the
  // same broker, and the stream goes on after it; otherwise it is a new
  // broker: onReset(), then step 1 again.
  // Events per /api/events answer (the broker's limit).
  const EVENTS_PAGE = 1000;

  class Feed {
    constructor({clientId = null, backlog = null, onMessage, onQueues, onReset, onState}) {
      this.clientId = clientId;
      this.backlog = backlog;
      this.onMessage = onMessage || (() => {});
      this.onQueues = onQueues || (() => {});
      this.onReset = onReset || (() => {});
      this.onState = onState || (() => {});
      this.source = null;
      this.retry = null;
      this.watchdog = null;
      this.delay = 0;
      this.generation = 0;
      // messageIds told, oldest first: kept across broker runs (a message
      // published again with its messageId is the same message).
      this.told = new Set();
      this.forget();
    }

    // A new broker: its seq numbers mean nothing to the old ones.
    forget() {
      this.cursor = 0; // the stream goes on after this seq
      this.lastSeq = 0; // the last message told (seq, messageId)
      this.lastMessageId = null;
      this.seen = new Set();
    }

    query(extra) {
      const params = new URLSearchParams(extra);
      if (this.clientId !== null) params.set("clientId", this.clientId);
      return params.toString();
    }

    start() {
      this.onState("connecting", "connecting…");
      this.sync();
    }

    // Catch up over the JSON API, then open the stream after the cursor.
    async sync() {
      const generation = ++this.generation;
      try {
        if (this.lastSeq > 0) {
          const since = await getJSON("/api/events?" + this.query({after: this.lastSeq - 1}));
          if (generation !== this.generation) return;
          const same = since.events.some(
            (e) => e.seq === this.lastSeq && e.messageId === this.lastMessageId
          );
          if (same) {
            this.take(since.events, true);
          } else {
            this.forget();
            this.onReset();
          }
        } else if (this.cursor > 0) {
          // Nothing told yet, so nothing to recognise the broker by: start over.
          this.forget();
        }
        if (this.cursor === 0 && this.backlog !== null) {
          // Only the newest few are shown: ask for just those.
          const recent = await getJSON("/api/events?" + this.query({after: 0, tail: this.backlog}));
          if (generation !== this.generation) return;
          this.take(recent.events, true);
          if (typeof recent.last === "number") this.cursor = Math.max(this.cursor, recent.last);
        } else if (this.cursor === 0) {
          // All of the recent log that involves this client, a page at a time.
          let after = 0;
          for (;;) {
            const page = await getJSON("/api/events?" + this.query({after, limit: EVENTS_PAGE}));
            if (generation !== this.generation) return;
            this.take(page.events, true);
            if (typeof page.last === "number") after = Math.max(after, page.last);
            if (page.events.length < EVENTS_PAGE) break;
          }
          this.cursor = Math.max(this.cursor, after);
        }
      } catch (error) {
        if (generation !== this.generation) return;
        this.lost(error);
        return;
      }
      this.open(generation);
    }

    open(generation) {
      const source = new EventSource("/api/stream?" + this.query({after: this.cursor}));
      this.source = source;
      source.addEventListener("open", () => {
        if (generation !== this.generation) return;
        this.delay = 0;
        this.onState("live", "live");
      });
      source.addEventListener("message", (event) => {
        if (generation !== this.generation) return;
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (error) {
          return;
        }
        this.take([message], false);
      });
      // The stream fell so far behind that messages left the broker's
      // log before it could send them: start the view over from the log.
      source.addEventListener("reset", () => {
        if (generation !== this.generation) return;
        this.forget();
        this.onReset();
      });
      source.addEventListener("queues", (event) => {
        if (generation !== this.generation) return;
        this.feedWatchdog();
        let snapshot;
        try {
          snapshot = JSON.parse(event.data);
        } catch (error) {
          return;
        }
        this.onQueues(snapshot);
      });
      source.addEventListener("error", () => {
        if (generation !== this.generation) return;
        this.lost(null);
      });
    }

    // The broker sends queues every second: once they come, silence means a
    // dead connection that TCP has not noticed.
    feedWatchdog() {
      clearTimeout(this.watchdog);
      this.watchdog = setTimeout(() => this.lost(null), 10000);
    }

    take(messages, replayed) {
      for (const message of messages) {
        if (typeof message.seq !== "number") continue;
        if (!replayed && message.seq <= this.cursor && !this.seen.has(message.seq)) {
          // A live message below what this broker already sent: a new broker.
          this.forget();
          this.onReset();
        }
        if (this.seen.has(message.seq)) continue;
        this.seen.add(message.seq);
        this.cursor = Math.max(this.cursor, message.seq);
        if (message.seq > this.lastSeq) {
          this.lastSeq = message.seq;
          this.lastMessageId = message.messageId;
        }
        if (this.told.has(message.messageId)) continue;
        this.told.add(message.messageId);
        this.onMessage(message, replayed);
      }
      this.trim();
    }

    // Remember no more than the broker's recent log could replay.
    trim() {
      const keep = 20000;
      if (this.seen.size > 2 * keep) {
        const floor = this.cursor - keep;
        for (const seq of this.seen) if (seq < floor) this.seen.delete(seq);
      }
      if (this.told.size > 2 * keep) {
        let extra = this.told.size - keep;
        for (const id of this.told) {
          if (extra-- <= 0) break;
          this.told.delete(id);
        }
      }
    }

    // Close the stream and try again with a growing delay (0.5 s to 5 s).
    lost(error) {
      this.generation++;
      clearTimeout(this.watchdog);
      clearTimeout(this.retry);
      if (this.source) {
        this.source.close();
        this.source = null;
      }
      if (error && (error.status === 401 || error.status === 403)) {
        this.onState("failed", error.status === 401 ? "not logged in" : "not allowed");
        return;
      }
      this.onState("reconnecting", "reconnecting…");
      this.delay = Math.min(5000, this.delay ? this.delay * 2 : 500);
      this.retry = setTimeout(() => this.sync(), this.delay);
    }
  }

  return {el, fill, text, time, age, count, rate, getJSON, indicator, Feed};
})();
