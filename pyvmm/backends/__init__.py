"""Device back-ends in their own processes (the vhost-user model, DESIGN.md §4):
``vhost_user`` is the protocol both sides speak over a Unix socket."""
