// The gallery's keys. The page holds no logic of its own: every decision is a POST to /api/decide with the
// state each tile showed, and a tile changes only once the server has committed it.
"use strict";
(function () {
  const grid = document.getElementById("grid");
  if (!grid) return;
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const digits = JSON.parse(grid.dataset.digits || "{}");
  const message = document.getElementById("message");
  const counts = document.getElementById("counts");
  const sessionLine = document.getElementById("session");
  const tiles = Array.from(grid.querySelectorAll(".tile"));
  const selected = new Set();
  const history = [];
  const session = { keep: 0, delete: 0, relabel: 0, started: Date.now() };
  let cursor = 0;
  let anchor = null;

  function say(text) { message.textContent = text; }
  function columns() {
    if (tiles.length < 2) return 1;
    const top = tiles[0].offsetTop;
    const n = tiles.findIndex((t) => t.offsetTop !== top);
    return n === -1 ? tiles.length : n;
  }
  function draw() {
    tiles.forEach((t, i) => {
      t.classList.toggle("cursor", i === cursor);
      t.classList.toggle("selected", selected.has(i));
    });
    if (tiles[cursor]) tiles[cursor].scrollIntoView({ block: "nearest" });
    const minutes = Math.max((Date.now() - session.started) / 60000, 1 / 60);
    const done = session.keep + session.delete + session.relabel;
    sessionLine.textContent = `this session: ${session.keep} kept, ${session.delete} deleted, ` +
      `${session.relabel} relabelled, ${(done / minutes).toFixed(1)}/min`;
  }
  function move(to, extend) {
    to = Math.max(0, Math.min(tiles.length - 1, to));
    if (extend) {
      if (anchor === null) anchor = cursor;
      selected.clear();
      for (let i = Math.min(anchor, to); i <= Math.max(anchor, to); i++) selected.add(i);
    } else {
      anchor = null;
    }
    cursor = to;
    draw();
  }
  function chosen() {
    return selected.size ? Array.from(selected).sort((a, b) => a - b) : [cursor];
  }
  // The tile as the server says the image is now; returns the change in the reviewed count.
  function show(tile, state) {
    const delta = (state.reviewed ? 1 : 0) - (tile.classList.contains("reviewed") ? 1 : 0);
    tile.dataset.status = state.status;
    tile.dataset.labelId = state.label_id === null ? "" : state.label_id;
    tile.className = tile.className.replace(/status-\S+/, "status-" + state.status);
    tile.classList.toggle("reviewed", state.reviewed);
    tile.querySelector(".label").textContent = state.label || "";
    tile.querySelector(".status").textContent = state.status;
    reviewedCount(delta);
  }
  function reviewedCount(delta) {
    const reviewed = Number(counts.dataset.reviewed) + delta;
    counts.dataset.reviewed = reviewed;
    counts.textContent = `${reviewed} reviewed / ${Number(counts.dataset.total) - reviewed} remaining`;
  }
  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST", headers: { "content-type": "application/json", "x-fastclass-csrf": csrf },
      body: JSON.stringify(body), credentials: "same-origin",
    });
    let data = {};
    try { data = await response.json(); } catch (e) { data = { error: await response.text() }; }
    return { ok: response.ok, status: response.status, data };
  }
  async function decideOn(action, label) {
    if (!tiles.length) return;
    const picked = chosen();
    const images = picked.map((i) => ({
      id: Number(tiles[i].dataset.id), status: tiles[i].dataset.status,
      label_id: tiles[i].dataset.labelId === "" ? null : Number(tiles[i].dataset.labelId),
    }));
    const { ok, data } = await post("/api/decide", { images, action, label });
    if (!ok) {
      say(data.error || "refused");
      if (data.state) {
        const tile = tiles.find((t) => Number(t.dataset.id) === data.state.id);
        if (tile) show(tile, data.state);
      }
      return;
    }
    data.decided.forEach((state) => show(tiles.find((t) => Number(t.dataset.id) === state.id), state));
    history.push({ action, reviews: data.decided.map((d) => d.review) });
    session[action] += data.decided.length;
    say(`${data.decided.length} image(s): ${action}${label ? " " + label : ""} saved`);
    selected.clear();
    if (picked.length === 1) move(cursor + 1, false); else draw();
  }
  async function undoLast() {
    const last = history.pop();
    if (!last) { say("nothing to undo on this page (`fastclass reviews` lists older decisions)"); return; }
    const { ok, data } = await post("/api/undo", { reviews: last.reviews });
    (data.undone || []).forEach((state) => {
      const tile = tiles.find((t) => Number(t.dataset.id) === state.id);
      if (tile) show(tile, state);
    });
    if (!ok) { say(data.error || "refused"); return; }
    session[last.action] -= data.undone.length;
    say(`undid ${last.action} of ${data.undone.length} image(s)`);
    draw();
  }
  function relabelByTyping() {
    const dialog = document.getElementById("relabel");
    const input = document.getElementById("relabel-input");
    input.value = "";
    dialog.showModal();
    dialog.onclose = () => { if (dialog.returnValue !== "cancel" && input.value.trim()) decideOn("relabel", input.value.trim()); };
    input.onkeydown = (e) => { if (e.key === "Escape") { dialog.returnValue = "cancel"; } };
  }
  // What others decided since the page loaded: the visible tiles' states, polled; a changed tile is outlined.
  async function follow() {
    if (!tiles.length || document.hidden) return;
    try {
      const ids = tiles.map((t) => t.dataset.id).join(",");
      const response = await fetch("/api/tiles?ids=" + ids, { credentials: "same-origin" });
      if (!response.ok) return;
      (await response.json()).tiles.forEach((state) => {
        const tile = tiles.find((t) => Number(t.dataset.id) === state.id);
        const labelId = state.label_id === null ? "" : String(state.label_id);
        if (tile && (tile.dataset.status !== state.status || tile.dataset.labelId !== labelId ||
                     tile.classList.contains("reviewed") !== state.reviewed)) {
          show(tile, state);
          tile.classList.add("live");
        }
      });
    } catch (e) { /* the server is away for a moment: try again at the next tick */ }
  }
  setInterval(follow, Number(grid.dataset.liveMs) || 3000);
  tiles.forEach((tile, i) => {
    tile.addEventListener("click", (e) => {
      if (e.shiftKey || e.ctrlKey || e.metaKey) { selected.has(i) ? selected.delete(i) : selected.add(i); }
      cursor = i; draw();
    });
    tile.addEventListener("dblclick", () => { window.location = "/image/" + tile.dataset.id; });
  });
  document.addEventListener("keydown", (e) => {
    if (document.querySelector("dialog[open]")) {
      if (e.key === "Escape" || e.key === "?") document.querySelectorAll("dialog[open]").forEach((d) => d.close("cancel"));
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const cols = columns();
    const key = e.key;
    let handled = true;
    if (key === "ArrowLeft" || key === "h") move(cursor - 1, e.shiftKey);
    else if (key === "ArrowRight" || key === "l") move(cursor + 1, e.shiftKey);
    else if (key === "ArrowDown" || key === "j") move(cursor + cols, e.shiftKey);
    else if (key === "ArrowUp") move(cursor - cols, e.shiftKey);
    else if (key === "x" || key === " ") { selected.has(cursor) ? selected.delete(cursor) : selected.add(cursor); draw(); }
    else if (key === "a") { if (selected.size === tiles.length) selected.clear(); else tiles.forEach((_, i) => selected.add(i)); draw(); }
    else if (key === "k") decideOn("keep");
    else if (key === "d") decideOn("delete");
    else if (/^[1-9]$/.test(key) && digits[key]) decideOn("relabel", digits[key]);
    else if (key === "r") relabelByTyping();
    else if (key === "s") {
      const suggested = tiles[cursor] && tiles[cursor].dataset.suggested;
      if (suggested) decideOn("relabel", suggested); else say("no suggested label for this image");
    }
    else if (key === "u") undoLast();
    else if (key === "Enter") { if (tiles[cursor]) window.location = "/image/" + tiles[cursor].dataset.id; }
    else if (key === "?") document.getElementById("help").showModal();
    else handled = false;
    if (handled) e.preventDefault();
  });
  draw();
})();
