"""The hot state: its protocol, the Redis backend with its Lua, the embedded SQLite store."""
