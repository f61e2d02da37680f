import { useEffect, useMemo } from 'react';
import { siteFilter } from '../lib/filter';
import { useSites, useUnits } from '../lib/queries';
import { useStore } from '../lib/store';
import type { Site, Unit, UnitStatus } from '../types';
import { UnitCard } from './UnitCard';

export function Dashboard() {
  const sites = useSites();
  const units = useUnits();
  const site = useStore(siteFilter);

  // A remembered site that no longer exists (or is not visible to this token): show all.
  useEffect(() => {
    if (site && sites.data && !sites.data.some((s) => s.id === site)) siteFilter.set('');
  }, [site, sites.data]);

  const groups = useMemo(() => groupBySite(sites.data ?? [], units.data ?? [], site), [sites.data, units.data, site]);
  const shown = groups.flatMap((g) => g.units);
  const counts = countStatuses(shown);

  return (
    <section className="dashboard" aria-label="Units">
      <div className="toolbar">
        <div>
          <h1>Units</h1>
          <p className="summary">
            {shown.length} {shown.length === 1 ? 'unit' : 'units'}
            {counts.excursion > 0 && <span className="chip chip-excursion">{counts.excursion} excursion</span>}
            {counts.offline > 0 && <span className="chip chip-offline">{counts.offline} offline</span>}
            {counts.ok > 0 && <span className="chip chip-ok">{counts.ok} ok</span>}
            {counts.unknown > 0 && <span className="chip chip-unknown">{counts.unknown} no data</span>}
          </p>
        </div>
        <label className="site-filter">
          <span>Site</span>
          <select
            data-testid="site-filter"
            value={site}
            onChange={(e) => siteFilter.set(e.target.value)}
            disabled={!sites.data}
          >
            <option value="">All sites</option>
            {(sites.data ?? []).map((s) => (
              <option key={s.id} value={s.id}>
                {s.name}
              </option>
            ))}
          </select>
        </label>
      </div>

      {(sites.isPending || units.isPending) && <SkeletonGrid />}
      {(sites.error || units.error) && (
        <div className="notice notice-error">
          Could not load units: {(sites.error ?? units.error)!.message}{' '}
          <button
            className="link-button"
            onClick={() => {
              void sites.refetch();
              void units.refetch();
            }}
          >
            Try again
          </button>
        </div>
      )}
      {sites.data && units.data && groups.length === 0 && (
        <div className="empty">
          <h2>No units yet</h2>
          <p>Units created through the admin API (<code>POST /api/units</code>) appear here live.</p>
        </div>
      )}
      {groups.map((g) => (
        <section className="site" key={g.site.id} data-testid={`site-${g.site.id}`}>
          <h2 className="site-name">
            {g.site.name} <span className="site-count">{g.units.length}</span>
          </h2>
          {g.units.length === 0 ? (
            <p className="muted">No units at this site.</p>
          ) : (
            <div className="grid">
              {g.units.map((u) => (
                <UnitCard key={u.id} unit={u} />
              ))}
            </div>
          )}
        </section>
      ))}
    </section>
  );
}

interface Group {
  site: Site;
  units: Unit[];
}

function groupBySite(sites: Site[], units: Unit[], filter: string): Group[] {
  const bySite = new Map<string, Unit[]>();
  for (const u of units) {
    const list = bySite.get(u.siteId) ?? [];
    list.push(u);
    bySite.set(u.siteId, list);
  }
  const known = new Set(sites.map((s) => s.id));
  const groups: Group[] = [...sites]
    .sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id))
    .map((s) => ({ site: s, units: bySite.get(s.id) ?? [] }));
  // Units whose site is not in the list (should not happen, but never hide a unit).
  for (const [siteId, list] of bySite) {
    if (!known.has(siteId)) groups.push({ site: { id: siteId, name: siteId }, units: list });
  }
  for (const g of groups) g.units.sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
  return filter ? groups.filter((g) => g.site.id === filter) : groups;
}

function countStatuses(units: Unit[]): Record<UnitStatus, number> {
  const c: Record<UnitStatus, number> = { ok: 0, excursion: 0, offline: 0, unknown: 0 };
  for (const u of units) c[u.status]++;
  return c;
}

function SkeletonGrid() {
  return (
    <div className="grid" aria-hidden="true">
      {Array.from({ length: 6 }, (_, i) => (
        <div key={i} className="card skeleton" />
      ))}
    </div>
  );
}
