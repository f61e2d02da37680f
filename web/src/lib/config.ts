/**
 * Where the gateway is. Served by the gateway itself (production), that is this page's origin;
 * in development (`npm run dev` on :5173) set `VITE_GATEWAY_URL=http://localhost:3000`.
 */
export const GATEWAY_URL: string = (
  (import.meta.env.VITE_GATEWAY_URL as string | undefined) || window.location.origin
).replace(/\/+$/, '');
