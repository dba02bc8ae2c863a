// meeting-session.js: the signed-in half of meeting-client.js: login, tokens kept per tab
// with single-flight refresh, duplicated tabs told apart from reloads, and REST calls.
// MeetingClient (meeting-client.js, the public entry point) adds the message stream.
import { ApiError, DetailEvent, backoffDelay, uuid4 } from "./meeting-protocol.js";

const SESSION_KEY = "meeting.session";
const RETRYABLE = new Set([502, 503, 504]);

/** One signed-in user in one tab, over REST. Events: `session`, `error` (see MeetingClient). */
export class SessionClient extends EventTarget {
  constructor(options = {}) {
    super();
    const g = globalThis;
    this.baseUrl = (options.baseUrl ?? g.location?.origin ?? "").replace(/\/$/, "");
    this._fetch = options.fetch ?? g.fetch.bind(g);
    this._sessionStore = options.sessionStorage ?? g.sessionStorage; // tokens, per tab
    this._random = options.random ?? Math.random;
    this._setTimeout = options.setTimeout ?? g.setTimeout.bind(g);
    this._clearTimeout = options.clearTimeout ?? g.clearTimeout.bind(g);
    this._crypto = options.crypto ?? g.crypto;
    this._locks = options.locks !== undefined ? options.locks : g.navigator?.locks; // Web Locks, secure contexts only
    this.backoff = { initial: 500, max: 30000, ...options.backoff };
    this.session = null;     // {accessToken, refreshToken, user, id}
    this._refreshing = null;
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
    this._userChanged(session.user.id);
    this._emit("session", { user: session.user });
  }

  _clearSession() {
    this.session = null;
    this._releaseLock?.();
    this._releaseLock = null;
    this._generation += 1;
    this._refreshing = null;
    this._userChanged(null);
    this._sessionStore?.removeItem(SESSION_KEY);
    this._emit("session", { user: null });
  }

  /** For subclasses: the signed-in user is now `id` (null: nobody). */
  _userChanged(id) {}

  /** For subclasses: stop what runs for the session (the stream); called when it ended. */
  close() {}

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
    // A 401 answered after a logout (and perhaps a new login) is about the session that
    // sent the request: it must neither end the current one nor refresh it.
    const generation = this._generation;
    try {
      return await this._request(method, path, body, this.session.accessToken, idempotencyKey, signal);
    } catch (error) {
      if (generation !== this._generation) throw error;
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
}
