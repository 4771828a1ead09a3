#!/bin/sh
# The proxies' service login (docs/security.md): no superuser; reads every table (look-aheads), and may
# create the schema azure_local_ai_catalog (the catalog the proxies share) in the database postgres.
set -e
psql -v ON_ERROR_STOP=1 -U postgres -d postgres -v password="$AIPROXY_PASSWORD" <<'SQL'
CREATE ROLE aiproxy LOGIN PASSWORD :'password';
GRANT pg_read_all_data TO aiproxy;
GRANT CREATE ON DATABASE postgres TO aiproxy;
SQL
