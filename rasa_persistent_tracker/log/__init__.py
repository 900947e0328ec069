"""The SQL event log: tables, migrations, bulk statements, the outbox and its delivery."""
