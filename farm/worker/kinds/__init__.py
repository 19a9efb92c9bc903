"""Shard runners, one module per job kind, named as the kind's spec module in :mod:`farm.kinds`.

Only workers import these (they import torch and diffusers); a kind's descriptor reaches its
runner through :attr:`farm.kinds.base.JobKind.runner`.
"""
