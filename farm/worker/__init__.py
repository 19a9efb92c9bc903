"""The worker runtime: pinned models, renderers, and the execution of one shard under a lease.

Everything heavy (torch, diffusers) is imported inside these modules' functions or by the worker
process only; the client and CLI never import this package at start.
"""
