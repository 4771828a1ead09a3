"""The admin console: a database name (admin_database) whose sessions the proxy answers itself, as
PgBouncer's `pgbouncer` database: SHOW STATS, SHOW SESSIONS, SHOW MODELS, SHOW CONFIG, SHOW VERSION,
RELOAD, PAUSE, RESUME."""
