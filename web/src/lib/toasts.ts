import type { AlertTriggered } from '../types';
import { createStore } from './store';

/** The alert toasts on screen, newest first. */
export const toasts = createStore<AlertTriggered[]>([]);

const MAX_TOASTS = 5;

export function showAlertToast(alert: AlertTriggered) {
  toasts.set((list) =>
    list.some((t) => t.alertId === alert.alertId) ? list : [alert, ...list].slice(0, MAX_TOASTS),
  );
}

export function dismissToast(alertId: string) {
  toasts.set((list) => (list.some((t) => t.alertId === alertId) ? list.filter((t) => t.alertId !== alertId) : list));
}
