"""Synthetic (note -> sentence) pairs in the shorthand notation, any number of them, all unique.

    python bench/synth.py 1000000 pairs-1m.parquet

Each pair combines a subject, an action, an object, a place and a time, and optionally a degree,
negation, question or urgency operator; a fixed-width code derived from the row number keeps every note and
sentence unique without texts growing longer as the row count grows. The texts are plausible, not
literature: they exist to measure scale, not quality.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pandas as pd

NAMES = ["Ada", "Bram", "Cleo", "Dov", "Esme", "Fitz", "Gail", "Hugo", "Ines", "Jory", "Kai", "Lena", "Milo",
         "Nell", "Otto", "Pia", "Quin", "Rhea", "Saul", "Tove", "Ugo", "Vera", "Wim", "Xan", "Yael", "Zeno"]
ACTIONS = [("see", "saw", "see"), ("fnd", "found", "find"), ("hid", "hid", "hide"), ("opn", "opened", "open"),
           ("chk", "checked", "check"), ("mak", "built", "build"), ("red", "read", "read"),
           ("giv", "gave away", "give away"), ("los", "lost", "lose"), ("lok", "looked at", "look at")]
OBJECTS = [("dor", "the door"), ("sh", "the ship"), ("gat", "the gate"), ("twr", "the tower"), ("wea", "the weapon"),
           ("mac*com", "the ship's computer"), ("fis", "the fish"), ("sto", "the stone"), ("fir", "the fire")]
PLACES = [("riv", "by the river"), ("cit", "in the city"), ("pla", "on the planet"), ("hom", "at home"),
          ("wat", "near the water"), ("gap", "in the crack")]
DEGREES = [("0.2", "barely"), ("0.5", "half"), ("1", "completely")]


def pair(row: int, rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    (verb, past, base), (obj, thing), (place, where) = rng.choice(ACTIONS), rng.choice(OBJECTS), rng.choice(PLACES)
    hour = row % 24
    # A fixed-width code unique per row (7919 is coprime with 10**7): text lengths do not grow with the
    # number of rows, so 10k and 1M pairs cost the same per step.
    day = f"{(row * 7919) % 10_000_000:07d}"
    note = f"{name} {verb} {obj} @ {place} | day {day} {hour} hou"
    sentence = f"{name} {past} {thing} {where} at hour {hour} of day {day}."
    roll = rng.random()
    if roll < 0.15:
        note, sentence = f"{name} ¬ {note[len(name) + 1:]}", sentence.replace(past, f"did not {base}", 1)
    elif roll < 0.3:
        value, word = rng.choice(DEGREES)
        note, sentence = f"{note} | fea^{value}", f"{sentence} {name} was {word} afraid."
    elif roll < 0.4:
        note, sentence = f"{note} ?", f"Had {name} really done it? {sentence}"
    return note, sentence


def generate(count: int, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    notes, sentences = zip(*(pair(row, rng) for row in range(count)), strict=True)
    return pd.DataFrame({"sentence_0": notes, "sentence_1": sentences})


if __name__ == "__main__":
    count, out = int(sys.argv[1]), Path(sys.argv[2])
    frame = generate(count)
    frame.to_parquet(out, index=False) if out.suffix == ".parquet" else frame.to_json(out, orient="records", lines=True)
    print(f"{len(frame)} pairs -> {out}")
