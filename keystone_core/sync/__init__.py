"""Cloud sync data plane: the objects of one episode pushed to a cloud target.

``transfer`` streams an object in parts (bounded memory, SHA-256 of the whole object while
the parts go out in parallel); ``targets`` speaks to an S3 bucket or to a cloud receiver.
The database side (queue, claims, backoff, audit) is :mod:`keystone_core.services.sync`.
"""
