// The page at `/`: a thin view over meeting-client.js. It never builds HTML from
// strings (textContent only), so message text cannot inject markup; with the CSP
// (`default-src 'self'`) nothing but these files runs here.
import { ApiError, MeetingClient, uuid4 } from "./meeting-client.js";

const $ = (id) => document.getElementById(id);
const byTestId = (name) => document.querySelector(`[data-testid="${name}"]`);
const client = new MeetingClient();
const users = new Map();      // id -> Promise<user>
const known = new Set();      // ids of people to show presence for
let presenceTimer = null;
let firstSync = true;
let historyShown = false;     // GET /messages went through since the last login or reload

const STATUS_TEXT = { connecting: "Connecting…", connected: "Connected", reconnecting: "Reconnecting…", offline: "Offline" };

function show(el, visible) {
  el.hidden = !visible;
}

function setError(el, message) {
  el.textContent = message || "";
  show(el, Boolean(message));
}

function describe(error) {
  if (error instanceof ApiError) {
    if (error.code === "invalid_credentials") return "Wrong username or password.";
    if (error.code === "username_taken") return "That username is taken.";
    if (error.code === "validation_error" && error.details) {
      return Object.entries(error.details).map(([field, problems]) => `${field}: ${[].concat(problems).join(" ")}`).join("; ");
    }
    return error.message;
  }
  return "The server cannot be reached; try again.";
}

// At most this many GET /users/{id} in flight: "Who read it" and a sent box may name a hundred
// people at once, and the server (and the browser's six connections) should not get them in one burst.
const USER_LOOKUPS = 4;
let lookups = 0;
const lookupQueue = [];

function limited(task) {
  return new Promise((resolve, reject) => {
    const run = () => {
      lookups += 1;
      task().then(resolve, reject).finally(() => {
        lookups -= 1;
        lookupQueue.shift()?.();
      });
    };
    if (lookups < USER_LOOKUPS) run();
    else lookupQueue.push(run);
  });
}

/** A user by id, asked once per session (the `users` cache), at most USER_LOOKUPS at a time. */
function userById(id) {
  if (!users.has(id)) {
    users.set(id, limited(() => client.api("GET", `/users/${id}`))
      .catch(() => ({ id, username: `#${id}`, display_name: `#${id}` })));
  }
  return users.get(id);
}

function remember(user) {
  users.set(user.id, Promise.resolve(user));
}

function time(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleString();
}

// ---- login ----------------------------------------------------------------------

async function onLogin(event, register) {
  event.preventDefault();
  const username = byTestId("login-username").value.trim();
  const password = byTestId("login-password").value;
  const error = byTestId("login-error");
  if (!username || !password) {
    setError(error, "Enter a username and a password.");
    return;
  }
  setError(error, "");
  try {
    if (register) await client.register(username, password);
    await client.login(username, password);
  } catch (e) {
    setError(error, describe(e));
    return;
  }
  byTestId("login-password").value = "";
  await enter().catch((e) => leave(describe(e)));
}

async function enter() {
  const user = client.user;
  remember(user);
  byTestId("current-user").textContent = user.username;
  show($("login-view"), false);
  show($("session-bar"), true);
  show($("app-view"), true);
  firstSync = true;
  historyShown = false;
  // A failed history (a 503) must not leave a dead page: say so, open the stream anyway (its
  // backlog or replay shows what is new) and try the history again once it is synced.
  await loadHistory().catch(report);
  client.connect();
  loadSent().catch(report);
  loadMeetings().catch(report);
  presenceTimer = setInterval(() => refreshPresence().catch(() => {}), 15000);
}

function leave(message) {
  clearInterval(presenceTimer);
  clearReport();
  show($("app-view"), false);
  show($("session-bar"), false);
  show($("login-view"), true);
  byTestId("current-user").textContent = "";
  byTestId("unread-count").textContent = "0";
  for (const id of ["message-list", "sent-list", "meeting-list", "people-list"]) {
    const list = document.querySelector(`#${id}, [data-testid="${id}"]`);
    list.replaceChildren();
  }
  known.clear();
  users.clear();
  earlyReceipts.clear();
  show($("inbox-empty"), true);
  show($("sent-empty"), true);
  setError(byTestId("login-error"), message || "");
  byTestId("login-username").focus();
}

/** Tell people, in the live region (kept to its last 5 notes) for screen readers. */
function announce(text) {
  const announcer = $("announcer");
  announcer.append(Object.assign(document.createElement("p"), { textContent: text }));
  while (announcer.childElementCount > 5) announcer.firstElementChild.remove();
}

/** Something failed that people must see: the error banner (role="alert"), with Reconnect
 *  when the stream stopped and will not come back by itself (4029). */
function report(error, { stopped = false } = {}) {
  byTestId("error-banner").querySelector("p").textContent = describe(error);
  show(byTestId("reconnect"), stopped);
  show(byTestId("error-banner"), true);
}

function clearReport() {
  show(byTestId("error-banner"), false);
  show(byTestId("reconnect"), false);
}

// ---- inbox ----------------------------------------------------------------------

async function loadHistory() {
  const fresh = await client.loadHistory(50);
  historyShown = true;
  await Promise.all(fresh.map((m) => renderMessage(m, false)));
  for (const m of fresh) setRead(m.id, m.read_at !== null);
}

/** Insert at once (a `read` for it may come next) and name the sender when known. */
async function renderMessage(message, isNew) {
  const list = byTestId("message-list");
  if (list.querySelector(`[data-message-id="${message.id}"]`)) return;
  knowPerson(message.sender_id);

  const li = document.createElement("li");
  li.dataset.testid = "message";
  li.dataset.messageId = message.id;
  li.dataset.seq = message.seq;
  li.className = "message";
  const head = document.createElement("div");
  head.className = "meta";
  const from = document.createElement("span");
  from.dataset.testid = "message-sender";
  from.className = "sender";
  const when = document.createElement("time");
  when.dateTime = message.created_at;
  when.textContent = time(message.created_at);
  head.append(from, when);
  if (message.type === "meeting.invite") {
    head.append(Object.assign(document.createElement("span"), { className: "tag", textContent: "Meeting invitation" }));
  }
  const body = document.createElement("p");
  body.dataset.testid = "message-content";
  body.className = "content";
  body.textContent = message.content;
  li.append(head, body);

  // newest first: before the first item with a lower seq
  const after = [...list.children].find((el) => Number(el.dataset.seq) < message.seq);
  list.insertBefore(li, after ?? null);
  setRead(message.id, message.read_at !== null && message.read_at !== undefined);
  show($("inbox-empty"), false);
  if (message.type === "meeting.invite") loadMeetings().catch(report);
  const sender = await userById(message.sender_id);
  from.textContent = sender.username;
  from.title = sender.display_name;
  if (isNew) announce(`New message from ${sender.username}: ${message.content}`);
}

function setRead(id, read) {
  const li = byTestId("message-list").querySelector(`[data-message-id="${id}"]`);
  if (!li) return;
  li.dataset.read = String(read);
  const button = li.querySelector('[data-testid="mark-read"]');
  if (read && button) button.remove();
  if (!read && !button) {
    const mark = document.createElement("button");
    mark.type = "button";
    mark.dataset.testid = "mark-read";
    mark.className = "secondary small";
    mark.textContent = "Mark read";
    mark.setAttribute("aria-label", `Mark read: ${li.querySelector(".content").textContent.slice(0, 40)}`);
    mark.addEventListener("click", () => client.markRead([Number(id)]).catch(report));
    li.append(mark);
  }
}

/** After a reconnect, reads of older messages made meanwhile are not replayed: ask REST. */
async function refreshReadStates() {
  const page = await client.api("GET", "/messages?limit=50");
  for (const m of page.messages) setRead(m.id, m.read_at !== null);
}

// ---- compose, sent ----------------------------------------------------------------

const splitNames = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

async function onCompose(event) {
  event.preventDefault();
  const error = byTestId("compose-error");
  const content = byTestId("compose-content").value;
  const names = splitNames(byTestId("compose-recipients").value);
  setError(error, "");
  $("compose-done").textContent = "";
  if (!names.length || !content.trim()) {
    setError(error, "Enter at least one recipient and a message.");
    return;
  }
  const button = byTestId("compose-send");
  button.disabled = true;
  try {
    const ids = await client.resolveUsernames(names);
    const message = await client.send({ recipientIds: ids, content });
    byTestId("compose-content").value = "";
    $("compose-done").textContent = "Sent.";
    ids.forEach(knowPerson);
    renderSent(message).catch(report);
  } catch (e) {
    setError(error, describe(e));
  } finally {
    button.disabled = false;
  }
}

async function loadSent() {
  const page = await client.api("GET", "/messages/sent?limit=20");
  for (const m of page.messages) renderSent(m);
}

// message id -> read_count, for a receipt that overtook its message.sent; emptied at logout and
// kept to the newest EARLY_RECEIPTS (a receipt of a message this page never shows waits here).
const earlyReceipts = new Map();
const EARLY_RECEIPTS = 200;

/** A sent message in the sent box, newest (highest id) first wherever it comes from: the
 *  compose form, message.sent, or the sent page read again after a reconnect (which brings
 *  what was sent from another device meanwhile, older than what is shown). */
async function renderSent(message) {
  const list = $("sent-list");
  const shown = list.querySelector(`[data-message-id="${message.id}"]`);
  if (shown) {
    setReceipt(shown, message.read_count, message.recipient_count);
    return;
  }
  const li = document.createElement("li");
  li.className = "message";
  li.dataset.testid = "sent-message";
  li.dataset.messageId = message.id;
  const meta = document.createElement("div");
  meta.className = "meta";
  const to = document.createElement("span");
  to.className = "sender";
  const receipts = Object.assign(document.createElement("span"), { className: "receipts", hidden: true });
  receipts.dataset.testid = "sent-receipts";
  meta.append(to, Object.assign(document.createElement("time"), { dateTime: message.created_at, textContent: time(message.created_at) }),
    receipts);
  const body = Object.assign(document.createElement("p"), { className: "content", textContent: message.content });
  li.append(meta, body);
  if (typeof message.read_count === "number") li.append(whoRead(message.id));
  const after = [...list.children].find((el) => Number(el.dataset.messageId) < message.id);
  list.insertBefore(li, after ?? null);
  show($("sent-empty"), false);
  setReceipt(li, Math.max(message.read_count ?? -1, earlyReceipts.get(message.id) ?? -1), message.recipient_count);
  earlyReceipts.delete(message.id);
  const recipients = await Promise.all((message.recipient_ids ?? []).map(userById));
  to.textContent = `To ${recipients.map((u) => u.username).join(", ")}`;
}

/** "Read by 1 of 2". Counts only grow; with several server instances receipts may come
 *  out of order, so the highest count wins. Servers without receipts send no counts. */
function setReceipt(li, readCount, recipientCount) {
  if (typeof readCount !== "number" || readCount < 0 || readCount < Number(li.dataset.readCount ?? -1)) return;
  li.dataset.readCount = readCount;
  if (typeof recipientCount === "number") li.dataset.recipientCount = recipientCount;
  const el = li.querySelector('[data-testid="sent-receipts"]');
  el.textContent = `Read by ${readCount} of ${li.dataset.recipientCount ?? "?"}`;
  el.hidden = false;
}

function onReceipt({ message_id: id, read_count: readCount, recipient_count: recipientCount }) {
  const li = $("sent-list").querySelector(`[data-message-id="${id}"]`);
  if (li) setReceipt(li, readCount, recipientCount);
  else {
    const count = Math.max(readCount, earlyReceipts.get(id) ?? 0);
    earlyReceipts.delete(id); // re-inserted as the newest
    earlyReceipts.set(id, count);
    if (earlyReceipts.size > EARLY_RECEIPTS) earlyReceipts.delete(earlyReceipts.keys().next().value);
  }
}

/** Who read a sent message, asked when opened (GET /messages/{id}/receipts). */
function whoRead(id) {
  const details = document.createElement("details");
  details.className = "who-read";
  const summary = Object.assign(document.createElement("summary"), { textContent: "Who read it" });
  const list = Object.assign(document.createElement("ul"), { className: "plain" });
  details.append(summary, list);
  details.addEventListener("toggle", () => {
    if (!details.open) return;
    client.api("GET", `/messages/${id}/receipts?limit=100`).then(async (answer) => {
      const items = await Promise.all(answer.recipients.map(async (r) => {
        const user = await userById(r.user_id);
        const li = Object.assign(document.createElement("li"), {
          textContent: `${user.username}: ${r.read_at ? `read ${time(r.read_at)}` : "not read yet"}`,
        });
        li.dataset.testid = "receipt";
        li.dataset.read = String(r.read_at !== null);
        return li;
      }));
      if (answer.next_after !== null) items.push(Object.assign(document.createElement("li"), { textContent: "…" }));
      list.replaceChildren(...items);
    }, report);
  });
  return details;
}

// ---- meetings ---------------------------------------------------------------------

async function loadMeetings() {
  const page = await client.api("GET", "/meetings?limit=20");
  const list = $("meeting-list");
  const items = await Promise.all(page.meetings.map(async (m) => {
    const people = await Promise.all(m.participant_ids.map(userById));
    m.participant_ids.forEach(knowPerson);
    const li = document.createElement("li");
    const title = Object.assign(document.createElement("strong"), { textContent: m.title });
    const when = m.starts_at ? ` · ${time(m.starts_at)}` : "";
    const who = Object.assign(document.createElement("span"), {
      className: "muted", textContent: `${when} · ${people.map((u) => u.username).join(", ")}`,
    });
    li.append(title, who);
    return li;
  }));
  list.replaceChildren(...items);
}

async function onMeeting(event) {
  event.preventDefault();
  const error = $("meeting-error");
  setError(error, "");
  const title = $("meeting-title").value;
  if (!title.trim()) {
    setError(error, "Enter a title.");
    return;
  }
  try {
    const ids = await client.resolveUsernames(splitNames($("meeting-participants").value));
    const body = { title, participant_ids: ids };
    if ($("meeting-starts").value) body.starts_at = new Date($("meeting-starts").value).toISOString();
    await client.api("POST", "/meetings", body, { idempotencyKey: uuid4() });
    $("meeting-title").value = "";
    $("meeting-participants").value = "";
    await loadMeetings();
  } catch (e) {
    setError(error, describe(e));
  }
}

// ---- people and presence ------------------------------------------------------------

function knowPerson(id) {
  if (id === client.user?.id || known.has(id)) return;
  known.add(id);
  refreshPresence().catch(() => {});
}

async function refreshPresence() {
  if (!known.size || !client.user) return;
  const ids = [...known].slice(0, 100);
  const answer = await client.api("GET", `/presence?ids=${ids.join(",")}`);
  const items = await Promise.all(ids.map(async (id) => {
    const user = await userById(id);
    const state = answer.users[String(id)];
    const li = document.createElement("li");
    li.className = state?.online ? "person online" : "person";
    li.dataset.userId = id;
    const dot = Object.assign(document.createElement("span"), { className: "dot" });
    dot.setAttribute("aria-hidden", "true");
    const name = Object.assign(document.createElement("span"), { textContent: user.username });
    const what = Object.assign(document.createElement("span"), {
      className: "muted", textContent: state?.online ? ` online (${state.devices})` : " offline",
    });
    li.append(dot, name, what);
    return li;
  }));
  $("people-list").replaceChildren(...items);
  show($("people-empty"), items.length === 0);
}

async function suggest(input) {
  const parts = input.value.split(",");
  const prefix = parts.at(-1).trim().toLowerCase();
  const list = $("user-suggestions");
  if (!prefix || !/^[a-z0-9_.-]+$/.test(prefix)) {
    list.replaceChildren();
    return;
  }
  const found = await client.findUsers(prefix, 8);
  const head = parts.slice(0, -1).map((s) => s.trim()).filter(Boolean);
  list.replaceChildren(...found.map((u) => {
    remember(u);
    return Object.assign(document.createElement("option"), { value: [...head, u.username].join(", "), label: u.display_name });
  }));
}

// ---- wiring -------------------------------------------------------------------------

client.on("message", (m) => renderMessage(m, true).catch(report));
client.on("read", ({ ids }) => ids.forEach((id) => setRead(id, true)));
client.on("sent", (m) => renderSent(m).catch(report));
client.on("receipt", onReceipt);
client.on("unread-count", (count) => { byTestId("unread-count").textContent = String(count); });
client.on("status", ({ state }) => {
  const el = byTestId("connection-status");
  el.dataset.state = state;
  el.textContent = STATUS_TEXT[state] ?? state;
});
client.on("synced", () => {
  if (!historyShown) loadHistory().catch(report);
  else if (!firstSync) refreshReadStates().catch(report);
  if (!firstSync) loadSent().catch(report); // sends and receipts are live only: what came meanwhile comes from REST
  firstSync = false;
  refreshPresence().catch(() => {});
});
client.on("error", ({ code, message }) => {
  if (code === "session_ended") leave(message);
  else report(new ApiError(0, code, message), { stopped: Boolean(client.user) && client.state === "offline" });
});

$("login-form").addEventListener("submit", (e) => onLogin(e, false));
byTestId("register-submit").addEventListener("click", (e) => onLogin(e, true));
byTestId("logout").addEventListener("click", async () => {
  await client.logout();
  leave("");
});
byTestId("reconnect").addEventListener("click", () => {
  clearReport();
  client.connect();
});
$("dismiss-error").addEventListener("click", clearReport);
// Which messages turned read comes in `read` events (message.read, in order with the stream),
// not from the answer: a message that arrived after the server's commit stays unread. Without
// a synced stream, the read state comes from the server's own list.
byTestId("mark-all-read").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  button.disabled = true;
  try {
    await client.markAllRead();
    if (client.state !== "connected") await refreshReadStates();
  } catch (e) {
    report(e);
  } finally {
    button.disabled = false;
  }
});
$("compose-form").addEventListener("submit", onCompose);
$("meeting-form").addEventListener("submit", onMeeting);
for (const input of [byTestId("compose-recipients"), $("meeting-participants")]) {
  input.addEventListener("input", () => suggest(input).catch(() => {}));
}

async function start() {
  if (!client.restore()) {
    byTestId("login-username").focus();
  } else if (await client.claim()) {
    await enter();
  } else { // a duplicated tab: the session is the other tab's
    leave("This session is open in another tab. Log in here to use this tab too.");
  }
}

start().catch((e) => leave(describe(e)));
