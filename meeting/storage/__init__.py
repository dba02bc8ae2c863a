"""SQL for each aggregate, owned by meeting.db: the only modules that build queries."""
