import type { Alert, AlertTriggered } from '../types';
import { createStore } from './store';

/** The alert toasts on screen, newest first. */
export const toasts = createStore<AlertTriggered[]>([]);

const MAX_TOASTS = 5;

/**
 * Alerts already toasted, so an `alert:triggered` that arrives again (a replay after a reconnect, or
 * an alert also found by a refetch) does not bring back a toast the user closed. Bounded: the
 * oldest ids are forgotten first.
 */
const toasted = new Set<string>();
const MAX_REMEMBERED = 1000;

export function showAlertToast(alert: AlertTriggered) {
  if (toasted.has(alert.alertId)) return;
  toasted.add(alert.alertId);
  if (toasted.size > MAX_REMEMBERED) toasted.delete(toasted.values().next().value!);
  toasts.set((list) => [alert, ...list].slice(0, MAX_TOASTS));
}

/** A stored alert (from `GET /api/alerts`) as the toast shows it. */
export function toastFromAlert(a: Alert): AlertTriggered {
  return {
    alertId: a.alertId,
    unitId: a.unitId,
    siteId: a.siteId,
    alertType: a.alertType,
    severity: a.severity,
    message: a.message,
    triggeredAt: a.triggeredAt,
    value: a.value,
    threshold: a.threshold,
  };
}

export function dismissToast(alertId: string) {
  toasts.set((list) => (list.some((t) => t.alertId === alertId) ? list.filter((t) => t.alertId !== alertId) : list));
}
