#!/bin/bash
# Runs once, when the postgres container initialises an empty data directory.
# Creates the login Grafana uses, as a member of inventory_reader: the role
# the migrations GRANT read access on schema inventory to (and nothing else).
# The role is created here, NOLOGIN, so the membership can exist before the
# first `image-sync migrate`; the migrations leave an existing role alone.
set -euo pipefail

psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v reader_password="$GRAFANA_DB_PASSWORD" <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'inventory_reader') THEN
        CREATE ROLE inventory_reader NOLOGIN;
    END IF;
END
$$;
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_password' IN ROLE inventory_reader;
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
SQL
