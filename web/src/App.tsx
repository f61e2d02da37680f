import { useEffect } from 'react';
import { ActiveAlerts } from './components/ActiveAlerts';
import { Dashboard } from './components/Dashboard';
import { Header } from './components/Header';
import { Toasts } from './components/Toasts';
import { TokenScreen } from './components/TokenScreen';
import { UnitDetail } from './components/UnitDetail';
import { siteFilter } from './lib/filter';
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

  return (
    <div className="app">
      <Header />
      <ConnectionBanner />
      <main className="main">
        {route.name === 'dashboard' && (
          <div className="layout">
            <Dashboard />
            <ActiveAlerts />
          </div>
        )}
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
  );
}

/** While the socket is down the numbers on screen may be stale: say so. */
function ConnectionBanner() {
  const { state, connectionError } = useRealtime();
  if (state !== 'disconnected') return null;
  return (
    <div className="conn-banner" role="status" data-testid="connection-banner">
      <strong>Live updates paused.</strong>
      <span>
        Reconnecting to the gateway{connectionError ? ` (${connectionError})` : ''} — figures may be out of date.
      </span>
    </div>
  );
}
