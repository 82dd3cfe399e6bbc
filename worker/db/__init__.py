"""Postroom's one database, Redis: every key name (keys.py) and every client (connect.py)."""
