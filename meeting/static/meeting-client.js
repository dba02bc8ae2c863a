// meeting-client.js: the reference browser client of `meeting` (docs/frontend.md).
// An ES module with no dependencies and no build step, and the public entry point: it
// imports meeting-session.js and meeting-protocol.js from its own directory and re-exports
// what they offer. Everything it touches in the browser (fetch, WebSocket, storage, timers,
// randomness, locks) can be passed in, so that tests/js/meeting-client.test.mjs runs the
// same code under `node --test`.

import { ApiError, CLOSE, backoffDelay, goingAwayDelay, readChunks } from "./meeting-protocol.js";
import { SessionClient } from "./meeting-session.js";

export {
  ApiError, CLOSE, READ_IDS_MAX, backoffDelay, goingAwayDelay, readChunks, uuid4,
} from "./meeting-protocol.js";
export { SessionClient } from "./meeting-session.js";

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
 *   sent          a message this user sent, from any device (message.sent; live only)
 *   receipt       {message_id, read_count, recipient_count, readers} (message.receipt; live only)
 */
export class MeetingClient extends SessionClient {
  constructor(options = {}) {
    super(options);
    const g = globalThis;
    this._WebSocket = options.WebSocket ?? g.WebSocket;
    this._store = options.storage ?? g.localStorage;              // since, per user
    this._now = options.now ?? (() => Date.now());
    this.maxFrameBytes = options.maxFrameBytes ?? 65536; // the server's push.max_frame_size
    this.state = "offline";
    this.lastSeq = null;     // resume point: every seq up to it was delivered; persisted per user
    this.unreadCount = null;
    this._seen = new Set();  // seqs already delivered by this client
    this._socket = null;
    this._stopped = true;
    this._attempt = 0;
    this._timer = null;
    this._heartbeatTimer = null;
    this._synced = false;
    this._rest = null;       // {socket, controller, held}: a backlog's REST pages being fetched
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("status", { state, ...extra });
  }

  _userChanged(id) {
    if (id !== null && this._sinceUser === id) return; // a token refresh: same user, same stream
    // Another user, or none: a page that logs in again shows its history again, so none of
    // it may count as already delivered; since is the one kept for that user.
    this._sinceUser = id ?? undefined;
    const stored = id === null ? NaN : Number(this._store?.getItem(this._sinceKey()));
    this.lastSeq = Number.isSafeInteger(stored) && stored > 0 ? stored : null;
    this._seen = new Set();
    if (id === null) this.unreadCount = null;
  }

  _sinceKey() {
    return `meeting.since.${this._sinceUser}`;
  }

  // ---- reads and history ----------------------------------------------------------

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
      case "message.sent": // a message this user sent, from any device (no seq: not in the inbox)
        this._emit("sent", p);
        break;
      case "message.receipt":
        this._emit("receipt", p);
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
    if (typeof seq !== "number" || seq < 1) return; // 0: nothing delivered yet, no resume point
    if (this.lastSeq !== null && seq <= this.lastSeq) return;
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
    const generation = this._generation;
    try {
      if (!expired) {
        try {
          await this._request("GET", "/users/me", undefined, this.session.accessToken);
          return "ok";
        } catch (error) {
          if (generation !== this._generation) return "dead"; // about a session logged out meanwhile
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
