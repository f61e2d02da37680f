import { GATEWAY_URL } from './config';
import { createStore } from './store';

/**
 * The JWT the dashboard uses for the REST reads and the Socket.io handshake.
 *
 * It arrives in the URL fragment (`#token=<jwt>`, removed from the address bar at once), is kept in
 * sessionStorage, and is renewed through `GET /api/demo/token` when the gateway runs in demo mode.
 * Without either, the user pastes one.
 */

const STORAGE_KEY = 'sensorwire.token';
/** Renew this long before `exp`. */
export const RENEW_BEFORE_SECS = 60;

export type TokenStatus =
  | { state: 'unknown' }
  | { state: 'ready' }
  | { state: 'missing'; reason?: string };

/** Whether the app has a usable token; `missing` shows the paste-a-token screen. */
export const tokenStatus = createStore<TokenStatus>({ state: 'unknown' });

export class NoTokenError extends Error {
  constructor(message = 'no token') {
    super(message);
    this.name = 'NoTokenError';
  }
}

export interface Claims {
  sub?: string;
  org_id?: string;
  role?: string;
  exp?: number;
  site_ids?: string[];
}

/** The payload of a JWT (not verified: the gateway does that), or null when it is not one. */
export function decodeJwt(token: string): Claims | null {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === 'object' ? (claims as Claims) : null;
  } catch {
    return null;
  }
}

/** Seconds until the token's `exp` (negative once past; -Infinity without `exp`). */
export function secondsLeft(token: string, now = Date.now()): number {
  const exp = decodeJwt(token)?.exp;
  return typeof exp === 'number' ? exp - now / 1000 : -Infinity;
}

function readStored(): string | null {
  try {
    return sessionStorage.getItem(STORAGE_KEY);
  } catch {
    return null;
  }
}

function store(token: string | null) {
  try {
    if (token) sessionStorage.setItem(STORAGE_KEY, token);
    else sessionStorage.removeItem(STORAGE_KEY);
  } catch {
    /* private mode: keep it in memory only */
  }
  memory = token;
}

let memory: string | null = null;

/** Reads `#token=` from the URL once at start-up, stores it, and cleans the address bar. */
export function captureTokenFromUrl(): void {
  memory = readStored();
  const hash = window.location.hash.replace(/^#/, '');
  if (!hash) return;
  const params = new URLSearchParams(hash);
  const token = params.get('token');
  if (!token) return;
  store(token.trim());
  params.delete('token');
  const rest = params.toString();
  const url = window.location.pathname + window.location.search + (rest ? `#${rest}` : '');
  window.history.replaceState(window.history.state, '', url);
}

/** The token currently held, whatever its age. */
export function currentToken(): string | null {
  return memory ?? readStored();
}

/** Sets a token the user pasted. Returns an error message when it is obviously unusable. */
export function setToken(raw: string): string | null {
  const token = raw.trim().replace(/^Bearer\s+/i, '');
  const claims = decodeJwt(token);
  if (!claims) return 'That does not look like a JWT (three base64url parts separated by dots).';
  if (typeof claims.exp === 'number' && claims.exp * 1000 < Date.now()) {
    return 'That token has expired.';
  }
  store(token);
  tokenStatus.set({ state: 'ready' });
  return null;
}

/** Forgets the token (sign out, or the gateway refused it). */
export function clearToken(reason?: string): void {
  store(null);
  tokenStatus.set({ state: 'missing', reason });
}

let demoRequest: Promise<string | null> | null = null;
/** Set once the gateway answered 404: it has no demo mode, so it is not asked again. */
let noDemoMode = false;

/** A fresh token from the gateway's demo mode, or null when the gateway has no demo mode. */
function fetchDemoToken(): Promise<string | null> {
  if (noDemoMode) return Promise.resolve(null);
  demoRequest ??= (async () => {
    try {
      const res = await fetch(`${GATEWAY_URL}/api/demo/token`, {
        headers: { Accept: 'application/json' },
      });
      if (res.status === 404) noDemoMode = true;
      if (!res.ok) return null;
      const body = (await res.json()) as { token?: unknown };
      return typeof body.token === 'string' ? body.token : null;
    } catch {
      return null;
    } finally {
      demoRequest = null;
    }
  })();
  return demoRequest;
}

/**
 * Whether `fresh` (from the demo endpoint) may replace `stored`: only as the same user — the same
 * `sub` in the same organisation. A token the user pasted (or opened with `#token=`) for someone
 * else is never swapped for the demo identity, even when this gateway runs the demo: it is used
 * until it runs out, and then the app asks for a new one.
 */
function sameUser(stored: string, fresh: string): boolean {
  const a = decodeJwt(stored);
  const b = decodeJwt(fresh);
  return !!a && !!b && a.sub === b.sub && a.org_id === b.org_id;
}

/** The stored token the demo identity was found not to match (so the demo is not asked again). */
let notDemoUser: string | null = null;

/**
 * A token to use now: the stored one while it is more than a minute from `exp`, otherwise a new
 * one from the demo endpoint for the same user (falling back to the stored one while it has not
 * expired yet). `force` skips the stored token (the gateway refused it). Rejects with
 * `NoTokenError` (and switches the app to the paste-a-token screen) when there is none.
 */
export async function getToken(opts: { force?: boolean } = {}): Promise<string> {
  const stored = currentToken();
  if (stored && !opts.force && secondsLeft(stored) > RENEW_BEFORE_SECS) {
    markReady();
    return stored;
  }
  const fresh = stored && notDemoUser === stored ? null : await fetchDemoToken();
  if (fresh && (!stored || sameUser(stored, fresh))) {
    store(fresh);
    markReady();
    return fresh;
  }
  if (fresh && stored) notDemoUser = stored;
  if (stored && !opts.force && secondsLeft(stored) > 0) {
    markReady();
    return stored;
  }
  const reason = !stored
    ? undefined
    : opts.force
      ? 'The gateway did not accept your token. Paste a new one to continue.'
      : 'Your token has expired. Paste a new one to continue.';
  if (stored) store(null);
  tokenStatus.set({ state: 'missing', reason });
  throw new NoTokenError(reason);
}

/** Who the current token says is signed in (not verified: the gateway does that). */
export function currentClaims(): Claims | null {
  const t = currentToken();
  return t ? decodeJwt(t) : null;
}

/** Operators and admins may acknowledge alerts (a missing role is a viewer). */
export function canAcknowledge(claims: Claims | null): boolean {
  return claims?.role === 'operator' || claims?.role === 'admin';
}

function markReady() {
  if (tokenStatus.get().state !== 'ready') tokenStatus.set({ state: 'ready' });
}
