"""Delivery transports behind one :class:`~worker.transports.base.Transport` interface.

``base`` (the interface and its value types), ``smtp`` (one SMTP session), ``pool``
(the SMTP transport: pooled sessions), ``graph`` (Microsoft Graph), ``oauth`` (token
sources), ``limits`` (connection caps and rate limits shared across workers),
``smtp_errors`` (aiosmtplib's exceptions translated, in one table), ``tls``, and
``factory`` (the transport an account's record names). This file imports none of
them: importing one room does not load the others.
"""
