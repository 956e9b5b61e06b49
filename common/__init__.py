"""Shared by site and coordinator: configuration, models, adapters, metrics.

Imports neither `client` nor `server`.
"""
