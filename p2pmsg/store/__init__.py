"""SQLite storage: schema migrations and a single writer thread driven from trio."""
