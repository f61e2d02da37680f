import { useEffect, useRef, useState } from 'react';
import { AlertsView } from './components/Alerts';
import { ActiveAlerts } from './components/ActiveAlerts';
import { Dashboard } from './components/Dashboard';
import { Header } from './components/Header';
import { Toasts } from './components/Toasts';
import { TokenScreen } from './components/TokenScreen';
import { UnitDetail } from './components/UnitDetail';
import { siteFilter } from './lib/filter';
import { useActiveAlerts } from './lib/queries';
import { formatClock, formatRelative, useNow } from './lib/time';
import { Link, matchRoute, usePath } from './lib/router';
import { useStore } from './lib/store';
import { getToken, tokenStatus } from './lib/token';
import { RealtimeProvider, useRealtime, useRoom } from './realtime/RealtimeProvider';

export function App() {
  const status = useStore(tokenStatus);

  useEffect(() => {
    if (tokenStatus.get().state === 'unknown') getToken().catch(() => {});
  }, []);

  if (status.state === 'unknown') {
    return (
      <div className="splash" aria-busy="true">
        <div className="spinner" />
      </div>
    );
  }
  if (status.state === 'missing') return <TokenScreen reason={status.reason} />;
  return (
    <RealtimeProvider>
      <Shell />
    </RealtimeProvider>
  );
}

function Shell() {
  const route = matchRoute(usePath());
  const site = useStore(siteFilter);
  // The site filter's room, kept while the app is open (also on a unit's page).
  useRoom('site', site || null);
  const stale = useStaleSince();
  useTabTitle();

  return (
    <div className={`app ${stale ? 'is-stale' : ''}`} data-stale={stale ? 'true' : 'false'}>
      <Header />
      <ConnectionBanner since={stale} />
      <div className="body">
      <main className="main">
        {route.name === 'dashboard' && (
          <div className="layout">
            <ActiveAlerts />
            <Dashboard />
          </div>
        )}
        {route.name === 'alerts' && <AlertsView />}
        {route.name === 'unit' && <UnitDetail key={route.unitId} unitId={route.unitId} />}
        {route.name === 'not-found' && (
          <div className="empty">
            <h2>Page not found</h2>
            <Link to="/">Back to the dashboard</Link>
          </div>
        )}
      </main>
      <Toasts />
      </div>
    </div>
  );
}

/**
 * When the figures on screen stopped being live: the moment the socket left `connected` after
 * having been connected (null while live, and before the first connection, when nothing is shown).
 */
function useStaleSince(): number | null {
  const { state } = useRealtime();
  const [since, setSince] = useState<number | null>(null);
  const everConnected = useRef(false);
  useEffect(() => {
    if (state === 'connected') {
      everConnected.current = true;
      setSince(null);
    } else if (everConnected.current) {
      setSince((s) => s ?? Date.now());
    }
  }, [state]);
  return since;
}

/** "(2) sensorwire" while two alerts are open, so a background tab shows it. */
function useTabTitle() {
  const alerts = useActiveAlerts();
  const count = alerts.data?.length ?? 0;
  useEffect(() => {
    document.title = count > 0 ? `(${count}) sensorwire` : 'sensorwire';
  }, [count]);
}

/** While the socket is down the numbers on screen are stale: say so, in plain words. */
function ConnectionBanner({ since }: { since: number | null }) {
  const { state, connectionError } = useRealtime();
  const now = useNow();
  if (since == null && state !== 'disconnected') return null;
  const retry = `Trying to reconnect${connectionError ? ` (${connectionError})` : ''}…`;
  if (since == null) {
    // Never connected in this tab: nothing on screen is live yet.
    return (
      <div className="conn-banner" role="status" data-testid="connection-banner">
        <strong>Not connected to the gateway.</strong>
        <span>{retry}</span>
      </div>
    );
  }
  const at = new Date(since).toISOString();
  return (
    <div className="conn-banner" role="status" data-testid="connection-banner">
      <strong>Not connected — the values below are not live.</strong>
      <span>
        They were last updated {formatRelative(at, now)} ({formatClock(at)}). {retry}
      </span>
    </div>
  );
}
