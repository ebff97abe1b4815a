"""The SQLite v3 decision contract: schema and drift, read-only access, row checks."""
