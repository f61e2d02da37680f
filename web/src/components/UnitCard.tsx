import { useSparkReadings } from '../lib/queries';
import { Link, unitPath } from '../lib/router';
import { formatRange, formatRelative, formatTemp, useNow } from '../lib/time';
import type { Unit } from '../types';
import { Sparkline } from './Chart';
import { StatusBadge } from './StatusBadge';

export function UnitCard({ unit }: { unit: Unit }) {
  const now = useNow();
  const spark = useSparkReadings(unit.id);
  const stale =
    unit.lastReadingAt != null && now - Date.parse(unit.lastReadingAt) > unit.offlineAfterSeconds * 1000;
  return (
    <Link
      to={unitPath(unit.id)}
      className={`card unit-card status-${unit.status}`}
      data-testid={`unit-card-${unit.id}`}
      aria-label={`${unit.name}: ${formatTemp(unit.lastTemperature)}, ${unit.status}`}
    >
      <div className="card-top">
        <span className="unit-name">{unit.name}</span>
        <StatusBadge status={unit.status} testId={`unit-status-${unit.id}`} />
      </div>
      <div className="unit-temp" data-testid={`unit-temp-${unit.id}`}>
        {formatTemp(unit.lastTemperature)}
      </div>
      <div data-testid={`unit-spark-${unit.id}`}>
        <Sparkline readings={spark.data ?? []} />
      </div>
      <div className="card-meta">
        <span className="range" title="Safe range">
          <ThermoIcon /> {formatRange(unit.tempMin, unit.tempMax)}
        </span>
        <span
          className={`last-seen ${stale ? 'stale' : ''}`}
          data-testid={`unit-last-${unit.id}`}
          title={unit.lastReadingAt ? new Date(unit.lastReadingAt).toLocaleString() : 'No reading yet'}
        >
          {unit.lastReadingAt ? formatRelative(unit.lastReadingAt, now) : 'No reading yet'}
        </span>
      </div>
    </Link>
  );
}

function ThermoIcon() {
  return (
    <svg viewBox="0 0 24 24" width="14" height="14" aria-hidden="true">
      <path
        d="M10 4a2 2 0 1 1 4 0v9.3a4 4 0 1 1-4 0Z"
        fill="none"
        stroke="currentColor"
        strokeWidth="2"
        strokeLinejoin="round"
      />
    </svg>
  );
}
