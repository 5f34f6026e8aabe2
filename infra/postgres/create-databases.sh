#!/bin/sh
# First start of the compose PostgreSQL: the databases beside POSTGRES_DB (mlflow), owned by POSTGRES_USER.
set -eu
for db in mlflow_auth prefect; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE $db OWNER $POSTGRES_USER"
done
