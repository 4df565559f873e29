"""How the API serves the playground: only when enabled, with headers that confine the page."""

import httpx

from morgana_devtools.processes import ApiProcess


def test_served_with_a_confining_content_security_policy(playground_api: ApiProcess) -> None:
    with httpx.Client(base_url=playground_api.url) as http:
        redirect = http.get("/playground")
        assert redirect.status_code == 307
        assert redirect.headers["location"].endswith("/playground/")

        page = http.get("/playground/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'"
        assert policy["script-src"] == "'self'"
        # The API itself, and the LiveKit server the token endpoint names (LIVEKIT_URL), nothing else.
        assert policy["connect-src"] == "'self' ws://127.0.0.1:7880 http://127.0.0.1:7880"
        assert policy["frame-ancestors"] == "'none'"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["permissions-policy"].startswith("microphone=(self)")
        # Same origin as the API: no CORS headers are needed, and none are sent.
        assert "access-control-allow-origin" not in page.headers

        script = http.get("/playground/playground.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert "content-security-policy" in script.headers
        assert http.get("/playground/missing.js").status_code == 404


def test_off_unless_enabled(api: ApiProcess) -> None:
    # The suite's shared API runs without PLAYGROUND_ENABLED, as a deployment does by default.
    with httpx.Client(base_url=api.url) as http:
        assert http.get("/playground/").status_code == 404
        assert http.get("/playground/playground.js").status_code == 404
