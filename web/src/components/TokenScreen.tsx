import { useState, type FormEvent } from 'react';
import { setToken } from '../lib/token';

export function TokenScreen({ reason }: { reason?: string }) {
  const [value, setValue] = useState('');
  const [error, setError] = useState<string | null>(null);

  const submit = (e: FormEvent) => {
    e.preventDefault();
    setError(setToken(value));
  };

  return (
    <div className="token-screen">
      <form className="token-card" onSubmit={submit} data-testid="token-screen">
        <div className="token-brand">
          <svg className="logo" viewBox="0 0 32 32" aria-hidden="true">
            <rect width="32" height="32" rx="8" fill="currentColor" />
            <path d="M16 7v12" stroke="#fff" strokeWidth="3" strokeLinecap="round" />
            <circle cx="16" cy="22" r="4.5" fill="#fff" />
          </svg>
          sensorwire
        </div>
        <h1>Sign in with a token</h1>
        <p className="muted">
          {reason ?? 'This dashboard needs an access token (a JWT) issued for your organisation.'} Create one with{' '}
          <code>sensorwire token --org &lt;org&gt;</code>, or open the dashboard with <code>#token=…</code> in the URL.
        </p>
        <label htmlFor="token-input">Access token</label>
        <textarea
          id="token-input"
          data-testid="token-input"
          value={value}
          onChange={(e) => setValue(e.target.value)}
          placeholder="eyJhbGciOiJIUzI1NiIs…"
          rows={4}
          spellCheck={false}
          autoFocus
        />
        {error && <p className="error-text">{error}</p>}
        <button type="submit" className="primary" disabled={!value.trim()}>
          Connect
        </button>
      </form>
    </div>
  );
}
