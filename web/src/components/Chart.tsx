import { formatClock } from '../lib/time';
import type { SensorReading } from '../types';

const W = 640;
const H = 220;
const PAD = { top: 12, right: 12, bottom: 26, left: 44 };

/** A live line chart of readings (oldest → newest), with the unit's safe range shaded. */
export function Chart({
  readings,
  tempMin,
  tempMax,
}: {
  readings: SensorReading[];
  tempMin: number | null;
  tempMax: number | null;
}) {
  const temps = readings.map((r) => r.temperature);
  const bounds = [...temps, ...(tempMin != null ? [tempMin] : []), ...(tempMax != null ? [tempMax] : [])];
  let lo = bounds.length ? Math.min(...bounds) : 0;
  let hi = bounds.length ? Math.max(...bounds) : 10;
  if (hi - lo < 2) {
    const mid = (hi + lo) / 2;
    lo = mid - 1;
    hi = mid + 1;
  }
  const margin = (hi - lo) * 0.12;
  lo -= margin;
  hi += margin;

  const innerW = W - PAD.left - PAD.right;
  const innerH = H - PAD.top - PAD.bottom;
  const times = readings.map((r) => Date.parse(r.recordedAt));
  const t0 = times.length ? times[0] : 0;
  const t1 = times.length ? times[times.length - 1] : 1;
  const span = t1 - t0;
  // Evenly spaced when the readings share one instant (or there is just one).
  const x = (i: number) =>
    PAD.left + (span > 0 ? ((times[i] - t0) / span) * innerW : readings.length > 1 ? (i / (readings.length - 1)) * innerW : innerW);
  const y = (t: number) => PAD.top + (1 - (t - lo) / (hi - lo)) * innerH;

  const ticks = niceTicks(lo, hi, 5);
  const path = readings.map((r, i) => `${i === 0 ? 'M' : 'L'}${x(i).toFixed(1)},${y(r.temperature).toFixed(1)}`).join(' ');
  const out = (t: number) => (tempMax != null && t > tempMax) || (tempMin != null && t < tempMin);
  const bandTop = y(tempMax ?? hi);
  const bandBottom = y(tempMin ?? lo);

  return (
    <div className="chart-wrap">
      <svg
        className="chart"
        data-testid="unit-chart"
        data-points={readings.length}
        viewBox={`0 0 ${W} ${H}`}
        role="img"
        aria-label={`Temperature, last ${readings.length} readings`}
      >
        {(tempMin != null || tempMax != null) && (
          <rect className="chart-band" x={PAD.left} width={innerW} y={bandTop} height={Math.max(0, bandBottom - bandTop)} />
        )}
        {ticks.map((t) => (
          <g key={t}>
            <line className="chart-grid" x1={PAD.left} x2={W - PAD.right} y1={y(t)} y2={y(t)} />
            <text className="chart-label" x={PAD.left - 8} y={y(t)} textAnchor="end" dominantBaseline="middle">
              {t.toFixed(Math.abs(ticks[1] - ticks[0]) < 1 ? 1 : 0)}°
            </text>
          </g>
        ))}
        {tempMax != null && <line className="chart-limit" x1={PAD.left} x2={W - PAD.right} y1={y(tempMax)} y2={y(tempMax)} />}
        {tempMin != null && <line className="chart-limit" x1={PAD.left} x2={W - PAD.right} y1={y(tempMin)} y2={y(tempMin)} />}
        {readings.length > 1 && <path className="chart-line" d={path} />}
        {readings.map((r, i) => (
          <circle
            key={r.id}
            className={`chart-dot ${out(r.temperature) ? 'out' : ''} ${i === readings.length - 1 ? 'last' : ''}`}
            cx={x(i)}
            cy={y(r.temperature)}
            r={i === readings.length - 1 ? 4.5 : 2.5}
          />
        ))}
        {readings.length > 0 && (
          <>
            <text className="chart-label" x={PAD.left} y={H - 6} textAnchor="start">
              {formatClock(readings[0].recordedAt)}
            </text>
            <text className="chart-label" x={W - PAD.right} y={H - 6} textAnchor="end">
              {formatClock(readings[readings.length - 1].recordedAt)}
            </text>
          </>
        )}
        {readings.length === 0 && (
          <text className="chart-empty" x={W / 2} y={H / 2} textAnchor="middle">
            Waiting for readings…
          </text>
        )}
      </svg>
    </div>
  );
}

function niceTicks(lo: number, hi: number, count: number): number[] {
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const ticks: number[] = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) ticks.push(Math.round(t * 1000) / 1000);
  return ticks;
}
