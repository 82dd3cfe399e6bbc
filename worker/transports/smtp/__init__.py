"""SMTP delivery: the per-account pool (pool.py, SmtpTransport) of sessions (session.py) that log in
(auth.py), run pipelined mail transactions (pipelining.py) and translate aiosmtplib's errors in one
table (errors.py); the account's slots shared with other processes (shares.py)."""
