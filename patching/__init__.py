"""Standalone patch library for diffusers models (never imports ``farm``, ``tasks`` or ``storage``)."""
