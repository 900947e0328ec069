"""Off the happy path: reading history, merging foreign trackers, restoring."""
