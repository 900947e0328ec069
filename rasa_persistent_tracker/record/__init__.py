"""The hot record: Rasa events, window, replay, per-process memory, trackers."""
