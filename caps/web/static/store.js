// A retailer's page, /store/<clientId>: the store's orders as they move
// pickup → in-transit → delivered, newest first, one row per order.  What
// happened while the page was closed comes first (the broker's recent
// log), then it goes on live; Feed tells each message once.
"use strict";

(() => {
  const {el, fill, text, time, count, indicator, Feed} = CAPS;

  const STEPS = ["pickup", "in-transit", "delivered"];
  const LABELS = {pickup: "awaiting pickup", "in-transit": "in transit", delivered: "delivered"};
  const FRESH_FOR = 3000; // ms a row stays highlighted after a live change

  const status = document.getElementById("status");
  const notice = document.getElementById("notice");
  const body = document.querySelector("#orders tbody");
  const appLine = document.getElementById("app");
  const caughtUp = document.getElementById("caught-up");

  const prefix = "/store/";
  const path = location.pathname;
  let clientId = "";
  try {
    clientId = decodeURIComponent(path.startsWith(prefix) ? path.slice(prefix.length) : "").replace(/\/+$/, "");
  } catch (error) {
    clientId = "";
  }

  // orderId → {key, orderId, status, rank, time, seq, driver, customer, address, row, cells}
  const orders = new Map();
  let replayedCount = 0;
  let dirty = false;

  function makeRow(order) {
    const cells = {
      order: el("td", {className: "id", dataset: {label: "order"}}),
      status: el("td", {dataset: {label: "status"}}),
      driver: el("td", {dataset: {label: "driver"}}),
      customer: el("td", {dataset: {label: "customer"}}),
      time: el("td", {className: "when", dataset: {label: "updated"}}),
    };
    order.cells = cells;
    order.row = el("tr", {}, cells.order, cells.status, cells.driver, cells.customer, cells.time);
  }

  function draw(order) {
    const {cells} = order;
    cells.order.textContent = order.orderId;
    const steps = el("span", {className: "steps", ariaHidden: "true"});
    for (const [i, step] of STEPS.entries()) {
      steps.append(el("span", {className: i < order.rank ? "step done" : "step"}));
    }
    fill(cells.status, steps, el("span", {className: "badge", dataset: {status: order.status}}, LABELS[order.status]));
    cells.driver.textContent = order.driver || "–";
    cells.customer.textContent = order.customer || "–";
    if (order.address) cells.customer.title = order.address;
    cells.time.textContent = time(order.time);
    order.row.dataset.status = order.status;
    order.row.dataset.orderId = order.orderId;
  }

  function flash(row) {
    row.classList.remove("fresh");
    void row.offsetWidth; // restart the animation
    row.classList.add("fresh");
    clearTimeout(row.freshTimer);
    row.freshTimer = setTimeout(() => row.classList.remove("fresh"), FRESH_FOR);
  }

  function take(message, replayed) {
    const rank = STEPS.indexOf(message.event) + 1;
    if (rank === 0) return; // not an order's step
    const payload = message.payload && typeof message.payload === "object" ? message.payload : {};
    if (payload.orderId === undefined || payload.orderId === null) return;
    const key = text(payload.orderId);
    let order = orders.get(key);
    if (!order) {
      order = {key, orderId: key, status: null, rank: 0, time: 0, seq: 0};
      makeRow(order);
      orders.set(key, order);
    }
    // The furthest step is the order's status (a late in-transit does not
    // undo a delivery); its time is that of the latest news.
    if (rank >= order.rank) {
      order.rank = rank;
      order.status = message.event;
    }
    if (typeof message.time === "number" && message.time >= order.time) {
      order.time = message.time;
      order.seq = message.seq;
    }
    for (const field of ["driver", "customer", "address"]) {
      if (payload[field] !== undefined && payload[field] !== null) order[field] = text(payload[field]);
    }
    draw(order);
    if (replayed) {
      replayedCount++;
    } else {
      flash(order.row);
    }
    schedule();
  }

  function schedule() {
    if (!dirty) {
      dirty = true;
      requestAnimationFrame(render);
    }
  }

  // Newest first: the order whose latest news is latest on top.
  function render() {
    dirty = false;
    const sorted = [...orders.values()].sort((a, b) => b.time - a.time || b.seq - a.seq);
    body.append(...sorted.map((o) => o.row)); // moves the rows, keeps them
    const counts = {all: sorted.length, pickup: 0, "in-transit": 0, delivered: 0};
    for (const o of sorted) counts[o.status]++;
    for (const node of document.querySelectorAll("[data-count]")) {
      node.textContent = count(counts[node.dataset.count]);
    }
    document.getElementById("orders-empty").hidden = sorted.length > 0;
  }

  // The store's own queues: is its vendor app connected, and how much waits for it.
  function showQueues(snapshot) {
    const mine = (snapshot.queues || []).filter((q) => q.clientId === clientId && !String(q.event).endsWith(".dead"));
    if (!mine.length) {
      appLine.hidden = true;
      return;
    }
    const waiting = mine.reduce((n, q) => n + (q.depth || 0) + (q.inFlight || 0), 0);
    const connected = mine.some((q) => q.consumers > 0);
    appLine.dataset.connected = connected ? "yes" : "no";
    appLine.textContent =
      (connected ? "Your vendor app is connected" : "Your vendor app is not connected") +
      (waiting ? "; " + count(waiting) + " update" + (waiting === 1 ? "" : "s") + " waiting for it." : ".");
    appLine.hidden = false;
  }

  if (!clientId) {
    document.getElementById("store-name").textContent = "(no store)";
    indicator(status, "failed", "no store in the address");
    notice.textContent = "Open /store/<your clientId>.";
    notice.hidden = false;
    return;
  }

  document.getElementById("store-name").textContent = clientId;
  document.title = clientId + " · deliveries";

  let first = true;
  const feed = new Feed({
    clientId,
    onMessage: take,
    onQueues: showQueues,
    onReset: () => {
      // A new broker: its log starts again, the orders already seen stay.
      notice.textContent = "The broker restarted at " + time(Date.now() / 1000) + "; orders since then follow.";
      notice.hidden = false;
    },
    onState: (state, label) => {
      indicator(status, state, label);
      document.body.dataset.connection = state;
      if (state === "live" && first) {
        first = false;
        caughtUp.textContent =
          replayedCount === 1
            ? "1 update from before this page opened; live since " + time(Date.now() / 1000) + "."
            : count(replayedCount) + " updates from before this page opened; live since " + time(Date.now() / 1000) + ".";
      }
    },
  });
  feed.start();
})();
