import { Link } from '../lib/router';
import { useActiveAlerts } from '../lib/queries';
import { useRealtime } from '../realtime/RealtimeProvider';

const LABELS = { connected: 'Connected', connecting: 'Connecting…', disconnected: 'Disconnected' } as const;

export function Header() {
  const { state, connectionError } = useRealtime();
  const alerts = useActiveAlerts();
  const count = alerts.data?.length ?? 0;
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
      <div className="header-right">
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
