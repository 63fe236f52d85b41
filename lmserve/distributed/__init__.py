"""Communication between the EngineCore and its worker processes.

`shm_ring` is the founding document's shared-memory ring buffer (§1.2): one writer broadcasts
messages to several readers; payloads too big for a chunk travel over ZMQ.
"""
