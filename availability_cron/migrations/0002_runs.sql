-- 0002: run history. One row per `availability-cron refresh`, including skipped and failed
-- runs, pruned after AVAILABILITY_CRON_RUN_RETENTION_DAYS (1,440 rows a day at a minute
-- cadence). `metrics` reads it: last completed run, lock-skip streak, durations.
CREATE TABLE IF NOT EXISTS availability_cron_runs (
    run_id         text PRIMARY KEY,
    host           text NOT NULL,
    pid            integer NOT NULL,
    started_at     timestamptz NOT NULL,
    finished_at    timestamptz NOT NULL,
    -- completed: ran (provider errors included); skipped: the lock was held;
    -- failed: a real failure (exit 1)
    outcome        text NOT NULL CHECK (outcome IN ('completed', 'skipped', 'failed')),
    duration_ms    integer NOT NULL,
    within_budget  boolean NOT NULL,
    refreshed      integer NOT NULL DEFAULT 0,
    summary        jsonb NOT NULL
);

-- Serves pruning and every "latest runs" question.
CREATE INDEX IF NOT EXISTS availability_cron_runs_started_at_idx
    ON availability_cron_runs (started_at);
