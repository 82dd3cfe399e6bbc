"""Postroom's one database, Redis: every key name (keys.py), every client (connect.py), and the
one vocabulary of what is kept there (vocabulary.py: states, history words, recipient results,
event types, counters)."""
