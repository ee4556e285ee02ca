"""The web view: inbox, sessions, a live session page and the fleet, in a browser (`agentbus web`).

A Starlette app (`app.py`) serving static pages (`static/`, no CDN), a JSON API and server-sent
event streams (`streams.py`). People log in with their agentbus credentials; the server keeps one
NATS connection per login and acts only through it (`logins.py`), so NATS enforces each person's
role. Importing this package imports nothing heavy: `agentbus --help` lists `web` without it.
"""
