// The gateway's wire types, generated from src/wire.rs into proto/index.ts (type-only).
export type {
  Alert,
  AlertResolved,
  AlertTriggered,
  ClientToServerEvents,
  HandshakeAuth,
  ReadingsBatch,
  RefreshAck,
  SensorReading,
  ServerToClientEvents,
  Site,
  SubscribeAck,
  SyncComplete,
  Unit,
  UnitStatus,
  UnitStatusChanged,
} from '../../proto';
