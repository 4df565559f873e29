"""The voice turns the agent stored through the API, read from its database."""

import psycopg


def agent_history(database_url: str, email: str) -> list[list[tuple[str, str]]]:
    """Each of the agent account's sessions, as (role, content) turns, oldest session first."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """SELECT s.id, m.role, m.content FROM chat_sessions s
               JOIN users u ON u.id = s.user_id
               LEFT JOIN chat_messages m ON m.session_id = s.id
               WHERE u.email = %s ORDER BY s.created_at, m.id""",
            (email,),
        ).fetchall()
    sessions: dict = {}
    for session_id, role, content in rows:
        sessions.setdefault(session_id, [])
        if role:
            sessions[session_id].append((role, content))
    return list(sessions.values())
