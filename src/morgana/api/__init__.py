"""The Morgana API: auth, sessions, streaming chat, history and LiveKit tokens."""
