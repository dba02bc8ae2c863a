"""`python -m meeting.bench`: reproducible load scenarios against a running or spawned server."""
