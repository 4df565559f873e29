"""ASGI entry point for uvicorn and gunicorn: `morgana.api.asgi:app`."""

from morgana.api.cli import load_settings
from morgana.api.main import create_app

app = create_app(load_settings())
