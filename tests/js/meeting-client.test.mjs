// Unit tests of meeting/static/meeting-client.js under Node's built-in runner (node --test),
// run by tests/test_meeting_client_js.py. The browser's fetch, WebSocket, storage, timers
// and randomness are replaced by the fakes below; the module is the one the server serves.
// Node 18 (Debian bookworm's nodejs) has no globalThis.crypto or CustomEvent: crypto comes
// from node:crypto and is passed in, as a page may pass its own.
import assert from "node:assert/strict";
import { webcrypto } from "node:crypto";
import { test } from "node:test";

import {
  ApiError, CLOSE, MeetingClient, backoffDelay, goingAwayDelay, readChunks, uuid4,
} from "../../meeting/static/meeting-client.js";

const USER = { id: 7, username: "bob", display_name: "bob", created_at: "2026-11-28T00:00:00+00:00" };

class Clock {
  constructor() { this.now = 0; this.timers = []; this.nextId = 1; }
  setTimeout = (fn, ms) => { const id = this.nextId++; this.timers.push({ id, at: this.now + ms, fn }); return id; };
  clearTimeout = (id) => { this.timers = this.timers.filter((t) => t.id !== id); };
  pending() { return this.timers.map((t) => t.at - this.now).sort((a, b) => a - b); }
  /** Run every timer due within `ms`, in time order. */
  async advance(ms) {
    const end = this.now + ms;
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at);
      const next = this.timers[0];
      if (!next || next.at > end) break;
      this.timers.shift();
      this.now = next.at;
      next.fn();
      await settle();
    }
    this.now = end;
  }
}

/** Let promises and async callbacks run. */
const settle = async () => { for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r)); };

class Storage {
  constructor() { this.map = new Map(); }
  getItem(k) { return this.map.has(k) ? this.map.get(k) : null; }
  setItem(k, v) { this.map.set(k, String(v)); }
  removeItem(k) { this.map.delete(k); }
}

function fakeSocketClass() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
    }
    send(data) { this.sent.push(JSON.parse(data)); }
    close(code) { this.readyState = 3; this.closedWith = code; }
    // the server side
    frame(type, payload = {}) {
      this.readyState = 1;
      this.onmessage?.({ data: JSON.stringify({ type, payload, timestamp: "t" }) });
    }
    drop(code) { this.readyState = 3; this.onclose?.({ code }); }
    connect(heartbeat = 30) { this.frame("connected", { user_id: USER.id, connection_id: "c", heartbeat }); }
  }
  return { FakeSocket, sockets };
}

/** A fetch answering from `routes`: "METHOD /path" -> (body, call) => [status, json] or a thrown error. */
function fakeFetch(routes) {
  const calls = [];
  const fetch = async (url, init) => {
    const path = url.replace("http://app", "");
    const body = init.body === undefined ? undefined : JSON.parse(init.body);
    const call = { method: init.method, path, body, headers: init.headers };
    calls.push(call);
    const route = routes[`${init.method} ${path.split("?")[0]}`];
    if (!route) return response(404, { error: { code: "not_found", message: "Not found" } });
    const [status, json, headers] = route(body, call);
    return response(status, json, headers);
  };
  return { fetch, calls };
}

function response(status, json, headers = {}) {
  return {
    status, ok: status >= 200 && status < 300,
    headers: { get: (k) => headers[k] ?? null },
    json: async () => { if (json === undefined) throw new SyntaxError("no body"); return json; },
  };
}

function makeClient({ routes = {}, storage = new Storage(), random = () => 0.5, session = true, locks = null,
  sessionStorage = new Storage(), clock = new Clock() } = {}) {
  const { FakeSocket, sockets } = fakeSocketClass();
  let refreshes = 0;
  const allRoutes = {
    "POST /auth/refresh": (body) => {
      refreshes += 1;
      return [200, { access_token: `access-${refreshes + 1}`, refresh_token: `refresh-${refreshes + 1}`, token_type: "bearer" }];
    },
    "GET /users/me": () => [200, USER],
    ...routes,
  };
  const { fetch, calls } = fakeFetch(allRoutes);
  if (session && !sessionStorage.getItem("meeting.session")) {
    sessionStorage.setItem("meeting.session", JSON.stringify({ accessToken: "access-1", refreshToken: "refresh-1", user: USER }));
  }
  const client = new MeetingClient({
    baseUrl: "http://app", fetch, WebSocket: FakeSocket, storage, sessionStorage, random,
    setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: () => clock.now,
    crypto: webcrypto, locks,
  });
  const events = [];
  for (const type of ["message", "read", "unread-count", "status", "error", "synced", "session", "sent", "receipt"]) {
    client.on(type, (detail) => events.push([type, detail]));
  }
  if (session) client.restore();
  return { client, clock, sockets, calls, events, storage, sessionStorage };
}

const msg = (seq, extra = {}) => ({ id: 100 + seq, seq, sender_id: 1, content: `m${seq}`, type: "text", meeting_id: null,
  created_at: "2026-11-28T00:00:00+00:00", read_at: null, ...extra });
const of = (events, type) => events.filter(([t]) => t === type).map(([, d]) => d);

// ---- backoff ------------------------------------------------------------------------

test("backoff doubles from 500 ms with equal jitter, capped at 30 s", () => {
  assert.equal(backoffDelay(0, undefined, () => 0), 250);
  assert.equal(backoffDelay(0, undefined, () => 1), 500);
  assert.equal(backoffDelay(3, undefined, () => 0), 2000);
  assert.equal(backoffDelay(3, undefined, () => 1), 4000);
  assert.equal(backoffDelay(20, undefined, () => 1), 30000);
  assert.equal(backoffDelay(20, undefined, () => 0), 15000);
  assert.equal(backoffDelay(2, { initial: 100, max: 1000 }, () => 0.5), 300);
  assert.equal(goingAwayDelay(() => 0), 100);
  assert.equal(goingAwayDelay(() => 1), 500);
});

test("uuid4 is a version-4 UUID and differs each time", () => {
  const a = uuid4(webcrypto), b = uuid4(webcrypto);
  assert.match(a, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.notEqual(a, b);
});

// ---- connect, since, dedupe -----------------------------------------------------------

test("the token rides in the bearer subprotocol, never in the URL", () => {
  const { client, sockets } = makeClient();
  client.connect();
  assert.equal(sockets.length, 1);
  assert.equal(sockets[0].url, "ws://app/ws/messages");
  assert.deepEqual(sockets[0].protocols, ["bearer", "access-1"]);
});

test("backlog, then replay and live: each seq once, in order, and since persisted per user", async () => {
  const { client, sockets, events, storage } = makeClient();
  client.connect();
  const s = sockets[0];
  s.connect();
  s.frame("message.unread", { messages: [msg(1), msg(2)], count: 2, has_more: false });
  s.frame("message.synced", { seq: 2, count: 2 });
  s.frame("message.new", msg(3));
  s.frame("message.new", msg(2)); // a duplicate seq is dropped
  assert.deepEqual(of(events, "message").map((m) => m.seq), [1, 2, 3]);
  assert.equal(storage.getItem("meeting.since.7"), "3");
  assert.deepEqual(of(events, "unread-count"), [2, 3]);

  s.drop(CLOSE.GOING_AWAY);
  await settle();
  assert.equal(sockets.length, 1); // not at once: 100-500 ms of jitter
});

test("a new client on the same storage (a reload) resumes with since and repeats nothing", async () => {
  const storage = new Storage();
  storage.setItem("meeting.since.7", "5");
  storage.setItem("meeting.since.8", "99"); // another user's cursor is not ours
  const { client, sockets, events } = makeClient({ storage });
  client.seed([msg(5), msg(4)]);
  client.connect();
  assert.equal(sockets[0].url, "ws://app/ws/messages?since=5");
  sockets[0].connect();
  sockets[0].frame("message.new", msg(5));
  sockets[0].frame("message.new", msg(6));
  sockets[0].frame("message.synced", { seq: 6, count: 1 });
  assert.deepEqual(of(events, "message").map((m) => m.seq), [6]);
});

test("seed returns only unseen messages and leaves the resume point where it was", () => {
  const { client, storage } = makeClient();
  assert.deepEqual(client.seed([msg(3), msg(1)]).map((m) => m.seq), [3, 1]);
  assert.deepEqual(client.seed([msg(4), msg(3)]).map((m) => m.seq), [4]);
  assert.equal(client.lastSeq, null);
  assert.equal(storage.getItem("meeting.since.7"), null);
});

test("a reload after more than a page arrived: resume from the stored since, the replay fills the gap", () => {
  const storage = new Storage();
  storage.setItem("meeting.since.7", "3");
  const { client, sockets, events } = makeClient({ storage });
  const page = Array.from({ length: 50 }, (_, i) => msg(62 - i)); // the newest 50: 62..13
  assert.equal(client.seed(page).length, 50);
  client.connect();
  assert.equal(sockets[0].url, "ws://app/ws/messages?since=3");
  sockets[0].connect();
  for (let seq = 4; seq <= 62; seq++) sockets[0].frame("message.new", msg(seq));
  sockets[0].frame("message.synced", { seq: 62, count: 59 });
  assert.deepEqual(of(events, "message").map((m) => m.seq), [4, 5, 6, 7, 8, 9, 10, 11, 12]);
  assert.equal(storage.getItem("meeting.since.7"), "62");
});

test("a user with no messages yet: synced seq 0 is no resume point, the next connect asks for the backlog", async () => {
  const { client, clock, sockets, storage } = makeClient({ random: () => 0 });
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.synced", { seq: 0, count: 0 });
  assert.equal(client.lastSeq, null);
  assert.equal(storage.getItem("meeting.since.7"), null);
  sockets[0].drop(CLOSE.TRY_AGAIN_LATER);
  await settle();
  await clock.advance(250);
  assert.equal(sockets[1].url, "ws://app/ws/messages");
});

test("loadHistory: the newest page, plus older unread the replay after since will not bring", async () => {
  const storage = new Storage();
  storage.setItem("meeting.since.7", "61");
  const newest = Array.from({ length: 50 }, (_, i) => msg(70 - i)); // 70..21
  const unreadPages = { 0: { messages: [msg(1), msg(5)], count: 60, next_after_seq: 5 },
    5: { messages: [msg(20), msg(21), msg(22)], count: 60, next_after_seq: 22 } };
  const { client, calls } = makeClient({ storage, routes: {
    "GET /messages": () => [200, { messages: newest, next_before: 121 }],
    "GET /messages/unread": (_, call) => [200, unreadPages[new URL(`http://x${call.path}`).searchParams.get("after_seq")]],
  } });
  const shown = await client.loadHistory(50);
  assert.deepEqual(shown.map((m) => m.seq), [...newest.map((m) => m.seq), 1, 5, 20]);
  assert.deepEqual(calls.map((c) => c.path), ["/messages?limit=50", "/messages/unread?after_seq=0&limit=100",
    "/messages/unread?after_seq=5&limit=100"]);
  assert.equal(client.lastSeq, 61);
});

test("loadHistory with no since, or the whole history on one page: GET /messages only", async () => {
  for (const [since, nextBefore] of [[null, 5], ["9", null]]) {
    const storage = new Storage();
    if (since) storage.setItem("meeting.since.7", since);
    const { client, calls } = makeClient({ storage, routes: {
      "GET /messages": () => [200, { messages: [msg(9), msg(8)], next_before: nextBefore }],
    } });
    assert.deepEqual((await client.loadHistory(2)).map((m) => m.seq), [9, 8]);
    assert.deepEqual(calls.map((c) => c.path), ["/messages?limit=2"]);
  }
});

test("no stored since: seeding and connecting ask for the unread backlog, not a replay", () => {
  const { client, sockets, events, storage } = makeClient();
  client.seed([msg(9), msg(8)]);
  client.connect();
  assert.equal(sockets[0].url, "ws://app/ws/messages");
  sockets[0].connect();
  sockets[0].frame("message.unread", { messages: [msg(2), msg(8), msg(9)], count: 3, has_more: false });
  sockets[0].frame("message.synced", { seq: 10, count: 3 }); // 10 was read elsewhere: not in the backlog
  assert.deepEqual(of(events, "message").map((m) => m.seq), [2]);
  assert.equal(storage.getItem("meeting.since.7"), "10");
});

test("has_more: the rest of the backlog is fetched over REST, page by page", async () => {
  const pages = { 2: { messages: [msg(3)], count: 4, next_after_seq: 3 }, 3: { messages: [msg(4)], count: 4, next_after_seq: null } };
  const { client, sockets, events, calls } = makeClient({
    routes: { "GET /messages/unread": (_, call) => [200, pages[new URL(`http://x${call.path}`).searchParams.get("after_seq")]] },
  });
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.unread", { messages: [msg(1), msg(2)], count: 4, has_more: true });
  await settle();
  assert.deepEqual(of(events, "message").map((m) => m.seq), [1, 2, 3, 4]);
  assert.deepEqual(calls.filter((c) => c.path.startsWith("/messages/unread")).map((c) => c.path),
    ["/messages/unread?after_seq=2&limit=100", "/messages/unread?after_seq=3&limit=100"]);
});

/** A fetch whose answers the test gives, one call at a time; it records each call's signal. */
function deferredFetch(client) {
  const pending = [];
  client._fetch = (url, init) => new Promise((resolve, reject) => {
    pending.push({ url, init, answer: (status, json) => resolve(response(status, json)), reject });
    init.signal?.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
  });
  return pending;
}

test("has_more: live frames while the REST pages load do not move since past them; the last page does", async () => {
  const { client, sockets, events, storage } = makeClient();
  const pending = deferredFetch(client);
  client.connect();
  const s = sockets[0];
  s.connect();
  s.frame("message.unread", { messages: [msg(1), msg(2)], count: 4, has_more: true });
  s.frame("message.synced", { seq: 4, count: 4 });
  s.frame("message.new", msg(5));
  await settle();
  assert.equal(storage.getItem("meeting.since.7"), "2"); // a reload now must still get 3 and 4
  assert.equal(pending.length, 1);
  pending[0].answer(200, { messages: [msg(3), msg(4)], count: 5, next_after_seq: null });
  await settle();
  assert.deepEqual(of(events, "message").map((m) => m.seq), [1, 2, 5, 3, 4]);
  assert.equal(storage.getItem("meeting.since.7"), "5");
});

test("close() and logout() stop the REST pages of a backlog: aborted, nothing delivered after", async () => {
  for (const end of ["close", "logout"]) {
    const { client, sockets, events, storage } = makeClient();
    const pending = deferredFetch(client);
    client.connect();
    sockets[0].connect();
    sockets[0].frame("message.unread", { messages: [msg(1)], count: 3, has_more: true });
    await settle();
    const [page] = pending;
    if (end === "close") client.close(); else client.logout();
    assert.equal(page.init.signal.aborted, true, end);
    page.answer(200, { messages: [msg(2), msg(3)], count: 3, next_after_seq: null });
    await settle();
    assert.deepEqual(of(events, "message").map((m) => m.seq), [1], end);
    assert.equal(storage.getItem("meeting.since.7"), "1", end);
    assert.deepEqual(of(events, "error"), [], end);
  }
});

test("a failed REST page of a backlog: error, and reconnect from the since before it", async () => {
  const { client, clock, sockets, events, storage } = makeClient({ random: () => 0,
    routes: { "GET /messages/unread": () => [503, { error: { code: "database_unavailable", message: "down" } }] } });
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.unread", { messages: [msg(1)], count: 3, has_more: true });
  sockets[0].frame("message.synced", { seq: 3, count: 3 });
  await settle();
  assert.deepEqual(of(events, "error").map((e) => e.code), ["database_unavailable"]);
  assert.equal(storage.getItem("meeting.since.7"), "1");
  await clock.advance(250);
  assert.equal(sockets[1].url, "ws://app/ws/messages?since=1");
});

// ---- close codes ------------------------------------------------------------------------

test("1001: reconnect within 100-500 ms, with since", async () => {
  const { client, clock, sockets, events } = makeClient({ random: () => 0 });
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.new", msg(8));
  sockets[0].drop(CLOSE.GOING_AWAY);
  await settle();
  assert.deepEqual(clock.pending(), [100]); // a backoff would be 250 ms here
  assert.equal(of(events, "status").at(-1).state, "reconnecting");
  await clock.advance(100);
  assert.equal(sockets.length, 2);
  assert.equal(sockets[1].url, "ws://app/ws/messages?since=8");
});

test("1013 and 1006: exponential backoff that grows per failure and resets on connected", async () => {
  const { client, clock, sockets } = makeClient({ random: () => 1 });
  client.connect();
  sockets[0].connect();
  sockets[0].drop(CLOSE.TRY_AGAIN_LATER);
  await settle();
  assert.deepEqual(clock.pending(), [500]);
  await clock.advance(500);
  sockets[1].drop(CLOSE.ABNORMAL); // refused before `connected`: REST says the token is fine
  await settle();
  assert.deepEqual(clock.pending(), [1000]);
  await clock.advance(1000);
  sockets[2].drop(CLOSE.ABNORMAL);
  await settle();
  assert.deepEqual(clock.pending(), [2000]);
  await clock.advance(2000);
  sockets[3].connect();
  sockets[3].drop(CLOSE.TRY_AGAIN_LATER);
  await settle();
  assert.deepEqual(clock.pending(), [500]);
});

test("4029: stop, go offline and report; no reconnect", async () => {
  const { client, clock, sockets, events } = makeClient();
  client.connect();
  sockets[0].connect();
  sockets[0].drop(CLOSE.TOO_MANY_CONNECTIONS);
  await settle();
  await clock.advance(60000);
  assert.equal(sockets.length, 1);
  assert.equal(client.state, "offline");
  assert.deepEqual(of(events, "error").map((e) => e.code), ["too_many_connections"]);
});

test("1009 and 1003: a client bug is reported, and the stream reconnects with backoff and since", async () => {
  for (const code of [CLOSE.TOO_BIG, CLOSE.UNSUPPORTED]) {
    const { client, clock, sockets, events } = makeClient({ random: () => 0 });
    client.connect();
    sockets[0].connect();
    sockets[0].frame("message.new", msg(3));
    sockets[0].drop(code);
    await settle();
    assert.deepEqual(of(events, "error").map((e) => e.code), ["client_bug"]);
    assert.deepEqual(clock.pending(), [250]);
    assert.equal(client.state, "reconnecting");
    await clock.advance(250);
    assert.equal(sockets[1].url, "ws://app/ws/messages?since=3");
    assert.deepEqual(sockets[1].sent, []); // nothing is sent again
  }
});

test("4001: refresh the token (rotating the refresh token), then reconnect at once with the new one", async () => {
  const { client, clock, sockets, calls, sessionStorage } = makeClient();
  client.connect();
  sockets[0].connect();
  sockets[0].drop(CLOSE.TOKEN_EXPIRED);
  await settle();
  assert.deepEqual(calls.map((c) => [c.path, c.body]), [["/auth/refresh", { refresh_token: "refresh-1" }]]);
  await clock.advance(0);
  assert.deepEqual(sockets[1].protocols, ["bearer", "access-2"]);
  assert.equal(JSON.parse(sessionStorage.getItem("meeting.session")).refreshToken, "refresh-2");
});

test("4001 and the refresh is refused: the session ended, no reconnect", async () => {
  const { client, clock, sockets, events, sessionStorage } = makeClient({
    routes: { "POST /auth/refresh": () => [401, { error: { code: "refresh_token_reused", message: "reused" } }] },
  });
  client.connect();
  sockets[0].connect();
  sockets[0].drop(CLOSE.TOKEN_EXPIRED);
  await settle();
  await clock.advance(60000);
  assert.equal(sockets.length, 1);
  assert.deepEqual(of(events, "error").map((e) => e.code), ["session_ended"]);
  assert.equal(client.user, null);
  assert.equal(sessionStorage.getItem("meeting.session"), null);
  assert.equal(client.state, "offline");
});

test("closed before connected with an expired token (a 401 at the upgrade): refresh, then reconnect", async () => {
  const { client, clock, sockets, calls } = makeClient({
    routes: { "GET /users/me": (_, call) => (call.headers.Authorization === "Bearer access-1"
      ? [401, { error: { code: "token_expired", message: "expired" } }] : [200, USER]) },
  });
  client.connect();
  sockets[0].drop(CLOSE.ABNORMAL);
  await settle();
  assert.deepEqual(calls.map((c) => c.path), ["/users/me", "/auth/refresh"]);
  await clock.advance(0);
  assert.deepEqual(sockets[1].protocols, ["bearer", "access-2"]);
});

test("closed before connected and the server is unreachable: back off, keep the session", async () => {
  const { client, clock, sockets } = makeClient({ random: () => 0 });
  client._fetch = async () => { throw new TypeError("Failed to fetch"); };
  client.connect();
  sockets[0].drop(CLOSE.ABNORMAL);
  await settle();
  assert.deepEqual(clock.pending(), [250]);
  assert.equal(client.user.id, USER.id);
});

test("close(): 1000, offline, nothing scheduled", async () => {
  const { client, clock, sockets } = makeClient();
  client.connect();
  sockets[0].connect();
  client.close();
  assert.equal(sockets[0].closedWith, CLOSE.NORMAL);
  await clock.advance(60000);
  assert.equal(sockets.length, 1);
  assert.equal(client.state, "offline");
});

// ---- token refresh --------------------------------------------------------------------

test("token.expiring: refresh over REST, then a refresh frame with the new access token", async () => {
  const { client, sockets } = makeClient();
  client.connect();
  sockets[0].connect();
  sockets[0].frame("token.expiring", { expires_at: "2026-11-28T01:00:00+00:00" });
  await settle();
  assert.deepEqual(sockets[0].sent, [{ type: "refresh", payload: { token: "access-2" } }]);
});

test("refresh is single-flight: a one-use refresh token is never presented twice", async () => {
  const { client, calls } = makeClient();
  const [a, b] = await Promise.all([client.refresh(), client.refresh()]);
  assert.equal(a, "access-2");
  assert.equal(b, "access-2");
  assert.equal(calls.filter((c) => c.path === "/auth/refresh").length, 1);
  await client.refresh();
  assert.deepEqual(calls.filter((c) => c.path === "/auth/refresh").map((c) => c.body.refresh_token), ["refresh-1", "refresh-2"]);
});

test("a refresh answered after logout is dropped: the session stays ended, in memory and in storage", async () => {
  for (const status of [200, 401]) {
    const { client, events, sessionStorage } = makeClient({ routes: { "POST /auth/logout": () => [204, undefined] } });
    const pending = deferredFetch(client);
    const refreshing = client.refresh();
    await settle();
    const logout = client.logout();
    pending[0].answer(status, status === 200 ? { access_token: "access-2", refresh_token: "refresh-2" }
      : { error: { code: "session_revoked", message: "revoked" } });
    await assert.rejects(refreshing, (e) => e.code === "session_changed");
    pending[1].answer(204);
    await logout;
    assert.equal(client.user, null, `status ${status}`);
    assert.equal(sessionStorage.getItem("meeting.session"), null);
    assert.deepEqual(of(events, "session"), [{ user: USER }, { user: null }]);
    assert.deepEqual(of(events, "error"), []);
  }
});

/** Logout, then a login as the same user, while `pending[0]` (a call of the old session) is out. */
async function logoutThenLogin(client, pending) {
  const logout = client.logout();
  pending[1].answer(204);
  await logout;
  const login = client.login("bob", "pw");
  await settle();
  pending[2].answer(200, { access_token: "access-new", refresh_token: "refresh-new", user: USER });
  await login;
}

test("a REST call answered 401 after logout and a new login: the new session goes on", async () => {
  const { client, events, sessionStorage } = makeClient();
  const pending = deferredFetch(client);
  const call = client.api("GET", "/messages");
  await settle();
  await logoutThenLogin(client, pending);
  assert.deepEqual(pending.map((p) => p.url.replace("http://app", "")), ["/messages", "/auth/logout", "/auth/login"]);
  pending[0].answer(401, { error: { code: "session_revoked", message: "revoked" } });
  await assert.rejects(call, (e) => e instanceof ApiError && e.status === 401);
  await settle();
  assert.equal(client.user.username, "bob");
  assert.equal(JSON.parse(sessionStorage.getItem("meeting.session")).accessToken, "access-new");
  assert.deepEqual(of(events, "session"), [{ user: USER }, { user: null }, { user: USER }]);
  assert.deepEqual(of(events, "error"), []);
  assert.equal(pending.length, 3); // no refresh of the new session on the old call's behalf
});

test("a token check answered 401 after logout and a new login: the new session goes on, the old stream stays stopped", async () => {
  const { client, clock, events, sessionStorage, sockets } = makeClient();
  const pending = deferredFetch(client);
  client.connect();
  sockets[0].drop(CLOSE.ABNORMAL); // closed before connected: the client asks GET /users/me
  await settle();
  await logoutThenLogin(client, pending);
  assert.equal(pending[0].url, "http://app/users/me");
  pending[0].answer(401, { error: { code: "session_revoked", message: "revoked" } });
  await settle();
  assert.equal(client.user.username, "bob");
  assert.equal(JSON.parse(sessionStorage.getItem("meeting.session")).accessToken, "access-new");
  assert.deepEqual(of(events, "session"), [{ user: USER }, { user: null }, { user: USER }]);
  assert.deepEqual(of(events, "error"), []);
  assert.deepEqual([sockets.length, clock.pending(), pending.length], [1, [], 3]);
});

test("a REST call answered 401 token_expired is refreshed and sent once more", async () => {
  const { client, calls } = makeClient({
    routes: { "GET /messages/unread/count": (_, call) => (call.headers.Authorization === "Bearer access-1"
      ? [401, { error: { code: "token_expired", message: "expired" } }] : [200, { count: 3 }]) },
  });
  assert.deepEqual(await client.api("GET", "/messages/unread/count"), { count: 3 });
  assert.deepEqual(calls.map((c) => c.path), ["/messages/unread/count", "/auth/refresh", "/messages/unread/count"]);
});

test("login keeps the tokens in session storage; logout forgets them and ends the server session", async () => {
  const { client, calls, sessionStorage, sockets } = makeClient({
    session: false,
    routes: {
      "POST /auth/login": () => [200, { access_token: "a", refresh_token: "r", user: USER }],
      "POST /auth/logout": () => [204, undefined],
    },
  });
  await assert.rejects(client.api("GET", "/users/me"), (e) => e instanceof ApiError && e.code === "not_logged_in");
  assert.equal((await client.login("bob", "pw")).username, "bob");
  assert.equal(JSON.parse(sessionStorage.getItem("meeting.session")).accessToken, "a");
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.unread", { messages: [msg(1)], count: 1, has_more: false });
  await client.logout();
  assert.equal(sessionStorage.getItem("meeting.session"), null);
  assert.deepEqual(calls.map((c) => [c.path, c.headers.Authorization ?? null]),
    [["/auth/login", null], ["/auth/logout", "Bearer a"]]);
  // logging in again in the same page: its history counts as new again; since is kept
  await client.login("bob", "pw");
  assert.equal(client.lastSeq, 1);
  assert.deepEqual(client.seed([msg(1)]).map((m) => m.seq), [1]);
});

/** navigator.locks, exclusive mode only: a request waits while another holds the name. */
class Locks {
  constructor() { this.held = new Set(); this.queue = []; }
  request(name, { signal } = {}, callback) {
    return new Promise((resolve, reject) => {
      const entry = { name, run: () => {
        this.held.add(name);
        Promise.resolve(callback({ name })).then((value) => {
          this.held.delete(name);
          const next = this.queue.findIndex((e) => e.name === name);
          if (next >= 0) this.queue.splice(next, 1)[0].run();
          resolve(value);
        });
      } };
      if (!this.held.has(name)) { entry.run(); return; }
      this.queue.push(entry);
      signal?.addEventListener("abort", () => {
        const i = this.queue.indexOf(entry);
        if (i >= 0) { this.queue.splice(i, 1); reject(new DOMException("aborted", "AbortError")); }
      });
    });
  }
}

const copyOf = (store) => { const c = new Storage(); for (const [k, v] of store.map) c.setItem(k, v); return c; };

test("claim: a tab whose sessionStorage was copied from a live tab (Duplicate tab) gives the session up", async () => {
  const locks = new Locks();
  const clock = new Clock();
  const first = makeClient({ locks, clock });
  assert.equal(await first.client.claim(), true);
  const copy = makeClient({ locks, clock, sessionStorage: copyOf(first.sessionStorage) });
  assert.equal(copy.client.user.id, USER.id); // restore() found the copied tokens
  const claiming = copy.client.claim();
  await clock.advance(2000);
  assert.equal(await claiming, false);
  assert.equal(copy.client.user, null);
  assert.equal(copy.sessionStorage.getItem("meeting.session"), null);
  assert.deepEqual(copy.calls, []); // not logged out on the server: the first tab goes on with it
  assert.equal(first.client.user.id, USER.id);
  assert.notEqual(first.sessionStorage.getItem("meeting.session"), null);
});

test("claim: a reload gets the lock once the page it replaces lets go, within the wait", async () => {
  const locks = new Locks();
  const clock = new Clock();
  const before = makeClient({ locks, clock });
  assert.equal(await before.client.claim(), true);
  const after = makeClient({ locks, clock, sessionStorage: before.sessionStorage });
  const claiming = after.client.claim();
  await clock.advance(500);
  before.client._releaseLock(); // the browser ends the old document's locks
  await settle();
  assert.equal(await claiming, true);
  assert.equal(after.client.user.id, USER.id);
  assert.deepEqual(clock.pending(), []);
});

test("claim: a fresh login holds its session's lock, a logout lets it go; no Web Locks, no check", async () => {
  const locks = new Locks();
  const clock = new Clock();
  const routes = { "POST /auth/login": () => [200, { access_token: "a", refresh_token: "r", user: USER }],
    "POST /auth/logout": () => [204, undefined] };
  const tab = makeClient({ locks, clock, session: false, routes });
  await tab.client.login("bob", "pw");
  await settle();
  const id = JSON.parse(tab.sessionStorage.getItem("meeting.session")).id;
  assert.match(id, /^[0-9a-f-]{36}$/);
  assert.deepEqual([...locks.held], [`meeting.session.${id}`]);
  const copy = makeClient({ locks, clock, sessionStorage: copyOf(tab.sessionStorage) });
  const claiming = copy.client.claim();
  await clock.advance(2000);
  assert.equal(await claiming, false);
  await tab.client.logout();
  await settle();
  assert.deepEqual([...locks.held], []);
  const noLocks = makeClient({ clock, sessionStorage: copyOf(tab.sessionStorage) }); // plain http: no check
  assert.equal(await noLocks.client.claim(), true);
});

// ---- reads, heartbeat, sending ----------------------------------------------------------

test("reads: a read frame out once synced, message.read in sets the count", () => {
  const { client, sockets, events } = makeClient();
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.unread", { messages: [msg(1), msg(2)], count: 2, has_more: false });
  sockets[0].frame("message.synced", { seq: 2, count: 2 });
  client.markRead([101]);
  assert.deepEqual(sockets[0].sent, [{ type: "read", payload: { ids: [101] } }]);
  sockets[0].frame("message.read", { ids: [101], count: 1 });
  assert.deepEqual(of(events, "read"), [{ ids: [101], count: 1 }]);
  assert.deepEqual(of(events, "unread-count"), [2, 1]);
  sockets[0].frame("message.new", msg(3, { read_at: null }));
  assert.deepEqual(of(events, "unread-count"), [2, 1, 2]);
});

test("markRead: frames of at most 1000 ids and maxFrameBytes bytes, so the server never closes with 1009", async () => {
  const { client, sockets } = makeClient();
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.synced", { seq: 0, count: 0 });
  const ids = Array.from({ length: 2500 }, (_, i) => i + 1);
  await client.markRead(ids);
  assert.deepEqual(sockets[0].sent.map((f) => f.payload.ids.length), [1000, 1000, 500]);
  assert.deepEqual(sockets[0].sent.flatMap((f) => f.payload.ids), ids);

  const big = Array.from({ length: 1000 }, (_, i) => 2 ** 53 - 1 - i); // 16 digits each
  assert.deepEqual(readChunks(big, 4096).map((c) => c.length), [...Array(4).fill(238), 48]);
  for (const chunk of readChunks(big, 4096)) {
    assert.ok(JSON.stringify({ type: "read", payload: { ids: chunk } }).length <= 4096);
  }
  assert.deepEqual(readChunks([]), []);
});

test("markRead over REST is chunked too", async () => {
  const { client, calls } = makeClient({ routes: { "POST /messages/read": () => [200, { updated: 1, count: 0 }] } });
  await client.markRead(Array.from({ length: 1001 }, (_, i) => i + 1));
  assert.deepEqual(calls.map((c) => c.body.ids.length), [1000, 1]);
});

test("markAllRead while synced: the count is the stream's, not the answer's that a later message outdated", async () => {
  const { client, sockets, events } = makeClient();
  const pending = deferredFetch(client);
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.unread", { messages: [msg(1), msg(2)], count: 2, has_more: false });
  sockets[0].frame("message.synced", { seq: 2, count: 2 });
  const marking = client.markAllRead();
  await settle();
  sockets[0].frame("message.read", { ids: [101, 102], count: 0 }); // the server committed
  sockets[0].frame("message.new", msg(3));                          // then 3 arrived
  pending[0].answer(200, { updated: 2, count: 0 });
  await marking;
  assert.deepEqual(of(events, "read"), [{ ids: [101, 102], count: 0 }]);
  assert.deepEqual(of(events, "unread-count"), [2, 0, 1]);
});

test("markRead before the stream is synced goes over REST", async () => {
  const { client, calls, events } = makeClient({ routes: { "POST /messages/read": () => [200, { updated: 1, count: 0 }] } });
  await client.markRead([101]);
  assert.deepEqual(calls.map((c) => [c.path, c.body]), [["/messages/read", { ids: [101] }]]);
  assert.deepEqual(of(events, "unread-count"), [0]);
});

test("heartbeat: a ping each interval; two silent intervals and the socket is given up and reopened", async () => {
  const { client, clock, sockets } = makeClient({ random: () => 0 });
  client.connect();
  sockets[0].connect(10);
  await clock.advance(10000);
  assert.deepEqual(sockets[0].sent, [{ type: "ping" }]);
  sockets[0].frame("pong");
  await clock.advance(20000);
  assert.equal(sockets.length, 1);
  await clock.advance(11000); // nothing heard for more than two intervals
  assert.equal(sockets[0].closedWith, 4000);
  await clock.advance(1000);
  assert.equal(sockets.length, 2);
});

test("send: one Idempotency-Key for every retry of one message", async () => {
  let n = 0;
  const { client, clock, calls } = makeClient({
    routes: { "POST /messages": () => (++n < 3 ? [503, { error: { code: "commit_unknown", message: "?" } }, { "Retry-After": "1" }]
      : [201, { id: 5, content: "hi" }]) },
  });
  const sending = client.send({ recipientIds: [2], content: "hi" });
  await settle();
  await clock.advance(1000);
  await clock.advance(1000);
  assert.deepEqual(await sending, { id: 5, content: "hi" });
  const keys = calls.map((c) => c.headers["Idempotency-Key"]);
  assert.equal(keys.length, 3);
  assert.equal(new Set(keys).size, 1);
  assert.deepEqual(calls[0].body, { recipient_ids: [2], content: "hi" });
});

test("send: a 422 is not retried", async () => {
  const { client, calls } = makeClient({
    routes: { "POST /messages": () => [422, { error: { code: "validation_error", message: "bad", details: { unknown_ids: [9] } } }] },
  });
  await assert.rejects(client.send({ recipientIds: [9], content: "x" }), (e) => e.code === "validation_error" && e.details.unknown_ids[0] === 9);
  assert.equal(calls.length, 1);
});

test("1008, 1011, 1013 and an unexpected 1000 from the server: reconnect with backoff, with since", async () => {
  for (const code of [CLOSE.POLICY, CLOSE.SERVER_ERROR, CLOSE.TRY_AGAIN_LATER, CLOSE.NORMAL]) {
    const { client, clock, sockets } = makeClient({ random: () => 0 });
    client.connect();
    sockets[0].connect();
    sockets[0].frame("message.new", msg(4));
    sockets[0].drop(code);
    await settle();
    assert.deepEqual(clock.pending(), [250], `code ${code}`);
    await clock.advance(250);
    assert.equal(sockets[1].url, "ws://app/ws/messages?since=4");
  }
});

test("message.sent and message.receipt: emitted as sent and receipt; not messages, not unread", () => {
  const { client, sockets, events } = makeClient();
  client.connect();
  sockets[0].connect();
  sockets[0].frame("message.synced", { seq: 0, count: 0 });
  const mine = { id: 43, sender_id: 7, recipient_ids: [1, 3], recipient_count: 2, read_count: 0, content: "hi" };
  sockets[0].frame("message.sent", mine);
  sockets[0].frame("message.receipt", { message_id: 43, read_count: 1, recipient_count: 2, readers: [{ user_id: 1, read_at: "t" }] });
  assert.deepEqual(of(events, "sent"), [mine]);
  assert.deepEqual(of(events, "receipt").map((r) => [r.message_id, r.read_count]), [[43, 1]]);
  assert.deepEqual(of(events, "message"), []);
  assert.deepEqual(of(events, "unread-count"), [0]);
  assert.equal(client.lastSeq, null);
});
