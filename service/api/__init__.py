"""The HTTP API (imports neither torch nor diffusers)."""

from service.api.app import create_app

__all__ = ["create_app"]
