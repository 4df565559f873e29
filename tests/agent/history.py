"""The sessions of the voice agent's own account, read from its database."""

import psycopg


def agent_sessions(voice_env: dict) -> list[str]:
    """Ids of the sessions the agent's account holds (for rooms opened without the API's token)."""
    with psycopg.connect(voice_env["DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT s.id FROM chat_sessions s JOIN users u ON u.id = s.user_id WHERE u.email = %s",
            (voice_env["API_USER_EMAIL"],),
        ).fetchall()
    return [str(session_id) for (session_id,) in rows]
