// The gateway's wire types, generated from src/wire.rs into proto/index.ts (type-only).
import type { ServerToClientEvents as ProtoServerToClientEvents } from '../../proto';

export type {
  Alert,
  AlertResolved,
  AlertTriggered,
  ClientToServerEvents,
  ReadingsBatch,
  RefreshAck,
  SensorReading,
  Site,
  SubscribeAck,
  Unit,
  UnitStatus,
  UnitStatusChanged,
} from '../../proto';

// Missed events after a reconnect (CONTRACT.md). Local until proto/index.ts has them.

/** `sync:complete`: sent after a handshake that carried `auth.offset`. */
export interface SyncComplete {
  /** true: every missed event was replayed before this; false: refetch through REST. */
  recovered: boolean;
  /** The offset of the last replayed event (when recovered). */
  offset?: string;
}

export interface ServerToClientEvents extends ProtoServerToClientEvents {
  'sync:complete': (payload: SyncComplete) => void;
}
