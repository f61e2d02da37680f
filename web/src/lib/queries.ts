import { useQuery, useQueryClient } from '@tanstack/react-query';
import type { Alert, SensorReading, Site, Unit } from '../types';
import { apiGet } from './api';
import {
  MAX_CHART_POINTS,
  keys,
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
