"""The SQL store: models, engine set-up, the apply transaction and read queries."""
