"""Everything that talks SQL: tables, the database handle, partition apply, run records."""
