"""Friendly, human-readable session names such as "Curious-Otter-482"."""

import secrets

_ADJECTIVES = (
    "Bright",
    "Calm",
    "Clever",
    "Cosy",
    "Curious",
    "Daring",
    "Eager",
    "Friendly",
    "Gentle",
    "Happy",
    "Jolly",
    "Kind",
    "Lively",
    "Lucky",
    "Merry",
    "Nimble",
    "Patient",
    "Playful",
    "Quick",
    "Quiet",
    "Sunny",
    "Swift",
    "Witty",
    "Zesty",
)
_NOUNS = (
    "Badger",
    "Chat",
    "Comet",
    "Falcon",
    "Fox",
    "Harbor",
    "Heron",
    "Lantern",
    "Maple",
    "Meadow",
    "Otter",
    "Owl",
    "Panda",
    "Pebble",
    "River",
    "Robin",
    "Sparrow",
    "Star",
    "Thistle",
    "Willow",
)


def friendly_name() -> str:
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.randbelow(900) + 100}"
