import { useInfiniteQuery, useMutation, useQuery, useQueryClient } from '@tanstack/react-query';
import type { Alert, SensorReading, Site, Unit } from '../types';
import { apiGet, apiGetPage, apiPost } from './api';
import {
  MAX_CHART_POINTS,
  SPARK_POINTS,
  applyAcknowledgedAlert,
  keys,
  mergeHistoryPage,
  type HistoryFilter,
  type HistoryPage,
  mergeActiveAlerts,
  mergeReadings,
  mergeUnits,
  takePendingReadings,
} from './live';

export function useSites() {
  return useQuery({
    queryKey: keys.sites,
    queryFn: ({ signal }) => apiGet<Site[]>('/api/sites', signal),
  });
}

export function useUnits() {
  const qc = useQueryClient();
  return useQuery({
    queryKey: keys.units,
    queryFn: async ({ signal }) => {
      const startedAt = Date.now();
      const units = await apiGet<Unit[]>('/api/units', signal);
      return mergeUnits(units, qc.getQueryData<Unit[]>(keys.units), startedAt);
    },
  });
}

export function useActiveAlerts() {
  return useQuery({
    queryKey: keys.activeAlerts,
    queryFn: async ({ signal }) => {
      const startedAt = Date.now();
      const alerts = await apiGet<Alert[]>('/api/alerts?status=active', signal);
      return mergeActiveAlerts(alerts, startedAt);
    },
  });
}

export function useRecentReadings(unitId: string) {
  const qc = useQueryClient();
  return useQuery({
    queryKey: keys.readings(unitId),
    queryFn: async ({ signal }) => {
      const fetched = await apiGet<SensorReading[]>(
        `/api/units/${encodeURIComponent(unitId)}/readings?limit=${MAX_CHART_POINTS}`,
        signal,
      );
      const cached = qc.getQueryData<SensorReading[]>(keys.readings(unitId)) ?? [];
      return mergeReadings(mergeReadings(cached, takePendingReadings(unitId)), fetched);
    },
  });
}

/**
 * A page-by-page list of alerts, newest first (`GET /api/alerts`, "load more" through the
 * `X-Next-Cursor` header; a gateway without paging sends no cursor and the one page is all).
 * Live alert events update the loaded pages in place (`live.ts`), so nothing is refetched per event.
 */
export function useAlertHistory(filter: HistoryFilter, pageSize = 50) {
  return useInfiniteQuery({
    queryKey: keys.history(filter),
    initialPageParam: null as string | null,
    queryFn: async ({ pageParam, signal }): Promise<HistoryPage> => {
      const q = new URLSearchParams();
      if (filter.status) q.set('status', filter.status);
      if (filter.unitId) q.set('unitId', filter.unitId);
      q.set('limit', String(pageSize));
      if (pageParam) q.set('cursor', pageParam);
      const { data, nextCursor } = await apiGetPage<Alert[]>(`/api/alerts?${q}`, signal);
      // A gateway that does not filter by unit yet answers for every unit.
      const alerts = filter.unitId ? data.filter((a) => a.unitId === filter.unitId) : data;
      return { alerts: mergeHistoryPage(alerts), nextCursor };
    },
    getNextPageParam: (last) => last.nextCursor,
  });
}

/** `POST /api/alerts/{id}/acknowledge`; the answer goes into the cache like `alert:acknowledged`. */
export function useAcknowledge() {
  const qc = useQueryClient();
  return useMutation({
    mutationFn: ({ alertId, note }: { alertId: string; note: string }) =>
      apiPost<Alert>(`/api/alerts/${encodeURIComponent(alertId)}/acknowledge`, note.trim() ? { note: note.trim() } : {}),
    onSuccess: (alert) => applyAcknowledgedAlert(qc, alert),
  });
}

export type RangeKey = '15m' | '1h' | '24h' | '7d';

export const RANGES: { key: RangeKey; label: string; seconds: number }[] = [
  { key: '15m', label: '15 min', seconds: 15 * 60 },
  { key: '1h', label: '1 h', seconds: 3600 },
  { key: '24h', label: '24 h', seconds: 24 * 3600 },
  { key: '7d', label: '7 days', seconds: 7 * 24 * 3600 },
];

/**
 * The most readings one range asks for. The gateway downsamples the window (`points`): it cuts
 * it into `RANGE_POINTS / 2` spans and answers each span's lowest and highest reading, so a day
 * or a week of one-second readings comes back whole in shape, its excursions' extremes included.
 */
export const RANGE_POINTS = 1200;

/**
 * A unit's readings over a time range, from the REST reads (`since` + `points`); live readings
 * are added to it as they arrive (`live.ts`).
 */
export function useRangeReadings(unitId: string, range: RangeKey | null) {
  return useQuery({
    queryKey: keys.range(unitId, range ?? 'live'),
    enabled: range !== null,
    queryFn: async ({ signal }) => {
      const seconds = RANGES.find((r) => r.key === range)!.seconds;
      const since = new Date(Date.now() - seconds * 1000).toISOString();
      return apiGet<SensorReading[]>(
        `/api/units/${encodeURIComponent(unitId)}/readings?since=${encodeURIComponent(since)}&points=${RANGE_POINTS}`,
        signal,
      );
    },
  });
}

/** The last readings of a unit for its card's sparkline. */
export function useSparkReadings(unitId: string) {
  return useQuery({
    queryKey: keys.spark(unitId),
    queryFn: ({ signal }) =>
      apiGet<SensorReading[]>(`/api/units/${encodeURIComponent(unitId)}/readings?limit=${SPARK_POINTS}`, signal),
  });
}

/** A unit's alerts for the chart's shading and the unit page's list (newest first). */
export function useUnitAlerts(unitId: string) {
  return useAlertHistory({ unitId }, 100);
}
