"""``python -m morgana_devtools.openai_server [--port 0 ...]``: run the server (see ``--help``)."""

from morgana_devtools.openai_server.server import main

if __name__ == "__main__":
    main()
