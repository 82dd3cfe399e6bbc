"""What the queue consults about each account.

Account health and the circuit breaker, the delivery counters written with each outcome,
the connectivity check (connect, secure, log in; never send) and the deliverability preflight
beside it (the sender domain's MX, SPF, DKIM and DMARC; advice only). Builds on records, mail
and transports.
"""
