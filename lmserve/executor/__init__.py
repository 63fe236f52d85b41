"""Executors drive the workers: one in-process worker now; one process per TP rank later."""
