-- 0003: which workspace a cache row belongs to. A workspace_id may be deleted and reused
-- by a new workspace: a cache row whose workspace_created_at is older than the source
-- row's created_at is the old tenant's, planned as missing and never served by the
-- readers. NULL for rows written before this migration (and for a source row without a
-- created_at): such a row is taken as the current workspace's.
ALTER TABLE workspace_availability_cache
    ADD COLUMN IF NOT EXISTS workspace_created_at timestamptz;
