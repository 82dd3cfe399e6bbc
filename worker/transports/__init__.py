"""Delivery transports behind one :class:`~worker.transports.base.Transport` interface.

``base`` (the interface and its value types), ``smtp/`` (the SMTP transport: a per-account pool
of sessions, their login and pipelined transactions, aiosmtplib's exceptions translated in one
table), ``graph`` (Microsoft Graph), ``oauth`` (token sources), ``limits`` (connection caps and
rate limits shared across workers), ``tls``, ``public_http`` (the webhooks' httpx transport) and
``factory`` (the transport an account's record names). This file imports none of them:
importing one room does not load the others.
"""
