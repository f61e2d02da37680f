import { useMemo, useState } from 'react';
import {
  RANGES,
  useRangeReadings,
  useRecentReadings,
  useSites,
  useUnitAlerts,
  useUnits,
  type RangeKey,
} from '../lib/queries';
import { Link } from '../lib/router';
import { formatDateTime, formatRange, formatRelative, formatTemp, useNow } from '../lib/time';
import { useRoom } from '../realtime/RealtimeProvider';
import { AlertTable } from './Alerts';
import { Chart, type Excursion } from './Chart';
import { StatusBadge } from './StatusBadge';

const RECENT = 15;

export function UnitDetail({ unitId }: { unitId: string }) {
  const units = useUnits();
  const sites = useSites();
  const readings = useRecentReadings(unitId);
  const ack = useRoom('unit', unitId);
  const now = useNow();
  const [range, setRange] = useState<RangeKey | null>(null);
  const ranged = useRangeReadings(unitId, range);
  const alerts = useUnitAlerts(unitId);
  const unitAlerts = useMemo(() => (alerts.data?.pages ?? []).flatMap((p) => p.alerts), [alerts.data]);
  const excursions = useMemo<Excursion[]>(
    () =>
      unitAlerts
        .filter((a) => a.alertType !== 'offline')
        .map((a) => ({ from: Date.parse(a.triggeredAt), to: a.resolvedAt ? Date.parse(a.resolvedAt) : null })),
    [unitAlerts],
  );
  const rangeSeconds = RANGES.find((r) => r.key === range)?.seconds ?? 0;
  const windowStart = now - rangeSeconds * 1000;
  const rangeList = useMemo(
    () => (ranged.data ?? []).filter((r) => Date.parse(r.recordedAt) >= windowStart),
    // The window slides every second; refilter when it has moved by a noticeable step.
    [ranged.data, Math.floor(windowStart / 5000)],
  );

  const unit = units.data?.find((u) => u.id === unitId);
  const site = sites.data?.find((s) => s.id === unit?.siteId);
  const list = readings.data ?? [];
  const recent = list.slice(-RECENT).reverse();

  if (units.data && !unit) {
    return (
      <div className="detail">
        <BackLink />
        <div className="empty">
          <h2>Unit not found</h2>
          <p>There is no unit “{unitId}”, or your token does not give access to it.</p>
        </div>
      </div>
    );
  }

  return (
    <div className="detail" data-testid="unit-detail">
      <BackLink />
      <div className="detail-head">
        <div>
          <p className="eyebrow">{site?.name ?? unit?.siteId ?? ''}</p>
          <h1>{unit?.name ?? unitId}</h1>
          <p className="muted mono">{unitId}</p>
        </div>
        {unit && (
          <div className={`detail-now status-${unit.status}`}>
            <StatusBadge status={unit.status} testId={`unit-status-${unit.id}`} />
            <div className="detail-temp" data-testid={`unit-temp-${unit.id}`}>
              {formatTemp(unit.lastTemperature)}
            </div>
            <div className="muted">
              {unit.lastReadingAt ? formatRelative(unit.lastReadingAt, now) : 'No reading yet'}
            </div>
          </div>
        )}
      </div>

      {ack && !ack.ok && (
        <div className="notice notice-error">Live readings unavailable for this unit ({ack.error}).</div>
      )}

      <div className="detail-grid">
        <section className="panel">
          <div className="panel-head">
            <h2>Temperature</h2>
            <div className="range-choice" role="group" aria-label="Time range" data-testid="range-choice">
              <button aria-pressed={range === null} data-testid="range-live" onClick={() => setRange(null)}>
                <span className="live-tag" data-live={ack?.ok ? 'true' : 'false'}>
                  <span className="live-dot" /> {ack?.ok ? 'Live' : 'Waiting'}
                </span>
              </button>
              {RANGES.map((r) => (
                <button key={r.key} aria-pressed={range === r.key} data-testid={`range-${r.key}`} onClick={() => setRange(r.key)}>
                  {r.label}
                </button>
              ))}
            </div>
          </div>
          {range === null ? (
            readings.isPending ? (
              <div className="chart-wrap skeleton" />
            ) : readings.error ? (
              <p className="error-text">Could not load readings: {readings.error.message}</p>
            ) : (
              <Chart readings={list} tempMin={unit?.tempMin ?? null} tempMax={unit?.tempMax ?? null} excursions={excursions} />
            )
          ) : ranged.isPending ? (
            <div className="chart-wrap skeleton" data-testid="chart-loading" />
          ) : ranged.error ? (
            <p className="error-text">Could not load readings: {ranged.error.message}</p>
          ) : (
            <>
              <Chart
                readings={rangeList}
                tempMin={unit?.tempMin ?? null}
                tempMax={unit?.tempMax ?? null}
                excursions={excursions}
                window={{ start: windowStart, end: now }}
                range={range}
              />
            </>
          )}
          {unit && (
            <dl className="facts">
              <div>
                <dt>Safe range</dt>
                <dd>{formatRange(unit.tempMin, unit.tempMax)}</dd>
              </div>
              <div>
                <dt>Offline after</dt>
                <dd>{formatDuration(unit.offlineAfterSeconds)}</dd>
              </div>
              <div>
                <dt>Points shown</dt>
                <dd>{range === null ? list.length : rangeList.length}</dd>
              </div>
            </dl>
          )}
        </section>

        <section className="panel">
          <h2>Recent readings</h2>
          {recent.length === 0 ? (
            <p className="muted">No readings yet.</p>
          ) : (
            <table className="readings" data-testid="recent-readings">
              <thead>
                <tr>
                  <th>Time</th>
                  <th className="num">Temp</th>
                  <th className="num col-humidity">Humidity</th>
                  <th className="col-source">Source</th>
                </tr>
              </thead>
              <tbody>
                {recent.map((r) => {
                  const out =
                    unit &&
                    ((unit.tempMax != null && r.temperature > unit.tempMax) ||
                      (unit.tempMin != null && r.temperature < unit.tempMin));
                  return (
                    <tr key={r.id} className={out ? 'out' : ''}>
                      <td>{formatDateTime(r.recordedAt)}</td>
                      <td className="num">{formatTemp(r.temperature)}</td>
                      <td className="num col-humidity">{r.humidity != null ? `${r.humidity.toFixed(0)} %` : '—'}</td>
                      <td className="muted col-source">{r.deviceId ?? r.source}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
          )}
        </section>
      </div>

      <section className="panel unit-alerts" data-testid="unit-alerts">
        <h2>Alerts of this unit</h2>
        {alerts.isPending ? (
          <p className="muted">Loading…</p>
        ) : alerts.error ? (
          <p className="error-text">Could not load alerts: {alerts.error.message}</p>
        ) : unitAlerts.length === 0 ? (
          <p className="muted">No alerts yet.</p>
        ) : (
          <AlertTable alerts={unitAlerts} hideUnit testId="unit-alert-list" />
        )}
        {alerts.hasNextPage && (
          <button className="secondary load-more" onClick={() => void alerts.fetchNextPage()} disabled={alerts.isFetchingNextPage}>
            Load more
          </button>
        )}
      </section>
    </div>
  );
}

function BackLink() {
  return (
    <Link to="/" className="back" data-testid="back-link">
      ← All units
    </Link>
  );
}

function formatDuration(s: number): string {
  if (s % 3600 === 0) return `${s / 3600} h`;
  if (s % 60 === 0) return `${s / 60} min`;
  return `${s} s`;
}
