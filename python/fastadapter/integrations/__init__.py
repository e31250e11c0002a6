"""Integrations with training frameworks; each module imports its framework, which stays optional."""
