"""Sessions and their accounting: what a session did, URB round trips, the
metric series they feed. Pure bookkeeping: no sockets, no Trio."""
