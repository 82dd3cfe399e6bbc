"""Account records: the YAML as written (record.py) and its resolution (account.py), provider presets
(providers.py), the JavaMail-style ``advanced`` keys (advanced.py) and the bounce reader's
mailbox (bounces.py)."""
