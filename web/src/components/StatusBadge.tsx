import type { UnitStatus } from '../types';

export function StatusBadge({ status, testId }: { status: UnitStatus; testId?: string }) {
  return (
    <span className={`badge badge-${status}`} data-testid={testId} data-status={status}>
      {status}
    </span>
  );
}
