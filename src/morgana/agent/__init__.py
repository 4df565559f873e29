"""The Morgana voice agent worker: LiveKit rooms in, the Morgana API's chat out, speech back."""
