"""Test-only helpers: a throwaway PKI and real aiosmtpd servers on port 0."""
