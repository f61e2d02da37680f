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
  let res = await request(path, await getToken(), signal);
  if (res.status === 401) res = await request(path, await getToken({ force: true }), signal);
  if (!res.ok) {
    let code = 'http_error';
    let message = `${res.status} ${res.statusText}`;
    try {
      const body = (await res.json()) as { error?: string; message?: string };
      code = body.error ?? code;
      message = body.message ?? message;
    } catch {
      /* not JSON */
    }
    throw new ApiError(res.status, code, message);
  }
  return (await res.json()) as T;
}

function request(path: string, token: string, signal?: AbortSignal) {
  return fetch(`${GATEWAY_URL}${path}`, {
    headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
    signal,
  });
}
