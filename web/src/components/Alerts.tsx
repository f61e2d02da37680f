import { useState, type FormEvent } from 'react';
import { ApiError, apiGetBlob } from '../lib/api';
import { alertDuration } from '../lib/live';
import { useAcknowledge, useActiveAlerts, useAlertHistory, useUnits } from '../lib/queries';
import { Link, unitPath } from '../lib/router';
import { formatDateTime, formatDuration, formatRelative, formatTemp, useNow } from '../lib/time';
import { canAcknowledge, currentClaims } from '../lib/token';
import type { Alert } from '../types';

export const TYPE_LABEL = { temp_high: 'Too warm', temp_low: 'Too cold', offline: 'Offline' } as const;

type Tab = 'active' | 'resolved';

/**
 * `/alerts`: the open alerts, and the past ones page by page (newest first), each with its duration,
 * peak and acknowledgement. Both lists are kept current by the socket's alert events.
 */
export function AlertsView() {
  const [tab, setTab] = useState<Tab>('active');
  const active = useActiveAlerts();
  return (
    <section className="alerts-view" data-testid="alerts-view">
      <div className="toolbar">
        <div>
          <h1>Alerts</h1>
          <p className="summary">Every excursion stays here, with who acknowledged it and what was done.</p>
        </div>
        <div className="alerts-actions">
          <ExportCsv status={tab} />
          <div className="tabs" role="tablist">
            <button role="tab" aria-selected={tab === 'active'} data-testid="alerts-tab-active" onClick={() => setTab('active')}>
              Active <span className="count-pill">{active.data?.length ?? '…'}</span>
            </button>
            <button role="tab" aria-selected={tab === 'resolved'} data-testid="alerts-tab-resolved" onClick={() => setTab('resolved')}>
              Past
            </button>
          </div>
        </div>
      </div>
      {tab === 'active' ? <ActiveList /> : <PastList />}
    </section>
  );
}

/**
 * The tab's alerts as CSV for an auditor (`GET /api/alerts/export.csv`, every alert of that
 * status the token may see, not only the loaded pages). Fetched with the token, then saved.
 */
function ExportCsv({ status }: { status: Tab }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const download = async () => {
    setBusy(true);
    setError(null);
    try {
      const blob = await apiGetBlob(`/api/alerts/export.csv?status=${status}`);
      const url = URL.createObjectURL(blob);
      const a = document.createElement('a');
      a.href = url;
      a.download = `alerts-${status}.csv`;
      a.click();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(false);
    }
  };
  return (
    <>
      <button className="secondary" data-testid="alerts-export" disabled={busy} onClick={() => void download()}>
        {busy ? 'Exporting…' : 'Export CSV'}
      </button>
      {error && <span className="error-text" role="alert">Export failed: {error}</span>}
    </>
  );
}

function ActiveList() {
  const alerts = useActiveAlerts();
  if (alerts.isPending) return <p className="muted">Loading…</p>;
  if (alerts.error) return <p className="error-text">Could not load alerts: {alerts.error.message}</p>;
  if (alerts.data.length === 0) return <p className="all-clear">No active alerts: all units within range.</p>;
  return <AlertTable alerts={alerts.data} testId="alerts-active" />;
}

function PastList() {
  const history = useAlertHistory({ status: 'resolved' });
  if (history.isPending) return <p className="muted">Loading…</p>;
  if (history.error) return <p className="error-text">Could not load past alerts: {history.error.message}</p>;
  const list = history.data.pages.flatMap((p) => p.alerts);
  return (
    <>
      {list.length === 0 ? <p className="muted">No past alerts.</p> : <AlertTable alerts={list} testId="alerts-history" />}
      {history.hasNextPage && (
        <button
          className="secondary load-more"
          data-testid="alerts-load-more"
          disabled={history.isFetchingNextPage}
          onClick={() => void history.fetchNextPage()}
        >
          {history.isFetchingNextPage ? 'Loading…' : 'Load more'}
        </button>
      )}
    </>
  );
}

/** Alerts as rows (cards on a phone). `hideUnit` on a unit's own page. */
export function AlertTable({ alerts, testId, hideUnit = false }: { alerts: Alert[]; testId?: string; hideUnit?: boolean }) {
  const units = useUnits();
  const names = new Map((units.data ?? []).map((u) => [u.id, u.name]));
  return (
    <ul className="alert-rows" data-testid={testId} data-count={alerts.length}>
      {alerts.map((a) => (
        <AlertRow key={a.alertId} alert={a} unitName={hideUnit ? null : (names.get(a.unitId) ?? a.unitId)} />
      ))}
    </ul>
  );
}

function AlertRow({ alert: a, unitName }: { alert: Alert; unitName: string | null }) {
  const now = useNow();
  const active = a.status === 'active';
  return (
    <li
      className={`alert-row sev-${a.severity} ${active ? 'is-active' : ''}`}
      data-testid={`alert-row-${a.alertId}`}
      data-status={a.status}
      data-acknowledged={a.acknowledgedAt ? 'true' : 'false'}
    >
      <div className="alert-row-main">
        <div className="alert-head">
          {unitName != null && (
            <Link to={unitPath(a.unitId)} className="alert-unit">
              {unitName}
            </Link>
          )}
          <span className="alert-type">{TYPE_LABEL[a.alertType]}</span>
          <span className={`badge ${active ? 'badge-excursion' : 'badge-ok'}`}>{active ? 'active' : 'resolved'}</span>
        </div>
        <div className="alert-msg">{a.message}</div>
        <dl className="alert-facts">
          <div>
            <dt>Started</dt>
            <dd title={new Date(a.triggeredAt).toLocaleString()}>{formatDateTime(a.triggeredAt)}</dd>
          </div>
          <div>
            <dt>Duration</dt>
            <dd data-testid={`alert-duration-${a.alertId}`}>
              {formatDuration(alertDuration(a, now))}
              {active && ' so far'}
            </dd>
          </div>
          <div>
            <dt>Peak</dt>
            <dd data-testid={`alert-peak-${a.alertId}`}>
              {a.alertType === 'offline' ? '—' : formatTemp(a.peakValue ?? a.value)}
            </dd>
          </div>
        </dl>
      </div>
      <div className="alert-row-ack">
        {a.acknowledgedAt ? (
          <div className="ack-info" data-testid={`alert-ack-${a.alertId}`}>
            <span className="ack-check" aria-hidden="true">
              ✓
            </span>
            <div>
              <div>
                Acknowledged by <strong data-testid={`alert-ack-by-${a.alertId}`}>{a.acknowledgedBy}</strong>{' '}
                <span className="muted" title={new Date(a.acknowledgedAt).toLocaleString()}>
                  {formatRelative(a.acknowledgedAt, now)}
                </span>
              </div>
              {a.note && (
                <div className="ack-note" data-testid={`alert-note-${a.alertId}`}>
                  “{a.note}”
                </div>
              )}
            </div>
          </div>
        ) : (
          <AcknowledgeAction alert={a} />
        )}
      </div>
    </li>
  );
}

/** "Acknowledge" with an optional note, for operators and admins (the role of the token). */
export function AcknowledgeAction({ alert }: { alert: Alert }) {
  const [open, setOpen] = useState(false);
  const [note, setNote] = useState('');
  const ack = useAcknowledge();
  if (!canAcknowledge(currentClaims())) {
    return <span className="muted small">Not acknowledged</span>;
  }
  const submit = (e: FormEvent) => {
    e.preventDefault();
    ack.mutate({ alertId: alert.alertId, note }, { onSuccess: () => setOpen(false) });
  };
  if (!open) {
    return (
      <button className="secondary" data-testid={`ack-button-${alert.alertId}`} onClick={() => setOpen(true)}>
        Acknowledge
      </button>
    );
  }
  return (
    <form className="ack-form" onSubmit={submit} data-testid={`ack-form-${alert.alertId}`}>
      <label className="small" htmlFor={`ack-note-${alert.alertId}`}>
        Note (optional)
      </label>
      <textarea
        id={`ack-note-${alert.alertId}`}
        data-testid={`ack-note-${alert.alertId}`}
        value={note}
        maxLength={1000}
        rows={2}
        placeholder="e.g. door left open, closed at 03:10"
        onChange={(e) => setNote(e.target.value)}
        autoFocus
      />
      {ack.error && <p className="error-text small">{describeAckError(ack.error)}</p>}
      <div className="ack-buttons">
        <button type="submit" className="primary" data-testid={`ack-confirm-${alert.alertId}`} disabled={ack.isPending}>
          {ack.isPending ? 'Saving…' : 'Acknowledge'}
        </button>
        <button type="button" className="secondary" onClick={() => setOpen(false)}>
          Cancel
        </button>
      </div>
    </form>
  );
}

function describeAckError(err: Error): string {
  if (err instanceof ApiError) {
    if (err.status === 409) return 'Someone has already acknowledged this alert.';
    if (err.status === 403) return 'Your role cannot acknowledge alerts.';
    if (err.status === 404 || err.status === 405) return 'This gateway cannot record acknowledgements yet.';
  }
  return `Could not acknowledge: ${err.message}`;
}
