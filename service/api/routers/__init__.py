"""Routers by concern."""
