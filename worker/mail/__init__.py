"""Mail: what is sent, and what comes back.

The payload a producer enqueues (:mod:`worker.mail.payload`), the MIME message built from
it, auto-reply rules (RFC 3834), and S/MIME and DKIM signing. Builds on records.

What comes back after a send: the reports in a sender's mailbox (DSNs, bounces, ARF
complaints, auto-replies) read as a :class:`worker.mail.reports.Report`, from a message read
with bounded work (:mod:`worker.mail.received`).
"""
