import { Link, unitPath } from '../lib/router';
import { useStore } from '../lib/store';
import { formatTemp } from '../lib/time';
import { dismissToast, toasts } from '../lib/toasts';
import { useActiveAlerts, useUnits } from '../lib/queries';

/** One toast per `alert:triggered`, gone on its `alert:resolved` (or when closed). */
export function Toasts() {
  const list = useStore(toasts);
  const active = useActiveAlerts();
  const units = useUnits().data ?? [];
  // An alert resolved while we were disconnected is no longer in the refetched active list.
  const visible = active.data ? list.filter((t) => active.data.some((a) => a.alertId === t.alertId)) : list;

  return (
    <div className="toasts" aria-live="assertive">
      {visible.map((t) => {
        const unit = units.find((u) => u.id === t.unitId);
        return (
          <div key={t.alertId} className={`toast sev-${t.severity}`} role="alert" data-testid={`toast-${t.alertId}`}>
            <div className="toast-icon" aria-hidden="true">
              !
            </div>
            <div className="toast-body">
              <div className="toast-title">
                <Link to={unitPath(t.unitId)}>{unit?.name ?? t.unitId}</Link>
                <span className="toast-sev">{t.severity}</span>
              </div>
              <div className="toast-msg">{withoutPrefix(t.message, unit?.name ?? t.unitId)}</div>
              {t.value != null && (
                <div className="toast-meta">
                  {formatTemp(t.value)}
                  {t.threshold != null && <> · limit {formatTemp(t.threshold)}</>}
                </div>
              )}
            </div>
            <button className="toast-close" aria-label="Dismiss" onClick={() => dismissToast(t.alertId)}>
              ×
            </button>
          </div>
        );
      })}
    </div>
  );
}

/** The gateway's messages start with the unit's name, which the toast's title already shows. */
function withoutPrefix(message: string, name: string): string {
  const prefix = `${name}: `;
  if (!message.startsWith(prefix)) return message;
  const rest = message.slice(prefix.length);
  return rest.charAt(0).toUpperCase() + rest.slice(1);
}
