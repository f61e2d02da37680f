import { useEffect, useMemo, useRef, useState, type MouseEvent, type RefObject } from 'react';
import { formatClock, formatDateTime, formatTemp } from '../lib/time';
import type { SensorReading } from '../types';

/** The drawing's width when the element's is not known yet (the first render). */
const DEFAULT_W = 640;
const PAD = { top: 12, right: 12, bottom: 26, left: 44 };
/** More points than this are reduced (per pixel-wide bucket: its lowest and highest reading). */
export const MAX_DRAWN_POINTS = 600;

export interface Excursion {
  from: number;
  /** null while the alert is open (shaded up to the newest reading). */
  to: number | null;
}

/**
 * A line chart of readings (oldest → newest): the unit's safe range shaded green, its excursions
 * (from the unit's alerts) shaded red, and a tooltip with the nearest reading under the pointer.
 * `window` fixes the time axis (a chosen range); without it the axis spans the readings.
 */
export function Chart({
  readings,
  tempMin,
  tempMax,
  excursions = [],
  window: win,
  range = 'live',
}: {
  readings: SensorReading[];
  tempMin: number | null;
  tempMax: number | null;
  excursions?: Excursion[];
  window?: { start: number; end: number };
  range?: string;
}) {
  const drawn = useMemo(() => downsample(readings, MAX_DRAWN_POINTS), [readings]);
  const [hover, setHover] = useState<number | null>(null);
  const svgRef = useRef<SVGSVGElement>(null);
  const wrapRef = useRef<HTMLDivElement>(null);
  // Drawn at the element's own width (one unit = one CSS pixel), so the labels keep their size on
  // a phone instead of shrinking with a scaled-down picture.
  const W = useWidth(wrapRef) ?? DEFAULT_W;
  const H = W < 500 ? 200 : 240;

  const temps = drawn.map((r) => r.temperature);
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
  const times = drawn.map((r) => Date.parse(r.recordedAt));
  const t0 = win ? win.start : times.length ? times[0] : 0;
  const t1 = win ? win.end : times.length ? times[times.length - 1] : 1;
  const span = t1 - t0;
  const xt = (t: number) => PAD.left + (span > 0 ? Math.min(1, Math.max(0, (t - t0) / span)) * innerW : innerW);
  // Evenly spaced when the readings share one instant (or there is just one).
  const x = (i: number) =>
    span > 0 ? xt(times[i]) : PAD.left + (drawn.length > 1 ? (i / (drawn.length - 1)) * innerW : innerW);
  const y = (t: number) => PAD.top + (1 - (t - lo) / (hi - lo)) * innerH;

  const ticks = niceTicks(lo, hi, 5);
  const path = drawn.map((r, i) => `${i === 0 ? 'M' : 'L'}${x(i).toFixed(1)},${y(r.temperature).toFixed(1)}`).join(' ');
  const out = (t: number) => (tempMax != null && t > tempMax) || (tempMin != null && t < tempMin);
  const bandTop = y(tempMax ?? hi);
  const bandBottom = y(tempMin ?? lo);
  const showDots = drawn.length <= 120;
  const last = times.length ? times[times.length - 1] : t1;
  const shaded = excursions
    .map((e) => ({ x1: xt(e.from), x2: xt(e.to ?? Math.max(last, e.from)) }))
    .filter((e) => span > 0 && e.x2 >= PAD.left && e.x1 <= W - PAD.right);

  const onMove = (e: MouseEvent<SVGSVGElement>) => {
    const svg = svgRef.current;
    if (!svg || drawn.length === 0) return;
    const rect = svg.getBoundingClientRect();
    const px = ((e.clientX - rect.left) / rect.width) * W;
    let best = 0;
    for (let i = 1; i < drawn.length; i++) if (Math.abs(x(i) - px) < Math.abs(x(best) - px)) best = i;
    setHover(best);
  };
  const h = hover != null && hover < drawn.length ? hover : null;

  return (
    <div className="chart-wrap" ref={wrapRef}>
      <svg
        ref={svgRef}
        className="chart"
        data-testid="unit-chart"
        data-points={readings.length}
        data-drawn={drawn.length}
        data-range={range}
        data-excursions={shaded.length}
        viewBox={`0 0 ${W} ${H}`}
        role="img"
        aria-label={`Temperature, ${readings.length} readings`}
        onMouseMove={onMove}
        onMouseLeave={() => setHover(null)}
      >
        {(tempMin != null || tempMax != null) && (
          <rect className="chart-band" x={PAD.left} width={innerW} y={bandTop} height={Math.max(0, bandBottom - bandTop)} />
        )}
        {shaded.map((e, i) => (
          <rect
            key={i}
            className="chart-excursion"
            data-testid="chart-excursion"
            x={Math.max(PAD.left, e.x1)}
            width={Math.max(2, Math.min(W - PAD.right, e.x2) - Math.max(PAD.left, e.x1))}
            y={PAD.top}
            height={innerH}
          />
        ))}
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
        {drawn.length > 1 && <path className="chart-line" d={path} />}
        {drawn.map((r, i) =>
          showDots || i === drawn.length - 1 || out(r.temperature) ? (
            <circle
              key={r.id}
              className={`chart-dot ${out(r.temperature) ? 'out' : ''} ${i === drawn.length - 1 ? 'last' : ''}`}
              cx={x(i)}
              cy={y(r.temperature)}
              r={i === drawn.length - 1 ? 4.5 : showDots ? 2.5 : 1.5}
            />
          ) : null,
        )}
        {h != null && <line className="chart-cursor" x1={x(h)} x2={x(h)} y1={PAD.top} y2={PAD.top + innerH} />}
        {(drawn.length > 0 || win) && (
          <>
            <text className="chart-label" x={PAD.left} y={H - 6} textAnchor="start">
              {axisLabel(t0, span)}
            </text>
            <text className="chart-label" x={W - PAD.right} y={H - 6} textAnchor="end">
              {axisLabel(t1, span)}
            </text>
          </>
        )}
        {drawn.length === 0 && (
          <text className="chart-empty" x={W / 2} y={H / 2} textAnchor="middle">
            {win ? 'No readings in this period' : 'Waiting for readings…'}
          </text>
        )}
      </svg>
      {h != null && (
        <div className="chart-tooltip" data-testid="chart-tooltip" style={{ left: `${(x(h) / W) * 100}%` }}>
          <strong>{formatTemp(drawn[h].temperature)}</strong> · {formatDateTime(drawn[h].recordedAt)}
        </div>
      )}
    </div>
  );
}

function useWidth(ref: RefObject<HTMLElement | null>): number | null {
  const [width, setWidth] = useState<number | null>(null);
  useEffect(() => {
    const el = ref.current;
    if (!el) return;
    const ro = new ResizeObserver(([entry]) => {
      const w = Math.round(entry.contentRect.width);
      if (w > 0) setWidth(w);
    });
    ro.observe(el);
    return () => ro.disconnect();
  }, [ref]);
  return width;
}

function axisLabel(t: number, span: number): string {
  const iso = new Date(t).toISOString();
  return span > 20 * 3600_000 ? formatDateTime(iso) : formatClock(iso);
}

/**
 * At most `max` points that keep the shape (and every excursion's extremes): the readings are cut
 * into `max / 2` equal runs, and each run gives its lowest and highest reading, in time order.
 */
export function downsample(readings: SensorReading[], max: number): SensorReading[] {
  if (readings.length <= max) return readings;
  const buckets = Math.floor(max / 2);
  const size = readings.length / buckets;
  const out: SensorReading[] = [];
  for (let b = 0; b < buckets; b++) {
    const from = Math.floor(b * size);
    const to = Math.min(readings.length, Math.floor((b + 1) * size));
    let lo = from;
    let hi = from;
    for (let i = from; i < to; i++) {
      if (readings[i].temperature < readings[lo].temperature) lo = i;
      if (readings[i].temperature > readings[hi].temperature) hi = i;
    }
    if (lo === hi) out.push(readings[lo]);
    else out.push(readings[Math.min(lo, hi)], readings[Math.max(lo, hi)]);
  }
  return out;
}

/** A card's small line of its last readings (no axes). */
export function Sparkline({ readings }: { readings: SensorReading[] }) {
  if (readings.length < 2) return <svg className="spark" aria-hidden="true" />;
  const temps = readings.map((r) => r.temperature);
  let lo = Math.min(...temps);
  let hi = Math.max(...temps);
  if (hi - lo < 0.5) {
    const mid = (hi + lo) / 2;
    lo = mid - 0.25;
    hi = mid + 0.25;
  }
  const n = readings.length;
  const d = readings
    .map((r, i) => `${i === 0 ? 'M' : 'L'}${((i / (n - 1)) * 100).toFixed(1)},${(2 + (1 - (r.temperature - lo) / (hi - lo)) * 24).toFixed(1)}`)
    .join(' ');
  return (
    <svg className="spark" viewBox="0 0 100 28" preserveAspectRatio="none" aria-hidden="true" data-points={n}>
      <path d={d} />
    </svg>
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
