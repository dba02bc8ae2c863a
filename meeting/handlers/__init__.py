"""HTTP handlers: parse with a schema, call a service, serialise. No business rules here."""
