"""The job store: the only code that writes job records, and every Lua script that does."""
