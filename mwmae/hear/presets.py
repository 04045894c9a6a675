"""Named sets of HEAR tasks (``--preset``) and the names the paper's table gives them."""

from __future__ import annotations

# HEAR 2021's tasks as the paper's table names them, by their HEAR task folder names.
# "demo": the one task of the demo (scripts/demo.sh).
PRESETS: dict[str, dict[str, str]] = {"demo": {"mwmae_digits": "Spoken digits"}, "hear2021": {
    "beijing_opera-v1.0-hear2021-full": "Beijing Opera",
    "tfds_crema_d-1.0.0-full": "CREMA-D",
    "esc50-v2.0.0-full": "ESC-50",
    "libricount-v1.0.0-hear2021-full": "LibriCount",
    "mridangam_stroke-v1.5-full": "Mridangam Stroke",
    "mridangam_tonic-v1.5-full": "Mridangam Tonic",
    "nsynth_pitch-v2.2.3-5h": "NSynth Pitch 5h",
    "speech_commands-v0.0.2-5h": "Speech Commands 5h",
    "fsd50k-v1.0-full": "FSD50K",
    "vox_lingua_top10-hear2021-full": "VoxLingua107 top 10",
}}


def task_labels() -> dict[str, str]:
    """{HEAR task folder: the name tables print} over every preset."""
    return {t: label for preset in PRESETS.values() for t, label in preset.items()}
