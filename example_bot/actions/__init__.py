"""Custom actions of the Pennywise Bank demo bot (rasa_sdk action server)."""
