import { useSyncExternalStore } from 'react';
import { createStore } from './store';

/** A clock that ticks once a second while something on screen shows a relative time. */
const clock = createStore(Date.now());
let timer: ReturnType<typeof setInterval> | null = null;
let users = 0;

const subscribe = (listener: () => void) => {
  const off = clock.subscribe(listener);
  if (users++ === 0) timer = setInterval(() => clock.set(Date.now()), 1000);
  return () => {
    off();
    if (--users === 0 && timer) {
      clearInterval(timer);
      timer = null;
    }
  };
};

export function useNow(): number {
  return useSyncExternalStore(subscribe, clock.get, clock.get);
}

export function formatRelative(iso: string | null | undefined, now: number): string {
  if (!iso) return 'never';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '—';
  const s = Math.round((now - t) / 1000);
  if (s < -5) return 'in the future';
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h} h ago`;
  return new Date(t).toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
}

export function formatClock(iso: string): string {
  return new Date(iso).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

export function formatDateTime(iso: string): string {
  return new Date(iso).toLocaleString(undefined, {
    month: 'short',
    day: 'numeric',
    hour: '2-digit',
    minute: '2-digit',
    second: '2-digit',
  });
}

export function formatTemp(t: number | null | undefined): string {
  return typeof t === 'number' && Number.isFinite(t) ? `${t.toFixed(1)} °C` : '—';
}

export function formatRange(min: number | null, max: number | null): string {
  if (min == null && max == null) return 'No limits set';
  if (min == null) return `≤ ${max!.toFixed(1)} °C`;
  if (max == null) return `≥ ${min.toFixed(1)} °C`;
  return `${min.toFixed(1)} – ${max.toFixed(1)} °C`;
}

/** "12 s", "4 min 10 s", "2 h 5 min", "3 d 4 h". */
export function formatDuration(seconds: number): string {
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return s % 60 ? `${m} min ${s % 60} s` : `${m} min`;
  const h = Math.floor(m / 60);
  if (h < 24) return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
  const d = Math.floor(h / 24);
  return h % 24 ? `${d} d ${h % 24} h` : `${d} d`;
}
