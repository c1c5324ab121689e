-- 0001: the data contract (see docs/architecture.md). Column names and meanings are public.

-- The source of workspaces. Apps may point AVAILABILITY_CRON_SOURCE_TABLE at a view with
-- these columns instead; this table is then simply unused.
CREATE TABLE IF NOT EXISTS availability_workspaces (
    workspace_id    text PRIMARY KEY,
    provider        text NOT NULL,
    provider_config jsonb NOT NULL DEFAULT '{}',
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Serves the "missing caches, oldest workspace first" half of the plan.
CREATE INDEX IF NOT EXISTS availability_workspaces_created_at_idx
    ON availability_workspaces (created_at, workspace_id) WHERE enabled;

-- One row per workspace: the last successful slots, and the state of the last attempt.
CREATE TABLE IF NOT EXISTS workspace_availability_cache (
    workspace_id         text PRIMARY KEY,
    slots_utc            jsonb,            -- sorted JSON array of ISO-8601 UTC instants
    slot_count           integer,          -- jsonb_array_length(slots_utc), kept for cheap reports
    range_start          timestamptz,      -- window the slots cover
    range_end            timestamptz,
    fetched_at           timestamptz NOT NULL,  -- last attempt, successful or not
    refreshed_at         timestamptz,           -- last success; NULL until one
    stale_at             timestamptz NOT NULL,  -- due for refresh from this instant
    last_error           text,
    last_error_at        timestamptz,
    consecutive_failures integer NOT NULL DEFAULT 0,
    CONSTRAINT workspace_availability_cache_slots_is_array
        CHECK (slots_utc IS NULL OR jsonb_typeof(slots_utc) = 'array'),
    CONSTRAINT workspace_availability_cache_failures_not_negative
        CHECK (consecutive_failures >= 0)
);

-- Serves the stalest-first plan: WHERE stale_at <= now ORDER BY stale_at, workspace_id.
CREATE INDEX IF NOT EXISTS workspace_availability_cache_stale_at_idx
    ON workspace_availability_cache (stale_at, workspace_id);
