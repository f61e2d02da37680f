import { createElement, type AnchorHTMLAttributes, type MouseEvent } from 'react';
import { createStore, useStore } from './store';

/** A minimal history-API router: the app has three routes (`/`, `/alerts` and `/units/:id`). */
const path = createStore(window.location.pathname);

window.addEventListener('popstate', () => path.set(window.location.pathname));

export function navigate(to: string) {
  if (to === window.location.pathname) return;
  window.history.pushState(null, '', to);
  path.set(window.location.pathname);
  window.scrollTo(0, 0);
}

export function usePath(): string {
  return useStore(path);
}

export type Route = { name: 'dashboard' } | { name: 'alerts' } | { name: 'unit'; unitId: string } | { name: 'not-found' };

export function matchRoute(pathname: string): Route {
  if (pathname === '/' || pathname === '' || pathname === '/index.html') return { name: 'dashboard' };
  if (pathname === '/alerts' || pathname === '/alerts/') return { name: 'alerts' };
  const m = /^\/units\/([^/]+)\/?$/.exec(pathname);
  if (m) return { name: 'unit', unitId: decodeURIComponent(m[1]) };
  return { name: 'not-found' };
}

export const unitPath = (unitId: string) => `/units/${encodeURIComponent(unitId)}`;

/** An `<a>` that navigates without a reload (modifier clicks still open a new tab). */
export function Link({ to, onClick, ...rest }: AnchorHTMLAttributes<HTMLAnchorElement> & { to: string }) {
  return createElement('a', {
    ...rest,
    href: to,
    onClick(e: MouseEvent<HTMLAnchorElement>) {
      onClick?.(e);
      if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
      e.preventDefault();
      navigate(to);
    },
  });
}
