import { GATEWAY_URL } from './config';
import { getToken } from './token';

/** An HTTP error answered by the gateway (`{ error, message }`). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

/** GET a JSON resource of the gateway with the current token; one retry with a new token on 401. */
export async function apiGet<T>(path: string, signal?: AbortSignal): Promise<T> {
  return (await apiGetPage<T>(path, signal)).data;
}

/** A GET's body with the `X-Next-Cursor` of a paged list (null on the last page). */
export async function apiGetPage<T>(path: string, signal?: AbortSignal): Promise<{ data: T; nextCursor: string | null }> {
  const res = await send('GET', path, undefined, signal);
  return { data: (await res.json()) as T, nextCursor: res.headers.get('X-Next-Cursor') || null };
}

/** GET a file of the gateway (a CSV export) with the current token, as a Blob. */
export async function apiGetBlob(path: string): Promise<Blob> {
  return (await send('GET', path, undefined)).blob();
}

/** POST JSON with the current token; the answer's JSON (or null when it has no body). */
export async function apiPost<T>(path: string, body: unknown): Promise<T> {
  const res = await send('POST', path, body);
  const text = await res.text();
  return (text ? JSON.parse(text) : null) as T;
}

async function send(method: string, path: string, body: unknown, signal?: AbortSignal): Promise<Response> {
  let res = await request(method, path, await getToken(), body, signal);
  if (res.status === 401) res = await request(method, path, await getToken({ force: true }), body, signal);
  if (!res.ok) {
    let code = 'http_error';
    let message = `${res.status} ${res.statusText}`;
    try {
      const json = (await res.json()) as { error?: string; message?: string };
      code = json.error ?? code;
      message = json.message ?? message;
    } catch {
      /* not JSON */
    }
    throw new ApiError(res.status, code, message);
  }
  return res;
}

function request(method: string, path: string, token: string, body: unknown, signal?: AbortSignal) {
  const headers: Record<string, string> = { Authorization: `Bearer ${token}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  return fetch(`${GATEWAY_URL}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
}
