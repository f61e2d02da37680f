import type { QueryClient } from '@tanstack/react-query';
import type {
  Alert,
  AlertResolved,
  AlertTriggered,
  ReadingsBatch,
  SensorReading,
  Unit,
  UnitStatusChanged,
} from '../types';

/**
 * Live events written into the TanStack Query cache, and the merge that keeps a refetch (after a
 * reconnect) from overwriting newer live data with an answer the server prepared earlier.
 */

export const MAX_CHART_POINTS = 60;

export const keys = {
  sites: ['sites'] as const,
  units: ['units'] as const,
  activeAlerts: ['alerts', 'active'] as const,
  readings: (unitId: string) => ['readings', unitId] as const,
};

/** What arrived live, with when (client clock), so a refetch started earlier does not undo it. */
const journal = {
  status: new Map<string, { status: UnitStatusChanged; at: number }>(),
  triggered: new Map<string, { alert: Alert; at: number }>(),
  resolved: new Map<string, number>(),
  pendingReadings: new Map<string, SensorReading[]>(),
};

const JOURNAL_TTL_MS = 5 * 60_000;

function prune(now: number) {
  for (const [k, v] of journal.status) if (now - v.at > JOURNAL_TTL_MS) journal.status.delete(k);
  for (const [k, v] of journal.triggered) if (now - v.at > JOURNAL_TTL_MS) journal.triggered.delete(k);
  for (const [k, at] of journal.resolved) if (now - at > JOURNAL_TTL_MS) journal.resolved.delete(k);
}

const time = (iso: string | null | undefined) => (iso ? Date.parse(iso) : -Infinity);

/** A unit with `reading` applied, when it is newer than what the unit shows. */
function withReading(unit: Unit, reading: SensorReading): Unit {
  if (time(reading.recordedAt) < time(unit.lastReadingAt)) return unit;
  if (reading.recordedAt === unit.lastReadingAt && reading.temperature === unit.lastTemperature) {
    return unit;
  }
  return { ...unit, lastTemperature: reading.temperature, lastReadingAt: reading.recordedAt };
}

function updateUnit(qc: QueryClient, unitId: string, f: (u: Unit) => Unit) {
  qc.setQueryData<Unit[]>(keys.units, (units) => {
    if (!units) return units;
    let changed = false;
    const next = units.map((u) => {
      if (u.id !== unitId) return u;
      const n = f(u);
      if (n !== u) changed = true;
      return n;
    });
    return changed ? next : units;
  });
}

/**
 * `sensor:readings:batch`: the card shows the newest reading of the batch, and an open chart of the
 * unit gains every reading of it. The batches are what a reconnect replays (the unit room's
 * `sensor:reading` stream is not), so they alone keep the chart without gaps; the same reading
 * arriving again (batch and `sensor:reading`, or a replay) is merged by id, so applying twice is
 * harmless.
 */
export function applyBatch(qc: QueryClient, batch: ReadingsBatch) {
  if (batch.readings.length === 0) return;
  let newest = batch.readings[0];
  for (const r of batch.readings) if (time(r.recordedAt) >= time(newest.recordedAt)) newest = r;
  updateUnit(qc, batch.unitId, (u) => withReading(u, newest));
  addToChart(qc, batch.unitId, batch.readings);
}

/** `sensor:reading` (unit and site rooms): the detail chart, and the card when it is newer. */
export function applyReading(qc: QueryClient, reading: SensorReading) {
  updateUnit(qc, reading.unitId, (u) => withReading(u, reading));
  addToChart(qc, reading.unitId, [reading]);
}

/** Readings into the unit's chart, when something shows it (merged by id: idempotent). */
function addToChart(qc: QueryClient, unitId: string, readings: SensorReading[]) {
  const key = keys.readings(unitId);
  const query = qc.getQueryCache().find({ queryKey: key, exact: true });
  if (!query) return; // nobody shows this unit's readings
  if (query.state.data === undefined) {
    // The chart's first fetch is still under way: keep the readings for it.
    const pending = journal.pendingReadings.get(unitId) ?? [];
    journal.pendingReadings.set(unitId, mergeReadings(pending, readings));
    return;
  }
  qc.setQueryData<SensorReading[]>(key, (list) => (list ? mergeReadings(list, readings) : list));
}

/** Live readings that arrived before the unit's readings were first fetched (taken once). */
export function takePendingReadings(unitId: string): SensorReading[] {
  const pending = journal.pendingReadings.get(unitId) ?? [];
  journal.pendingReadings.delete(unitId);
  return pending;
}

export function applyStatus(qc: QueryClient, status: UnitStatusChanged) {
  journal.status.set(status.unitId, { status, at: Date.now() });
  updateUnit(qc, status.unitId, (u) => (u.status === status.status ? u : { ...u, status: status.status }));
}

export function alertFromTriggered(a: AlertTriggered): Alert {
  return {
    alertId: a.alertId,
    unitId: a.unitId,
    siteId: a.siteId,
    alertType: a.alertType,
    severity: a.severity,
    message: a.message,
    status: 'active',
    triggeredAt: a.triggeredAt,
    resolvedAt: null,
    value: a.value,
    threshold: a.threshold,
    // The Alert fields of the lifecycle (proto): a new alert is unacknowledged, its peak so far
    // is the reading that opened it, and it has no duration while active.
    acknowledgedAt: null,
    acknowledgedBy: null,
    note: null,
    peakValue: a.value,
    durationSeconds: null,
  };
}

export function applyAlertTriggered(qc: QueryClient, a: AlertTriggered) {
  const alert = alertFromTriggered(a);
  const now = Date.now();
  prune(now);
  journal.triggered.set(a.alertId, { alert, at: now });
  qc.setQueryData<Alert[]>(keys.activeAlerts, (list) => {
    if (!list) return list;
    if (journal.resolved.has(a.alertId) || list.some((x) => x.alertId === a.alertId)) return list;
    return [alert, ...list];
  });
}

export function applyAlertResolved(qc: QueryClient, a: AlertResolved) {
  journal.resolved.set(a.alertId, Date.now());
  qc.setQueryData<Alert[]>(keys.activeAlerts, (list) =>
    list && list.some((x) => x.alertId === a.alertId)
      ? list.filter((x) => x.alertId !== a.alertId)
      : list,
  );
}

/** Units as fetched, with the live readings and status changes that arrived since `startedAt`. */
export function mergeUnits(fetched: Unit[], cached: Unit[] | undefined, startedAt: number): Unit[] {
  const byId = new Map((cached ?? []).map((u) => [u.id, u]));
  return fetched.map((u) => {
    let unit = u;
    const c = byId.get(u.id);
    if (c && c.lastReadingAt && time(c.lastReadingAt) > time(u.lastReadingAt)) {
      unit = { ...unit, lastReadingAt: c.lastReadingAt, lastTemperature: c.lastTemperature };
    }
    const s = journal.status.get(u.id);
    if (s && s.at >= startedAt && s.status.status !== unit.status) {
      unit = { ...unit, status: s.status.status };
    }
    return unit;
  });
}

/** Active alerts as fetched, adjusted by the alert events that arrived since `startedAt`. */
export function mergeActiveAlerts(fetched: Alert[], startedAt: number): Alert[] {
  const list = fetched.filter((a) => {
    const at = journal.resolved.get(a.alertId);
    return at === undefined || at < startedAt;
  });
  for (const { alert, at } of journal.triggered.values()) {
    if (at >= startedAt && !journal.resolved.has(alert.alertId) && !list.some((a) => a.alertId === alert.alertId)) {
      list.unshift(alert);
    }
  }
  return list.sort((a, b) => time(b.triggeredAt) - time(a.triggeredAt));
}

/** Readings in `recordedAt` order, each once, the newest `MAX_CHART_POINTS`. */
export function mergeReadings(a: SensorReading[], b: SensorReading[]): SensorReading[] {
  const byId = new Map<string, SensorReading>();
  for (const r of a) byId.set(r.id, r);
  let added = false;
  for (const r of b) {
    if (!byId.has(r.id)) added = true;
    byId.set(r.id, r);
  }
  if (!added && b.length > 0 && a.length <= MAX_CHART_POINTS) return a;
  const all = [...byId.values()].sort(
    (x, y) => time(x.recordedAt) - time(y.recordedAt) || Number(x.id) - Number(y.id),
  );
  return all.slice(-MAX_CHART_POINTS);
}
