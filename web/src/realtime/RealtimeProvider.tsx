import { useQueryClient } from '@tanstack/react-query';
import {
  createContext,
  useCallback,
  useContext,
  useEffect,
  useMemo,
  useRef,
  useState,
  type ReactNode,
} from 'react';
import { io, type Socket } from 'socket.io-client';
import { GATEWAY_URL } from '../lib/config';
import {
  applyAlertAcknowledged,
  applyAlertResolved,
  applyAlertTriggered,
  applyBatch,
  applyReading,
  applyStatus,
  keys,
} from '../lib/live';
import { dismissToast, showAlertToast, toastFromAlert } from '../lib/toasts';
import { RENEW_BEFORE_SECS, getToken, secondsLeft, tokenStatus } from '../lib/token';
import type {
  Alert,
  ClientToServerEvents,
  HandshakeAuth,
  ServerToClientEvents,
  SubscribeAck,
  SyncComplete,
} from '../types';

export type AppSocket = Socket<ServerToClientEvents, ClientToServerEvents>;
export type ConnectionState = 'connected' | 'connecting' | 'disconnected';
export type RoomKind = 'site' | 'unit';

interface Status {
  state: ConnectionState;
  error: string | null;
}

export interface Realtime {
  socket: AppSocket;
  state: ConnectionState;
  isConnected: boolean;
  isConnecting: boolean;
  /** Why the last connection attempt failed or the connection dropped; null when connected. */
  connectionError: string | null;
  /**
   * Keeps the socket in `site:{id}` / `unit:{id}` while the returned function has not been called;
   * re-subscribes after every reconnect. `onAck` gets each subscribe's answer.
   */
  subscribe(kind: RoomKind, id: string, onAck?: (ack: SubscribeAck) => void): () => void;
}

const RealtimeContext = createContext<Realtime | null>(null);

interface Room {
  kind: RoomKind;
  id: string;
  count: number;
  listeners: Set<(ack: SubscribeAck) => void>;
}

/** Manual retries (after a refused handshake or a server-side disconnect): 0.5 s doubling to 5 s. */
const RETRY_BASE_MS = 500;
const RETRY_MAX_MS = 5000;
/**
 * After a handshake that carried an offset, how long to wait for `sync:complete` before refetching
 * anyway (e.g. a node of an older version that does not answer it).
 */
const SYNC_TIMEOUT_MS = 10_000;

/**
 * One Socket.io connection to the gateway for the whole app.
 *
 * socket.io-client reconnects by itself after a dropped transport (with backoff up to
 * `reconnectionDelayMax`). It does not after a refused handshake (`connect_error` while
 * `socket.active` is false, e.g. `unauthorized: token expired`) or a server-side disconnect
 * (`io server disconnect`, e.g. after `auth:expired`): for those this provider gets a fresh token
 * and calls `socket.connect()` again after a backoff. The `auth` option is a function, so every
 * attempt sends the current token. Before the token expires it is renewed in place with
 * `auth:refresh`.
 *
 * Missed events: every org-room event carries an `offset`; the provider keeps the last one it saw
 * and sends it with the token on every (re)connect. The gateway then replays what this tab missed
 * (through the same handlers as live events) and says `sync:complete { recovered: true }` — nothing
 * to refetch. `recovered: false` (offset unknown or too old), or a connect without an offset, means
 * the REST queries are refetched instead. The gateway may also send `sync:complete
 * { recovered: false }` on a live connection, with no reconnect, when this socket missed events it
 * cannot replay: the same refetch, the socket and its rooms staying as they are.
 */
export function RealtimeProvider({ children }: { children: ReactNode }) {
  const queryClient = useQueryClient();
  const sentToken = useRef<string | null>(null);
  /** The `offset` of the last event received (opaque; events arrive in offset order). */
  const lastOffset = useRef<string | null>(null);
  /** The offset sent with the current connection's handshake, if any. */
  const sentOffset = useRef<string | null>(null);
  const rooms = useRef(new Map<string, Room>());

  const [socket] = useState<AppSocket>(() =>
    io(GATEWAY_URL, {
      autoConnect: false,
      forceNew: true,
      reconnection: true,
      reconnectionAttempts: Infinity,
      reconnectionDelay: 1000,
      reconnectionDelayMax: 5000,
      auth: (cb) => {
        getToken().then(
          (token) => {
            sentToken.current = token;
            sentOffset.current = lastOffset.current;
            // With an offset, the gateway replays what we missed since it, then `sync:complete`.
            const auth: HandshakeAuth = lastOffset.current ? { token, offset: lastOffset.current } : { token };
            cb(auth);
          },
          // No token at all: the handshake is refused and the paste-a-token screen shows.
          () => {
            sentOffset.current = null;
            cb({ token: '' } satisfies HandshakeAuth);
          },
        );
      },
    }),
  );

  const [status, setStatus] = useState<Status>({ state: 'connecting', error: null });

  const emitSubscribe = useCallback(
    (room: Room) => {
      const onAck = (ack: SubscribeAck) => {
        if (!ack.ok) console.warn(`subscribe:${room.kind} ${room.id} refused: ${ack.error}`);
        room.listeners.forEach((l) => l(ack));
      };
      if (room.kind === 'unit') socket.emit('subscribe:unit', room.id, onAck);
      else socket.emit('subscribe:site', room.id, onAck);
    },
    [socket],
  );

  const subscribe = useCallback(
    (kind: RoomKind, id: string, onAck?: (ack: SubscribeAck) => void) => {
      const key = `${kind}:${id}`;
      let room = rooms.current.get(key);
      if (!room) {
        room = { kind, id, count: 0, listeners: new Set() };
        rooms.current.set(key, room);
      }
      const r = room;
      if (onAck) r.listeners.add(onAck);
      if (++r.count === 1 && socket.connected) emitSubscribe(r);
      let done = false;
      return () => {
        if (done) return;
        done = true;
        if (onAck) r.listeners.delete(onAck);
        if (--r.count > 0) return;
        rooms.current.delete(key);
        if (!socket.connected) return;
        if (kind === 'unit') socket.emit('unsubscribe:unit', id);
        else socket.emit('unsubscribe:site', id);
      };
    },
    [socket, emitSubscribe],
  );

  // Every listener is registered once, here, on this socket instance; removed on unmount.
  useEffect(() => {
    let disposed = false;
    let attempt = 0;
    let retryTimer: ReturnType<typeof setTimeout> | undefined;
    let renewTimer: ReturnType<typeof setTimeout> | undefined;
    let syncTimer: ReturnType<typeof setTimeout> | undefined;

    const retryLater = (error: string | null) => {
      clearTimeout(retryTimer);
      const delay = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** attempt++) * (0.8 + Math.random() * 0.4);
      setStatus({ state: error ? 'disconnected' : 'connecting', error });
      retryTimer = setTimeout(() => {
        if (disposed || socket.connected || socket.active) return;
        if (tokenStatus.get().state === 'missing') return; // resumes when a token is pasted
        setStatus((s) => ({ state: 'connecting', error: s.error }));
        socket.connect();
      }, delay);
    };

    /** After the gateway refused us or dropped us itself: a new token, then try again. */
    const recover = (error: string, tokenRefused: boolean) => {
      getToken({ force: tokenRefused }).then(
        () => !disposed && retryLater(error),
        () => {
          if (disposed) return;
          setStatus({ state: 'disconnected', error });
          if (tokenRefused) {
            tokenStatus.set({ state: 'missing', reason: `The gateway refused the token (${error}).` });
          }
        },
      );
    };

    const scheduleRenewal = () => {
      clearTimeout(renewTimer);
      const token = sentToken.current;
      if (!token) return;
      const left = secondsLeft(token);
      if (!Number.isFinite(left)) return;
      // A little past the renewal point: a timer may fire a few milliseconds early, and
      // `getToken` only fetches a new token once the current one is inside the window.
      const delay = Math.max(0, (left - RENEW_BEFORE_SECS) * 1000 + 250);
      renewTimer = setTimeout(renew, Math.min(delay, 2 ** 31 - 1));
    };

    /** `auth:refresh` about a minute before `exp`, when a newer token can be had. */
    const renew = async () => {
      const fresh = await getToken().catch(() => null);
      if (disposed || !fresh || !socket.connected) return;
      if (fresh === sentToken.current) {
        // No newer token yet (fired early, or the token source is slow): look again shortly
        // rather than give up and let the socket expire.
        if (secondsLeft(fresh) > 0) renewTimer = setTimeout(renew, 1_000);
        return;
      }
      try {
        const ack = await socket.timeout(10_000).emitWithAck('auth:refresh', fresh);
        if (ack.ok) {
          sentToken.current = fresh;
          scheduleRenewal();
        } else {
          console.warn(`auth:refresh refused: ${ack.error}`);
        }
      } catch {
        console.warn('auth:refresh timed out');
      }
    };

    /**
     * Whatever happened while we were away (or while events did not reach us): read it again. Every
     * query is invalidated — the ones on screen (units, active alerts, the open chart's readings,
     * sites) refetch now, the others when next shown. Alerts that opened meanwhile (active now,
     * unknown before) get their toast, as they would have live (those that closed meanwhile leave
     * the refetched list, and <Toasts> shows only active ones).
     *
     * `cancelInFlight`: a fetch already under way may have been answered before the events we
     * missed were stored, so after `sync:complete { recovered: false }` it is restarted rather than
     * awaited. (A first load that has no data yet is never cancelled; TanStack Query awaits it.)
     */
    const refetchAll = async (cancelInFlight = false) => {
      const known = queryClient.getQueryData<Alert[]>(keys.activeAlerts);
      await queryClient.invalidateQueries(undefined, { cancelRefetch: cancelInFlight });
      if (disposed || !known) return; // the first load: nothing was missed
      const active = queryClient.getQueryData<Alert[]>(keys.activeAlerts) ?? [];
      for (const a of active) {
        if (!known.some((k) => k.alertId === a.alertId)) showAlertToast(toastFromAlert(a));
      }
    };

    const onConnect = () => {
      attempt = 0;
      clearTimeout(retryTimer);
      clearTimeout(syncTimer);
      setStatus({ state: 'connected', error: null });
      for (const room of rooms.current.values()) emitSubscribe(room);
      if (sentOffset.current) {
        // The gateway replays what we missed, then sends `sync:complete` (handled below).
        syncTimer = setTimeout(() => void refetchAll(), SYNC_TIMEOUT_MS);
      } else {
        void refetchAll();
      }
      scheduleRenewal();
    };

    /**
     * After a handshake with an offset, or at any time on a live connection (the gateway knows this
     * socket missed events it cannot replay). Either way the socket and its rooms stay as they are.
     */
    const onSyncComplete = ({ recovered, offset }: SyncComplete) => {
      clearTimeout(syncTimer);
      if (recovered) {
        // Every missed event went through the handlers below already: nothing to refetch. Without
        // a reconnect before it, nothing was missed at all: `offset` is the newest this socket has
        // seen, i.e. where it already stands.
        if (offset) lastOffset.current = offset;
        return;
      }
      // Events after `lastOffset` are gone for us: a replay from it would skip them and re-apply,
      // on top of the fresher REST answers, events we already had (an alert reopened, a status
      // undone) — or be refused anyway when the hole is older than the retention window. So the
      // offset is dropped, not kept: a reconnect before the next event sends none and refetches
      // (as on a first connect), and the next event received — the gateway sends this notice as
      // the socket goes back to live delivery, so that event comes after the hole — gives a new
      // one to replay from. (Should a live event slip in just before the notice, its good offset
      // is dropped too: that costs one refetch at most, never a gap.) `recovered: false` carries
      // no offset of the gateway's to take instead.
      lastOffset.current = null;
      void refetchAll(true);
    };

    // Any event whose payload has an `offset` (batches, alerts, status, published events, replayed
    // or live) moves the offset the next handshake sends.
    const onAnyEvent = (_event: string, payload?: unknown) => {
      const offset = (payload as { offset?: unknown } | null | undefined)?.offset;
      if (typeof offset === 'string') lastOffset.current = offset;
    };

    const onConnectError = (err: Error) => {
      if (socket.active) {
        // A transport-level failure: socket.io retries by itself, with backoff.
        setStatus({ state: 'disconnected', error: describeTransportError(err.message) });
        return;
      }
      // The gateway refused the handshake; socket.io will not retry on its own.
      const message = err.message || 'connection refused';
      recover(message, message.startsWith('unauthorized'));
    };

    const onDisconnect = (reason: Socket.DisconnectReason) => {
      clearTimeout(renewTimer);
      clearTimeout(syncTimer);
      if (disposed) return;
      if (socket.active) {
        setStatus({ state: 'connecting', error: `connection lost (${reason})` });
      } else if (reason === 'io server disconnect') {
        recover('disconnected by the gateway', false);
      } else {
        setStatus({ state: 'disconnected', error: reason });
      }
    };

    // While the gateway is unreachable the indicator stays red (with the last error) between
    // attempts; without an error yet, it shows that an attempt is under way.
    const onReconnectAttempt = () =>
      setStatus((s) => (s.state === 'disconnected' && !s.error ? { ...s, state: 'connecting' } : s));

    const onAuthExpired = () => console.info('sensorwire: token expired; reconnecting with a new one');
    const onServerError = (e: { code: string; message: string }) =>
      console.warn(`sensorwire: ${e.code}: ${e.message}`);

    const onBatch: ServerToClientEvents['sensor:readings:batch'] = (b) => applyBatch(queryClient, b);
    const onReading: ServerToClientEvents['sensor:reading'] = (r) => applyReading(queryClient, r);
    const onUnitStatus: ServerToClientEvents['unit:status'] = (s) => applyStatus(queryClient, s);
    const onAlertTriggered: ServerToClientEvents['alert:triggered'] = (a) => {
      applyAlertTriggered(queryClient, a);
      showAlertToast(a);
    };
    const onAlertResolved: ServerToClientEvents['alert:resolved'] = (a) => {
      applyAlertResolved(queryClient, a);
      dismissToast(a.alertId);
    };

    // Acknowledged in any tab of the organisation (this one too): shown everywhere. The toast of an
    // acknowledged alert stays until it resolves or this tab closes it: dismissing is per tab.
    const onAlertAcknowledged: ServerToClientEvents['alert:acknowledged'] = (a) => applyAlertAcknowledged(queryClient, a);

    socket.on('connect', onConnect);
    socket.on('connect_error', onConnectError);
    socket.on('disconnect', onDisconnect);
    socket.on('auth:expired', onAuthExpired);
    socket.on('error', onServerError);
    socket.on('sensor:readings:batch', onBatch);
    socket.on('sensor:reading', onReading);
    socket.on('unit:status', onUnitStatus);
    socket.on('alert:triggered', onAlertTriggered);
    socket.on('alert:resolved', onAlertResolved);
    socket.on('alert:acknowledged', onAlertAcknowledged);
    socket.on('sync:complete', onSyncComplete);
    socket.onAny(onAnyEvent);
    socket.io.on('reconnect_attempt', onReconnectAttempt);

    // A token pasted (or fetched) while we were refused: connect now.
    const offToken = tokenStatus.subscribe(() => {
      if (tokenStatus.get().state === 'ready' && !socket.connected && !socket.active) {
        attempt = 0;
        setStatus({ state: 'connecting', error: null });
        socket.connect();
      }
    });

    setStatus({ state: 'connecting', error: null });
    socket.connect();

    return () => {
      disposed = true;
      clearTimeout(retryTimer);
      clearTimeout(renewTimer);
      clearTimeout(syncTimer);
      offToken();
      socket.off('connect', onConnect);
      socket.off('connect_error', onConnectError);
      socket.off('disconnect', onDisconnect);
      socket.off('auth:expired', onAuthExpired);
      socket.off('error', onServerError);
      socket.off('sensor:readings:batch', onBatch);
      socket.off('sensor:reading', onReading);
      socket.off('unit:status', onUnitStatus);
      socket.off('alert:triggered', onAlertTriggered);
      socket.off('alert:resolved', onAlertResolved);
      socket.off('alert:acknowledged', onAlertAcknowledged);
      socket.off('sync:complete', onSyncComplete);
      socket.offAny(onAnyEvent);
      socket.io.off('reconnect_attempt', onReconnectAttempt);
      socket.disconnect();
    };
  }, [socket, queryClient, emitSubscribe]);

  const value = useMemo<Realtime>(
    () => ({
      socket,
      state: status.state,
      isConnected: status.state === 'connected',
      isConnecting: status.state === 'connecting',
      connectionError: status.state === 'connected' ? null : status.error,
      subscribe,
    }),
    [socket, status, subscribe],
  );

  return <RealtimeContext.Provider value={value}>{children}</RealtimeContext.Provider>;
}

/** socket.io's transport errors ("xhr poll error", "websocket error", "timeout") for a person. */
function describeTransportError(message: string | undefined): string {
  if (!message) return 'the gateway is unreachable';
  if (/poll error|websocket error|timeout/i.test(message)) return `the gateway is unreachable (${message})`;
  return message;
}

export function useRealtime(): Realtime {
  const ctx = useContext(RealtimeContext);
  if (!ctx) throw new Error('useRealtime outside <RealtimeProvider>');
  return ctx;
}

/** Keeps the socket in a room while the component is mounted (and `id` is set). */
export function useRoom(kind: RoomKind, id: string | null | undefined): SubscribeAck | null {
  const { subscribe } = useRealtime();
  const [ack, setAck] = useState<SubscribeAck | null>(null);
  useEffect(() => {
    setAck(null);
    if (!id) return;
    return subscribe(kind, id, setAck);
  }, [subscribe, kind, id]);
  return ack;
}
