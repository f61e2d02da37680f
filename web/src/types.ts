// The gateway's wire types, generated from src/wire.rs into proto/index.ts (type-only).
import type { Alert as ProtoAlert, ServerToClientEvents as ProtoServerToClientEvents } from '../../proto';

export type {
  AlertResolved,
  AlertTriggered,
  ClientToServerEvents,
  HandshakeAuth,
  ReadingsBatch,
  RefreshAck,
  SensorReading,
  Site,
  SubscribeAck,
  SyncComplete,
  Unit,
  UnitStatus,
  UnitStatusChanged,
} from '../../proto';

/**
 * The Alert of the contract's "Alert lifecycle" section. The fields are optional here until
 * proto/ is regenerated with them: a gateway without acknowledgement or history support simply
 * does not send them, and the UI shows what it has (duration computed from the two times, no peak,
 * no acknowledgement).
 */
export type Alert = ProtoAlert & {
  acknowledgedAt?: string | null;
  acknowledgedBy?: string | null;
  note?: string | null;
  peakValue?: number | null;
  durationSeconds?: number | null;
};

/** `alert:acknowledged` (contract, "Alert lifecycle"); `offset` as on every org event. */
export interface AlertAcknowledged {
  alertId: string;
  unitId: string;
  acknowledgedAt: string;
  acknowledgedBy: string;
  note: string | null;
  offset?: string;
}

export type ServerToClientEvents = ProtoServerToClientEvents & {
  'alert:acknowledged': (a: AlertAcknowledged) => void;
};
