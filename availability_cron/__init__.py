"""availability-cron: keeps per-workspace calendar-availability caches in PostgreSQL fresh.

The app-side readers live in :mod:`availability_cron.readers`; this module stays
import-light so the cron entry point starts fast.
"""

__version__ = "0.1.0"
