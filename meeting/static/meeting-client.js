// meeting-client.js: the reference browser client of `meeting` (docs/frontend.md).
// An ES module with no dependencies and no build step. Everything it touches in the
// browser (fetch, WebSocket, storage, timers, randomness) can be passed in, so that
// tests/js/meeting-client.test.mjs runs the same code under `node --test`.

/** Close codes the server uses on /ws/messages (docs/websocket.md, "Close codes"). */
export const CLOSE = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, UNSUPPORTED: 1003, ABNORMAL: 1006, POLICY: 1008, TOO_BIG: 1009,
  SERVER_ERROR: 1011, TRY_AGAIN_LATER: 1013, TOKEN_EXPIRED: 4001, TOO_MANY_CONNECTIONS: 4029,
});

/** Codes after which reconnecting would only repeat the failure: stop and report. */
const FATAL = new Map([
  [CLOSE.TOO_MANY_CONNECTIONS, ["too_many_connections", "Too many open connections for this user: close another tab or device."]],
]);

/** A frame this client sent was refused: reported (a bug to fix), never sent again, but the
 *  stream is still wanted, so reconnect with backoff. */
const REFUSED = new Map([
  [CLOSE.UNSUPPORTED, ["client_bug", "The server refused a frame this client sent (1003); reconnecting."]],
  [CLOSE.TOO_BIG, ["client_bug", "A frame this client sent was too large (1009); reconnecting."]],
]);

/** The most ids one `read` frame or POST /messages/read takes (docs/websocket.md, `read`). */
export const READ_IDS_MAX = 1000;

/**
 * Ids split into `read` frames the server takes: at most READ_IDS_MAX ids and `maxBytes`
 * bytes (push.max_frame_size; a bigger frame closes the socket with 1009) each.
 */
export function readChunks(ids, maxBytes = 65536) {
  const empty = JSON.stringify({ type: "read", payload: { ids: [] } }).length;
  const chunks = [];
  let chunk = [], size = empty;
  for (const id of ids) {
    const add = String(id).length + (chunk.length ? 1 : 0);
    if (chunk.length && (chunk.length >= READ_IDS_MAX || size + add > maxBytes)) {
      chunks.push(chunk);
      chunk = [];
      size = empty;
    }
    size += String(id).length + (chunk.length ? 1 : 0);
    chunk.push(id);
  }
  if (chunk.length) chunks.push(chunk);
  return chunks;
}

/**
 * Exponential backoff with "equal jitter": half the step is fixed, half random, so a
 * crowd of clients that lost one server does not come back in one wave.
 * attempt 0 -> 250-500 ms, 1 -> 500-1000 ms, ... capped at `max`.
 */
export function backoffDelay(attempt, { initial = 500, max = 30000 } = {}, random = Math.random) {
  const step = Math.min(max, initial * 2 ** attempt);
  return step / 2 + random() * (step / 2);
}

/** A 1001 (server going away) is answered at once, with a little jitter: 100-500 ms. */
export function goingAwayDelay(random = Math.random) {
  return 100 + random() * 400;
}

/** A random UUID v4 for Idempotency-Key. crypto.randomUUID needs a secure context;
 *  getRandomValues works on plain http too (a LAN address). */
export function uuid4(crypto = globalThis.crypto) {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** An error answered by the server: `code` is its stable snake_case code. */
export class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message || code);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

const SESSION_KEY = "meeting.session";
// Browsers and Node >= 19 have CustomEvent; Node 18 (tests) has Event only.
const DetailEvent = globalThis.CustomEvent ?? class extends Event {
  constructor(type, init) { super(type); this.detail = init?.detail; }
};
const RETRYABLE = new Set([502, 503, 504]);

/**
 * One signed-in user on one device: REST calls with token refresh, and the message
 * stream with reconnect, resume, de-duplication and read sync.
 *
 * Events (CustomEvent, data in `event.detail`):
 *   message       a received message, once per seq, in seq order within a connection
 *   read          {ids, count}: these messages are read now (from any device)
 *   unread-count  a number: the server's unread count
 *   synced        {seq, count}: everything up to seq was delivered
 *   status        {state: "connecting"|"connected"|"reconnecting"|"offline", delay?}
 *   error         {code, message}: what the user should know (session ended, 4029, ...)
 *   session       {user} after login/refresh/restore, {user: null} after logout or a dead session
 */
export class MeetingClient extends EventTarget {
  constructor(options = {}) {
    super();
    const g = globalThis;
    this.baseUrl = (options.baseUrl ?? g.location?.origin ?? "").replace(/\/$/, "");
    this._fetch = options.fetch ?? g.fetch.bind(g);
    this._WebSocket = options.WebSocket ?? g.WebSocket;
    this._store = options.storage ?? g.localStorage;              // since, per user
    this._sessionStore = options.sessionStorage ?? g.sessionStorage; // tokens, per tab
    this._random = options.random ?? Math.random;
    this._setTimeout = options.setTimeout ?? g.setTimeout.bind(g);
    this._clearTimeout = options.clearTimeout ?? g.clearTimeout.bind(g);
    this._now = options.now ?? (() => Date.now());
    this._crypto = options.crypto ?? g.crypto;
    this._locks = options.locks !== undefined ? options.locks : g.navigator?.locks; // Web Locks, secure contexts only
    this.backoff = { initial: 500, max: 30000, ...options.backoff };
    this.maxFrameBytes = options.maxFrameBytes ?? 65536; // the server's push.max_frame_size
    this.session = null;     // {accessToken, refreshToken, user}
    this.state = "offline";
    this.lastSeq = null;     // resume point: every seq up to it was delivered; persisted per user
    this.unreadCount = null;
    this._seen = new Set();  // seqs already delivered by this client
    this._socket = null;
    this._stopped = true;
    this._attempt = 0;
    this._timer = null;
    this._heartbeatTimer = null;
    this._refreshing = null;
    this._synced = false;
    this._rest = null;       // {socket, controller, held}: a backlog's REST pages being fetched
    this._generation = 0;    // +1 at each login and logout: answers for an older session are dropped
    this._releaseLock = null; // ends this tab's hold on its session's lock
  }

  // ---- events -------------------------------------------------------------------

  /** Subscribe; returns the function that unsubscribes. */
  on(type, listener) {
    const wrapped = (event) => listener(event.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  _emit(type, detail) {
    this.dispatchEvent(new DetailEvent(type, { detail }));
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("status", { state, ...extra });
  }

  // ---- session ------------------------------------------------------------------

  get user() {
    return this.session?.user ?? null;
  }

  /** The session kept in this tab's sessionStorage, if any: a reload needs no new login. */
  restore() {
    const raw = this._sessionStore?.getItem(SESSION_KEY);
    if (!raw) return null;
    try {
      this._setSession(JSON.parse(raw));
    } catch {
      this._sessionStore.removeItem(SESSION_KEY);
      return null;
    }
    return this.user;
  }

  /**
   * After restore(): may this tab go on with the session it found? "Duplicate tab" and
   * window.open copy sessionStorage, and two tabs with one rotating refresh token revoke each
   * other (a spent refresh token presented again ends the session). Each tab holds a Web Lock
   * named after its session while it lives; a copy finds it held, forgets the copied session
   * here (not on the server: the other tab still uses it) and returns false: log in afresh.
   * A reload waits up to `wait` ms for the page it replaces to let go of the lock. Without
   * Web Locks (plain http on a LAN address) every tab may go on.
   */
  async claim({ wait = 2000 } = {}) {
    const session = this.session;
    if (!session) return false;
    if (!this._locks) return true;
    if (!session.id) this._setSession({ ...session, id: uuid4(this._crypto) });
    if (await this._hold(this.session.id, wait)) return true;
    if (this.session?.id === session.id) this._clearSession();
    return false;
  }

  /** Hold the lock `meeting.session.<id>` until the session is cleared; false when another
   *  tab holds it for longer than `wait` ms. */
  _hold(id, wait) {
    this._releaseLock?.();
    return new Promise((resolve) => {
      const controller = new AbortController();
      const timer = wait === null ? null : this._setTimeout(() => controller.abort(), wait);
      this._locks.request(`meeting.session.${id}`, { signal: controller.signal }, () => {
        this._clearTimeout(timer);
        resolve(true);
        return new Promise((release) => { this._releaseLock = release; });
      }).catch(() => resolve(false));
    });
  }

  async register(username, password, displayName) {
    const body = { username, password };
    if (displayName) body.display_name = displayName;
    return this.api("POST", "/auth/register", body, { auth: false });
  }

  async login(username, password) {
    const answer = await this.api("POST", "/auth/login", { username, password }, { auth: false });
    this._generation += 1;
    this._setSession({
      accessToken: answer.access_token, refreshToken: answer.refresh_token, user: answer.user, id: uuid4(this._crypto),
    });
    if (this._locks) this._hold(this.session.id, null); // a copy of this tab will find it held
    return this.user;
  }

  /** End this session on the server (its sockets close with 4001 everywhere) and here. */
  async logout() {
    const token = this.session?.accessToken;
    this.close();
    this._clearSession();
    if (token) {
      try {
        await this._request("POST", "/auth/logout", undefined, token);
      } catch { /* the session is gone here either way */ }
    }
  }

  _setSession(session) {
    this.session = session;
    this._sessionStore?.setItem(SESSION_KEY, JSON.stringify(session));
    if (this._sinceUser !== session.user.id) {
      this._sinceUser = session.user.id;
      const stored = Number(this._store?.getItem(this._sinceKey()));
      this.lastSeq = Number.isSafeInteger(stored) && stored > 0 ? stored : null;
      this._seen = new Set();
    }
    this._emit("session", { user: session.user });
  }

  _clearSession() {
    this.session = null;
    this._releaseLock?.();
    this._releaseLock = null;
    this._generation += 1;
    this._refreshing = null;
    // the next login (maybe another user) starts afresh: a page that logs in again
    // shows its history again, so none of it may count as already delivered
    this._sinceUser = undefined;
    this._seen = new Set();
    this.lastSeq = null;
    this.unreadCount = null;
    this._sessionStore?.removeItem(SESSION_KEY);
    this._emit("session", { user: null });
  }

  _sinceKey() {
    return `meeting.since.${this._sinceUser}`;
  }

  /**
   * A new access token from the refresh token (POST /auth/refresh). Single-flight: refresh
   * tokens are good for one use, and presenting a spent one ends the session, so two
   * concurrent refreshes must never both reach the server.
   */
  refresh() {
    if (!this._refreshing) {
      const refreshing = this._doRefresh().finally(() => {
        if (this._refreshing === refreshing) this._refreshing = null;
      });
      this._refreshing = refreshing;
    }
    return this._refreshing;
  }

  async _doRefresh() {
    const session = this.session;
    const generation = this._generation;
    if (!session) throw new ApiError(401, "not_logged_in", "Not logged in.");
    // A logout (or another login) while the request is out: its answer, good or bad, is for
    // a session this client no longer has, and must neither bring it back nor end the new one.
    const stale = () => new ApiError(0, "session_changed", "Logged out while the token was being refreshed.");
    let answer;
    try {
      answer = await this._request("POST", "/auth/refresh", { refresh_token: session.refreshToken });
    } catch (error) {
      if (generation !== this._generation) throw stale();
      if (error instanceof ApiError && error.status === 401) this._sessionEnded(error);
      throw error;
    }
    if (generation !== this._generation) throw stale();
    this._setSession({ ...session, accessToken: answer.access_token, refreshToken: answer.refresh_token });
    return this.session.accessToken;
  }

  _sessionEnded(error) {
    this.close();
    this._clearSession();
    this._emit("error", { code: "session_ended", message: `Your session ended (${error.code}); log in again.` });
  }

  // ---- REST ---------------------------------------------------------------------

  /**
   * One REST call: JSON in, JSON out, ApiError on a non-2xx answer. An authenticated call
   * that gets 401 token_expired refreshes the token once and is sent again.
   */
  async api(method, path, body, { auth = true, idempotencyKey, signal } = {}) {
    if (!auth) return this._request(method, path, body, null, idempotencyKey, signal);
    if (!this.session) throw new ApiError(401, "not_logged_in", "Not logged in.");
    try {
      return await this._request(method, path, body, this.session.accessToken, idempotencyKey, signal);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401 && error.code === "token_expired")) {
        if (error instanceof ApiError && error.status === 401) this._sessionEnded(error);
        throw error;
      }
    }
    const token = await this.refresh();
    return this._request(method, path, body, token, idempotencyKey, signal);
  }

  async _request(method, path, body, token, idempotencyKey, signal) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers.Authorization = `Bearer ${token}`;
    if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
    const response = await this._fetch(this.baseUrl + path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal,
    });
    if (response.status === 204) return null;
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      const e = data?.error ?? {};
      const error = new ApiError(response.status, e.code ?? `http_${response.status}`, e.message, e.details ?? null);
      error.retryAfter = Number(response.headers?.get?.("Retry-After")) || null;
      throw error;
    }
    return data;
  }

  /**
   * Send a message. One Idempotency-Key for the message and all its retries, so a retry
   * after a lost answer (network error, 502/503/504) never stores it twice.
   */
  async send({ recipientIds, content, meetingId = null }, { attempts = 4 } = {}) {
    const key = uuid4(this._crypto);
    const body = { recipient_ids: recipientIds, content };
    if (meetingId !== null) body.meeting_id = meetingId;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.api("POST", "/messages", body, { idempotencyKey: key });
      } catch (error) {
        const retryable = !(error instanceof ApiError) || RETRYABLE.has(error.status) || error.status === 429;
        if (!retryable || attempt + 1 >= attempts) throw error;
        const wait = error.retryAfter ? error.retryAfter * 1000 : backoffDelay(attempt, this.backoff, this._random);
        await new Promise((resolve) => this._setTimeout(resolve, wait));
      }
    }
  }

  /** Mark messages read: a `read` frame while connected, else POST /messages/read. Every
   *  device (this one included) then gets `message.read`. */
  async markRead(ids) {
    for (const chunk of readChunks(ids, this.maxFrameBytes)) {
      if (this._socket && this._synced && this._socket.readyState === 1) {
        this._socket.send(JSON.stringify({ type: "read", payload: { ids: chunk } }));
      } else {
        this._setCount((await this.api("POST", "/messages/read", { ids: chunk })).count);
      }
    }
  }

  /** Mark everything received read (POST /messages/read {all: true}). Which messages that
   *  covered comes in `message.read` (`read` event), in order with the stream: a message that
   *  arrived after the server's commit is not among them. While synced, the stream's count is
   *  also the right one (the answer's may be older than a message.new already counted). */
  async markAllRead() {
    const answer = await this.api("POST", "/messages/read", { all: true });
    if (!this._synced) this._setCount(answer.count);
    return answer;
  }

  /** Users whose username starts with `prefix` (GET /users?q=). */
  async findUsers(prefix, limit = 10) {
    const q = new URLSearchParams({ q: prefix, limit: String(limit) });
    return (await this.api("GET", `/users?${q}`)).users;
  }

  /** Ids for exact usernames; ApiError unknown_users (details.usernames) for the rest. */
  async resolveUsernames(names) {
    const wanted = [...new Set(names.map((n) => n.trim().toLowerCase()).filter(Boolean))];
    const found = await Promise.all(wanted.map(async (name) => {
      const users = await this.findUsers(name, 1);
      return users.length && users[0].username === name ? users[0].id : null;
    }));
    const unknown = wanted.filter((_, i) => found[i] === null);
    if (unknown.length) throw new ApiError(422, "unknown_users", `No such user: ${unknown.join(", ")}`, { usernames: unknown });
    return found;
  }

  /**
   * Messages the page already shows from a REST page (GET /messages): the stream does not
   * repeat them. The resume point does not move: a page is the newest N, not everything up to
   * its newest, so the replay after `since` (or the unread backlog) must still fill what came
   * before it. Returns those that were not seen yet.
   */
  seed(messages) {
    return messages.filter((m) => {
      if (typeof m.seq !== "number" || this._seen.has(m.seq)) return false;
      this._seen.add(m.seq);
      return true;
    });
  }

  /**
   * What a page shows before the stream opens: the newest `limit` received messages
   * (GET /messages) and, when the stream will resume after a stored `since`, the unread ones
   * older than both (GET /messages/unread): a replay brings only what came after `since`,
   * and only a connection without one gets the unread backlog. All of them are seeded (the
   * stream repeats none); returns those not seen yet.
   */
  async loadHistory(limit = 50) {
    const page = await this.api("GET", `/messages?limit=${limit}`);
    const found = [...page.messages];
    const resume = this.lastSeq;
    if (resume !== null && page.next_before !== null && page.messages.length) {
      const below = Math.min(resume + 1, ...page.messages.map((m) => m.seq));
      for (let after = 0; after !== null;) {
        const unread = await this.api("GET", `/messages/unread?after_seq=${after}&limit=100`);
        const older = unread.messages.filter((m) => m.seq < below);
        found.push(...older);
        after = older.length < unread.messages.length ? null : unread.next_after_seq;
      }
    }
    return this.seed(found);
  }

  // ---- the stream ---------------------------------------------------------------

  /** Open /ws/messages and keep it open until close() (or a session that cannot go on). */
  connect() {
    if (!this.session) throw new ApiError(401, "not_logged_in", "Not logged in.");
    this._stopped = false;
    this._attempt = 0;
    this._open();
  }

  /** Close the stream for good (1000). */
  close() {
    this._stopped = true;
    this._cancelRest();
    this._clearTimeout(this._timer);
    this._stopHeartbeat();
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      this._detach(socket);
      if (socket.readyState <= 1) socket.close(CLOSE.NORMAL);
    }
    if (this.state !== "offline") this._setState("offline");
  }

  _url() {
    const base = this.baseUrl.replace(/^http/, "ws");
    return `${base}/ws/messages${this.lastSeq === null ? "" : `?since=${this.lastSeq}`}`;
  }

  _open() {
    if (this._stopped) return;
    this._setState(this._attempt === 0 && this.state !== "reconnecting" ? "connecting" : "reconnecting");
    this._synced = false;
    this._connected = false;
    // The token rides in the subprotocol, never in the URL (docs/frontend.md, "Auth").
    const socket = new this._WebSocket(this._url(), ["bearer", this.session.accessToken]);
    this._socket = socket;
    socket.onmessage = (event) => this._onFrame(socket, event.data);
    socket.onclose = (event) => this._onClose(socket, event.code);
    socket.onerror = () => {}; // always followed by close, where it is handled
  }

  _detach(socket) {
    socket.onmessage = socket.onclose = socket.onerror = null;
  }

  _onFrame(socket, data) {
    if (socket !== this._socket) return;
    this._lastFrameAt = this._now();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const p = frame.payload ?? {};
    switch (frame.type) {
      case "connected":
        this._connected = true;
        this._attempt = 0;
        this._startHeartbeat(socket, Number(p.heartbeat) || 30);
        break;
      case "message.unread":
        for (const m of p.messages ?? []) this._deliver(m);
        if (p.has_more) this._fetchRest(socket, p.messages.at(-1)?.seq ?? this.lastSeq ?? 0);
        break;
      case "message.new":
        if (this._deliver(p) && this._synced && p.read_at === null && this.unreadCount !== null) {
          this._setCount(this.unreadCount + 1);
        }
        break;
      case "message.synced":
        this._advance(p.seq); // also past read messages a backlog leaves out
        this._synced = true;
        this._setState("connected");
        this._emit("synced", { seq: p.seq, count: p.count });
        this._setCount(p.count);
        break;
      case "message.read":
        this._emit("read", { ids: p.ids, count: p.count });
        this._setCount(p.count);
        break;
      case "token.expiring":
        this.refresh().then((token) => {
          if (socket === this._socket && socket.readyState === 1) {
            socket.send(JSON.stringify({ type: "refresh", payload: { token } }));
          }
        }, () => { /* a dead session was reported; else the 4001 that follows retries */ });
        break;
      case "error":
        this._emit("error", { code: p.code, message: p.message });
        break;
      default: // pong, token.refreshed, and frame types added later
        break;
    }
  }

  /** True when the message is new to this client (not a duplicate seq). The stream brings
   *  seqs gap-free, so each one it delivers, seen before or not, is a resume point. */
  _accept(message) {
    const seq = message.seq;
    if (typeof seq !== "number") return false;
    this._advance(seq);
    if (this._seen.has(seq)) return false;
    this._seen.add(seq);
    return true;
  }

  /** Everything up to `seq` was delivered: resume after it, here and after a reload. While a
   *  backlog's REST pages are still coming, it was not: hold the point until they are in. */
  _advance(seq) {
    if (typeof seq !== "number" || (this.lastSeq !== null && seq <= this.lastSeq)) return;
    if (this._rest) {
      this._rest.held = Math.max(this._rest.held ?? seq, seq);
      return;
    }
    this.lastSeq = seq;
    this._store?.setItem(this._sinceKey(), String(seq));
  }

  _deliver(message) {
    if (!this._accept(message)) return false;
    this._emit("message", message);
    return true;
  }

  _setCount(count) {
    if (typeof count !== "number" || count === this.unreadCount) return;
    this.unreadCount = count;
    this._emit("unread-count", count);
  }

  /**
   * The rest of a backlog longer than the socket carries (has_more), over REST, for as long
   * as that socket lives. Meanwhile live frames are delivered but `since` stays before the
   * unfetched pages (see _advance), so a reload or reconnect mid-way gets them again. A failed
   * page is a lost connection: reconnect with backoff, and the replay after `since` brings them.
   */
  async _fetchRest(socket, afterSeq) {
    if (this._rest) return;
    const rest = { socket, controller: new AbortController(), held: null };
    this._rest = rest;
    try {
      for (let after = afterSeq; after !== null;) {
        const page = await this.api("GET", `/messages/unread?after_seq=${after}&limit=100`, undefined,
          { signal: rest.controller.signal });
        if (this._rest !== rest) return; // closed, logged out or reconnected meanwhile
        for (const m of page.messages) this._deliver(m);
        after = page.next_after_seq;
      }
      this._rest = null;
      this._advance(rest.held);
    } catch (error) {
      if (this._rest !== rest) return;
      this._rest = null; // what it held is dropped: since stays before the pages not fetched
      this._emit("error", { code: error.code ?? "network_error", message: `Loading older unread messages failed: ${error.message}` });
      this._lost(socket, CLOSE.ABNORMAL);
    }
  }

  _cancelRest() {
    this._rest?.controller.abort();
    this._rest = null;
  }

  _startHeartbeat(socket, seconds) {
    // The server pings at the protocol level (browsers answer by themselves). We also
    // ping, so a dead link is noticed here within two heartbeats even without a close.
    this._stopHeartbeat();
    const interval = seconds * 1000;
    const tick = () => {
      if (socket !== this._socket) return;
      if (this._now() - this._lastFrameAt > 2 * interval) {
        this._lost(socket, CLOSE.ABNORMAL);
        return;
      }
      if (socket.readyState === 1) socket.send(JSON.stringify({ type: "ping" }));
      this._heartbeatTimer = this._setTimeout(tick, interval);
    };
    this._heartbeatTimer = this._setTimeout(tick, interval);
  }

  _stopHeartbeat() {
    this._clearTimeout(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }

  /** Give up on a socket that stopped answering, and go on as if it had closed. */
  _lost(socket, code) {
    this._detach(socket);
    try { socket.close(4000, "no heartbeat"); } catch { /* already closing */ }
    this._onClose(socket, code);
  }

  async _onClose(socket, code) {
    if (socket !== this._socket) return;
    this._cancelRest();
    this._detach(socket);
    this._socket = null;
    this._stopHeartbeat();
    this._synced = false;
    if (this._stopped) return;
    if (REFUSED.has(code)) {
      const [errorCode, message] = REFUSED.get(code);
      this._emit("error", { code: errorCode, message });
    }
    if (FATAL.has(code)) {
      const [errorCode, message] = FATAL.get(code);
      this._stopped = true;
      this._setState("offline");
      this._emit("error", { code: errorCode, message });
      return;
    }
    if (code === CLOSE.TOKEN_EXPIRED || !this._connected) {
      // 4001: the token expired or its session was logged out. A socket that closed before
      // `connected` may have been refused with 401 (a browser only sees 1006): ask REST.
      const fine = await this._checkToken(code === CLOSE.TOKEN_EXPIRED);
      if (fine === "dead" || this._stopped) return;
      if (fine === "refreshed") {
        this._schedule(0);
        return;
      }
    }
    if (code === CLOSE.GOING_AWAY) {
      this._schedule(goingAwayDelay(this._random));
      return;
    }
    this._schedule(backoffDelay(this._attempt++, this.backoff, this._random));
  }

  /** "refreshed", "ok" (token fine or server unreachable: back off) or "dead". */
  async _checkToken(expired) {
    try {
      if (!expired) {
        try {
          await this._request("GET", "/users/me", undefined, this.session.accessToken);
          return "ok";
        } catch (error) {
          if (!(error instanceof ApiError) || error.status !== 401) return "ok";
          if (error.code !== "token_expired") {
            this._sessionEnded(error);
            return "dead";
          }
        }
      }
      await this.refresh();
      return "refreshed";
    } catch (error) {
      return error instanceof ApiError && error.status === 401 ? "dead" : "ok";
    }
  }

  _schedule(delay) {
    this._setState("reconnecting", { delay });
    this._clearTimeout(this._timer);
    this._timer = this._setTimeout(() => this._open(), delay);
  }
}
