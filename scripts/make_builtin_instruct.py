"""Write lmtune/datasets/instruct.jsonl: the built-in instruction-tuning dataset (written for lmtune).

Five small task families whose answers follow rules (so a held-out split measures whether the rule was
learned): numbers in words, alphabetical sorting, extracting a city, summarizing a two-aspect product
review, and English plurals. Every answer is computed by the rules below, not typed in. Run from the
repository root: ``python scripts/make_builtin_instruct.py``.
"""

import json
import random
from pathlib import Path

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    """Cardinal number in US English words, 0-999, without 'and' ('three hundred twelve')."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + words(rest))


WORDS = ("apple river candle mountain zebra lantern orange violin garden pencil meadow harbor basket copper "
         "falcon island jacket kettle lemon marble needle ocean pepper quilt rocket saddle tiger umbrella velvet "
         "window yellow anchor bridge cactus dolphin engine feather guitar hammer igloo jungle kiwi ladder "
         "magnet nickel oyster").split()

PEOPLE = "Maria Ahmed Lena Tom Priya Kenji Sofia Daniel Amara Lucas Ines Omar".split()
CITIES = ("Lisbon Nairobi Osaka Toronto Lima Oslo Cairo Dublin Hanoi Quito Vienna Perth Seville Krakow Accra "
          "Montreal Bergen Porto Kyoto Valencia").split()
FRAMES = ["{p} flew to {c} last spring to visit an old friend.",
          "After the conference in {c}, {p} took the night train home.",
          "{p} says the best coffee she ever had was in {c}.",
          "The package for {p} was shipped from a warehouse in {c}.",
          "Next month {p} starts a new job in {c}.",
          "{p} grew up in a small flat near the station in {c}.",
          "Our team met {p} at a museum in {c} during the holidays.",
          "The photos {p} posted were all taken in {c}."]

# aspect, positive clause, negative clause
ASPECTS = [("battery", "lasts for two full days", "dies before lunch"),
           ("screen", "is bright and sharp", "scratches far too easily"),
           ("speaker", "sounds loud and clear", "crackles at any volume"),
           ("camera", "takes lovely photos in low light", "gives blurry pictures"),
           ("keyboard", "feels firm and quiet", "has keys that stick"),
           ("price", "is very fair for what you get", "is much too high"),
           ("delivery", "arrived a day early", "took three weeks"),
           ("case", "feels solid and well made", "cracked within a week"),
           ("charger", "works quickly", "stopped working after a month"),
           ("software", "runs smoothly", "crashes every day")]

IRREGULAR = {"child": "children", "mouse": "mice", "tooth": "teeth", "foot": "feet", "person": "people",
             "woman": "women", "man": "men", "goose": "geese", "leaf": "leaves", "knife": "knives",
             "wolf": "wolves", "shelf": "shelves", "sheep": "sheep", "fish": "fish", "ox": "oxen"}
REGULAR = ("box church city baby key toy bus dish glass fox lady story day boy tomato potato hero bench watch brush "
           "cherry party valley wish class table chair door cloud river horse house pen cup").split()


def plural(word: str) -> str:
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word in ("tomato", "potato", "hero"):
        return word + "es"
    return word + "s"


def main(n_per_task: int = 48, n_test: int = 12, seed: int = 7) -> None:
    rng = random.Random(seed)
    families = {}

    nums = rng.sample(range(1, 1000), n_per_task)
    families["numbers"] = [{"instruction": "Write the number in words.", "input": str(n), "output": words(n)}
                           for n in nums]

    recs = []
    for _ in range(n_per_task):
        ws = rng.sample(WORDS, rng.randint(3, 6))
        recs.append({"instruction": "Sort these words alphabetically. Answer with the words separated by commas.",
                     "input": ", ".join(ws), "output": ", ".join(sorted(ws))})
    families["sort"] = recs

    recs = []
    for _ in range(n_per_task):
        p, c, f = rng.choice(PEOPLE), rng.choice(CITIES), rng.choice(FRAMES)
        recs.append({"instruction": "Which city is mentioned in the sentence? Answer with the city name only.",
                     "input": f.format(p=p, c=c), "output": c})
    families["extract"] = recs

    recs = []
    for _ in range(n_per_task):
        (a1, good, _), (a2, _, bad) = rng.sample(ASPECTS, 2)
        if rng.random() < 0.5:
            review, out = f"The {a1} {good}, but the {a2} {bad}.", f"Good {a1}, poor {a2}."
            alt = f"The {a1} is good but the {a2} is poor."
        else:
            review, out = f"The {a2} {bad}, although the {a1} {good}.", f"Poor {a2}, good {a1}."
            alt = f"The {a2} is poor but the {a1} is good."
        recs.append({"instruction": "Summarize the product review in a few words.", "input": review,
                     "output": out, "references": [out, alt]})
    families["summary"] = recs

    nouns = rng.sample(sorted(IRREGULAR) + REGULAR, n_per_task)
    families["plural"] = [{"instruction": "Give the plural of the noun.", "input": w, "output": plural(w)}
                          for w in nouns]

    rows = []
    for task, recs in families.items():
        for i, r in enumerate(recs):
            rows.append({"id": f"{task}-{i + 1:02d}", "task": task, **r,
                         "split": "test" if i >= len(recs) - n_test else "train"})
    out = Path(__file__).resolve().parents[1] / "lmtune" / "datasets" / "instruct.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} records to {out}")


if __name__ == "__main__":
    main()
