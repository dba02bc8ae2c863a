// meeting-protocol.js: what meeting-client.js and its parts share about the server's
// protocol: close codes, frame limits, backoff, ids for Idempotency-Key, errors, events.
// Imported through meeting-client.js, the public entry point, which re-exports it.

/** Close codes the server uses on /ws/messages (docs/websocket.md, "Close codes"). */
export const CLOSE = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, UNSUPPORTED: 1003, ABNORMAL: 1006, POLICY: 1008, TOO_BIG: 1009,
  SERVER_ERROR: 1011, TRY_AGAIN_LATER: 1013, TOKEN_EXPIRED: 4001, TOO_MANY_CONNECTIONS: 4029,
});

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

// Browsers and Node >= 19 have CustomEvent; Node 18 (tests) has Event only.
export const DetailEvent = globalThis.CustomEvent ?? class extends Event {
  constructor(type, init) { super(type); this.detail = init?.detail; }
};
