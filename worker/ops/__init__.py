"""What the queue consults about each account.

Account health and the circuit breaker, the delivery counters written with each outcome,
and the connectivity check (connect, secure, log in; never send). Builds on records, mail
and transports.
"""
