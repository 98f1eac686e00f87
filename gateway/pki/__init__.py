"""Certificates: the CA, issuing, CRLs (`ca`), and the `certs` command (`cli`)."""
