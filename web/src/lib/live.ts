import type { QueryClient } from '@tanstack/react-query';
import type { InfiniteData } from '@tanstack/react-query';
import type {
  Alert,
  AlertAcknowledged,
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
  /** A unit's readings over a time range (the chart's 15 min … 7 days choice). */
  range: (unitId: string, range: string) => ['range', unitId, range] as const,
  /** The small chart of a unit card. */
  spark: (unitId: string) => ['spark', unitId] as const,
  /** Alert history pages (`GET /api/alerts?status=…&unitId=…`, paged by `X-Next-Cursor`). */
  historyAll: ['alerts', 'history'] as const,
  history: (f: HistoryFilter) => ['alerts', 'history', f.status ?? 'all', f.unitId ?? ''] as const,
};

export interface HistoryFilter {
  status?: 'active' | 'resolved';
  unitId?: string;
}

export interface HistoryPage {
  alerts: Alert[];
  nextCursor: string | null;
}

export const SPARK_POINTS = 30;

/** What arrived live, with when (client clock), so a refetch started earlier does not undo it. */
const journal = {
  status: new Map<string, { status: UnitStatusChanged; at: number }>(),
  triggered: new Map<string, { alert: Alert; at: number }>(),
  resolved: new Map<string, number>(),
  acknowledged: new Map<string, { ack: AlertAcknowledged; at: number }>(),
  pendingReadings: new Map<string, SensorReading[]>(),
};

const JOURNAL_TTL_MS = 5 * 60_000;

function prune(now: number) {
  for (const [k, v] of journal.status) if (now - v.at > JOURNAL_TTL_MS) journal.status.delete(k);
  for (const [k, v] of journal.triggered) if (now - v.at > JOURNAL_TTL_MS) journal.triggered.delete(k);
  for (const [k, at] of journal.resolved) if (now - at > JOURNAL_TTL_MS) journal.resolved.delete(k);
  for (const [k, v] of journal.acknowledged) if (now - v.at > JOURNAL_TTL_MS) journal.acknowledged.delete(k);
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
  addToSpark(qc, unitId, readings);
  addToRanges(qc, unitId, readings);
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

/** The card's sparkline: only once it has loaded (a first fetch includes what arrived meanwhile). */
function addToSpark(qc: QueryClient, unitId: string, readings: SensorReading[]) {
  qc.setQueryData<SensorReading[]>(keys.spark(unitId), (list) =>
    list ? mergeReadings(list, readings, SPARK_POINTS) : list,
  );
}

/** Open time-range charts of the unit gain live readings too (their window slides on render). */
function addToRanges(qc: QueryClient, unitId: string, readings: SensorReading[]) {
  qc.setQueriesData<SensorReading[]>({ queryKey: ['range', unitId] }, (list) =>
    list ? mergeReadings(list, readings, Infinity) : list,
  );
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
  updateHistory(qc, (f, pages) => {
    if (f.status === 'resolved' || (f.unitId && f.unitId !== a.unitId)) return pages;
    if (journal.resolved.has(a.alertId) || pages.some((p) => p.alerts.some((x) => x.alertId === a.alertId))) return pages;
    const [first, ...rest] = pages;
    return [{ ...first, alerts: [withAck(alert), ...first.alerts] }, ...rest];
  });
}

/**
 * Every loaded history list, rewritten by `f` (given the list's filter). Only lists already in the
 * cache are touched: a live event never starts a fetch.
 */
function updateHistory(qc: QueryClient, f: (filter: HistoryFilter, pages: HistoryPage[]) => HistoryPage[]) {
  for (const q of qc.getQueryCache().findAll({ queryKey: keys.historyAll })) {
    const [, , status, unitId] = q.queryKey as [string, string, string, string];
    const filter: HistoryFilter = {
      status: status === 'all' ? undefined : (status as 'active' | 'resolved'),
      unitId: unitId || undefined,
    };
    qc.setQueryData<InfiniteData<HistoryPage, string | null>>(q.queryKey, (data) => {
      if (!data || data.pages.length === 0) return data;
      const pages = f(filter, data.pages);
      return pages === data.pages ? data : { ...data, pages };
    });
  }
}

function mapAlert(pages: HistoryPage[], alertId: string, f: (a: Alert) => Alert): HistoryPage[] {
  let changed = false;
  const next = pages.map((p) => {
    if (!p.alerts.some((a) => a.alertId === alertId)) return p;
    changed = true;
    return { ...p, alerts: p.alerts.map((a) => (a.alertId === alertId ? f(a) : a)) };
  });
  return changed ? next : pages;
}

/** An alert with its acknowledgement, when one arrived live and the alert does not show it yet. */
function withAck(a: Alert): Alert {
  const j = journal.acknowledged.get(a.alertId);
  if (!j || a.acknowledgedAt) return a;
  return { ...a, acknowledgedAt: j.ack.acknowledgedAt, acknowledgedBy: j.ack.acknowledgedBy, note: j.ack.note };
}

/** Seconds an alert lasted (or has lasted so far): the gateway's figure, or computed from its times. */
export function alertDuration(a: Alert, now: number): number {
  if (typeof a.durationSeconds === 'number') return a.durationSeconds;
  const end = a.resolvedAt ? Date.parse(a.resolvedAt) : now;
  return Math.max(0, (end - Date.parse(a.triggeredAt)) / 1000);
}

/**
 * `alert:acknowledged`: the alert shows who acknowledged it, when, and the note — in the active
 * list and in every loaded history list. Applying it twice changes nothing.
 */
export function applyAlertAcknowledged(qc: QueryClient, ack: AlertAcknowledged) {
  journal.acknowledged.set(ack.alertId, { ack, at: Date.now() });
  const set = (a: Alert): Alert =>
    a.acknowledgedAt === ack.acknowledgedAt && a.acknowledgedBy === ack.acknowledgedBy
      ? a
      : { ...a, acknowledgedAt: ack.acknowledgedAt, acknowledgedBy: ack.acknowledgedBy, note: ack.note };
  qc.setQueryData<Alert[]>(keys.activeAlerts, (list) =>
    list && list.some((x) => x.alertId === ack.alertId) ? list.map((x) => (x.alertId === ack.alertId ? set(x) : x)) : list,
  );
  updateHistory(qc, (_f, pages) => mapAlert(pages, ack.alertId, set));
}

/** The answer of `POST /api/alerts/{id}/acknowledge` (the Alert), applied like the live event. */
export function applyAcknowledgedAlert(qc: QueryClient, a: Alert) {
  if (!a?.acknowledgedAt) return;
  applyAlertAcknowledged(qc, {
    alertId: a.alertId,
    unitId: a.unitId,
    acknowledgedAt: a.acknowledgedAt,
    acknowledgedBy: a.acknowledgedBy ?? '',
    note: a.note ?? null,
  });
}

export function applyAlertResolved(qc: QueryClient, a: AlertResolved) {
  journal.resolved.set(a.alertId, Date.now());
  updateHistory(qc, (f, pages) => {
    if (f.status === 'active') {
      let changed = false;
      const next = pages.map((p) => {
        if (!p.alerts.some((x) => x.alertId === a.alertId)) return p;
        changed = true;
        return { ...p, alerts: p.alerts.filter((x) => x.alertId !== a.alertId) };
      });
      return changed ? next : pages;
    }
    const resolve = (x: Alert): Alert =>
      x.status === 'resolved'
        ? x
        : {
            ...x,
            status: 'resolved',
            resolvedAt: a.resolvedAt,
            durationSeconds: (Date.parse(a.resolvedAt) - Date.parse(x.triggeredAt)) / 1000,
          };
    const found = pages.some((p) => p.alerts.some((x) => x.alertId === a.alertId));
    if (found) return mapAlert(pages, a.alertId, resolve);
    // A resolved-only list gains the alert when this tab saw it open.
    const opened = journal.triggered.get(a.alertId)?.alert;
    if (f.status !== 'resolved' || !opened || (f.unitId && f.unitId !== opened.unitId)) return pages;
    const [first, ...rest] = pages;
    return [{ ...first, alerts: [withAck(resolve(opened)), ...first.alerts] }, ...rest];
  });
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
  return list.map(withAck).sort((a, b) => time(b.triggeredAt) - time(a.triggeredAt));
}

/** A fetched history page, with the acknowledgements that arrived live meanwhile. */
export function mergeHistoryPage(fetched: Alert[]): Alert[] {
  return fetched.map(withAck);
}

/** Readings in `recordedAt` order, each once, the newest `MAX_CHART_POINTS`. */
export function mergeReadings(a: SensorReading[], b: SensorReading[], max = MAX_CHART_POINTS): SensorReading[] {
  const byId = new Map<string, SensorReading>();
  for (const r of a) byId.set(r.id, r);
  let added = false;
  for (const r of b) {
    if (!byId.has(r.id)) added = true;
    byId.set(r.id, r);
  }
  if (!added && b.length > 0 && a.length <= max) return a;
  const all = [...byId.values()].sort(
    (x, y) => time(x.recordedAt) - time(y.recordedAt) || Number(x.id) - Number(y.id),
  );
  return Number.isFinite(max) ? all.slice(-max) : all;
}
