import { siteFilter } from '../lib/filter';
import { useActiveAlerts, useUnits } from '../lib/queries';
import { Link, unitPath } from '../lib/router';
import { useStore } from '../lib/store';
import { formatRelative, formatTemp, useNow } from '../lib/time';
import { TYPE_LABEL } from './Alerts';

export function ActiveAlerts() {
  const alerts = useActiveAlerts();
  const units = useUnits();
  const site = useStore(siteFilter);
  const now = useNow();
  const names = new Map((units.data ?? []).map((u) => [u.id, u.name]));
  const list = (alerts.data ?? []).filter((a) => !site || a.siteId === site);

  return (
    <aside className="panel alerts-panel" data-testid="active-alerts" data-count={list.length}>
      <h2>
        Active alerts <span className={`count-pill ${list.length ? 'hot' : ''}`}>{list.length}</span>
      </h2>
      {alerts.isPending && <p className="muted">Loading…</p>}
      {alerts.error && <p className="error-text">Could not load alerts: {alerts.error.message}</p>}
      {alerts.data && list.length === 0 && (
        <div className="all-clear">
          <svg viewBox="0 0 24 24" width="20" height="20" aria-hidden="true">
            <path d="m5 12.5 4.5 4.5L19 7.5" fill="none" stroke="currentColor" strokeWidth="2.5" strokeLinecap="round" strokeLinejoin="round" />
          </svg>
          All units within range
        </div>
      )}
      <ul className="alert-list">
        {list.map((a) => (
          <li key={a.alertId} className={`alert-item sev-${a.severity}`} data-testid={`active-alert-${a.alertId}`}>
            <Link to={unitPath(a.unitId)} className="alert-link">
              <div className="alert-head">
                <span className="alert-unit">{names.get(a.unitId) ?? a.unitId}</span>
                <span className="alert-type">{TYPE_LABEL[a.alertType]}</span>
              </div>
              <div className="alert-msg">{a.message}</div>
              <div className="alert-foot">
                {a.value != null && <span>{formatTemp(a.value)}</span>}
                <span title={new Date(a.triggeredAt).toLocaleString()}>{formatRelative(a.triggeredAt, now)}</span>
              </div>
              {a.acknowledgedAt && (
                <div className="alert-acked" data-testid={`active-alert-ack-${a.alertId}`}>
                  ✓ Acknowledged by {a.acknowledgedBy}
                  {a.note ? `: “${a.note}”` : ''}
                </div>
              )}
            </Link>
          </li>
        ))}
      </ul>
      <Link to="/alerts" className="all-alerts-link" data-testid="all-alerts-link">
        Alert history and acknowledgements →
      </Link>
    </aside>
  );
}
