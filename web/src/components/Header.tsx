import { Link, matchRoute, usePath } from '../lib/router';
import { useStore } from '../lib/store';
import { currentClaims, tokenStatus } from '../lib/token';
import { useActiveAlerts } from '../lib/queries';
import { useRealtime } from '../realtime/RealtimeProvider';

const LABELS = { connected: 'Connected', connecting: 'Connecting…', disconnected: 'Disconnected' } as const;

export function Header() {
  const { state, connectionError } = useRealtime();
  const alerts = useActiveAlerts();
  const count = alerts.data?.length ?? 0;
  const route = matchRoute(usePath()).name;
  useStore(tokenStatus); // re-read the claims when the token changes
  const claims = currentClaims();
  const title =
    state === 'connected'
      ? 'Live: receiving readings and alerts'
      : connectionError
        ? `${connectionError}${state === 'disconnected' ? ' — retrying' : ''}`
        : 'Connecting to the gateway';

  return (
    <header className="header">
      <Link to="/" className="brand" aria-label="sensorwire dashboard">
        <Logo />
        <span className="brand-name">sensorwire</span>
        <span className="brand-sub">Cold-chain monitor</span>
      </Link>
      <nav className="nav" aria-label="Main">
        <Link to="/" className="nav-link" aria-current={route === 'dashboard' ? 'page' : undefined} data-testid="nav-units">
          Units
        </Link>
        <Link to="/alerts" className="nav-link" aria-current={route === 'alerts' ? 'page' : undefined} data-testid="nav-alerts">
          Alerts
        </Link>
      </nav>
      <div className="header-right">
        {claims?.sub && (
          <span className="who" data-testid="signed-in" title={`Signed in as ${claims.sub} (${claims.role ?? 'viewer'}) in ${claims.org_id}`}>
            <span className="who-sub" data-testid="signed-in-sub">
              {claims.sub}
            </span>
            <span className="who-org" data-testid="signed-in-org">
              {claims.org_id}
              {claims.role && claims.role !== 'viewer' ? ` · ${claims.role}` : ''}
            </span>
          </span>
        )}
        <span
          className={`alert-count ${count > 0 ? 'has-alerts' : ''}`}
          data-testid="alert-count"
          data-count={count}
          title={count === 1 ? '1 active alert' : `${count} active alerts`}
        >
          <BellIcon />
          <span>{count}</span>
          <span className="alert-count-label">{count === 1 ? 'active alert' : 'active alerts'}</span>
        </span>
        <span
          className={`conn conn-${state}`}
          data-testid="connection-status"
          data-state={state}
          title={title}
          role="status"
          aria-live="polite"
        >
          <span className="conn-dot" />
          {LABELS[state]}
        </span>
      </div>
    </header>
  );
}

function Logo() {
  return (
    <svg className="logo" viewBox="0 0 32 32" aria-hidden="true">
      <rect width="32" height="32" rx="8" fill="currentColor" />
      <path d="M16 7v12" stroke="#fff" strokeWidth="3" strokeLinecap="round" />
      <circle cx="16" cy="22" r="4.5" fill="#fff" />
    </svg>
  );
}

function BellIcon() {
  return (
    <svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true">
      <path
        d="M12 3a6 6 0 0 0-6 6v3.5L4.5 16h15L18 12.5V9a6 6 0 0 0-6-6Zm-2 15a2 2 0 0 0 4 0"
        fill="none"
        stroke="currentColor"
        strokeWidth="2"
        strokeLinejoin="round"
      />
    </svg>
  );
}
