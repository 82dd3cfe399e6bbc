"""Mail: what is sent.

The payload a producer enqueues (:mod:`worker.mail.payload`), the MIME message built from
it, auto-reply rules (RFC 3834), and S/MIME and DKIM signing. Builds on records.
"""
