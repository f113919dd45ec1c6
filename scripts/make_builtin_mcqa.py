"""Write lmtune/datasets/mcqa.jsonl: the built-in four-choice question set (written for lmtune).

Six subjects of 18 questions each, in the layout of MMLU (``question``, ``choices``, ``answer`` letter,
``subject``) plus ``split``: the first 5 questions of each subject are the ``dev`` split (the k-shot
examples), the other 13 the ``test`` split. The questions are school-level general knowledge, written
for this project and not drawn from MMLU or any other dataset; arithmetic answers and their distractors
are computed here, not typed in. The correct answers are spread evenly over the letters A-D within each
subject and split (the test split holds 19 or 20 of each letter), so always answering one letter scores
about 25%.

Run from the repository root: ``python scripts/make_builtin_mcqa.py``.
"""

import json
import random
from pathlib import Path

LETTERS = "ABCD"

# (question, correct answer, three wrong answers)
GEOGRAPHY = [
    ("What is the capital of France?", "Paris", ["Lyon", "Marseille", "Nice"]),
    ("Which is the largest ocean on Earth?", "the Pacific Ocean", ["the Atlantic Ocean", "the Indian Ocean",
                                                                   "the Arctic Ocean"]),
    ("On which continent is Egypt?", "Africa", ["Asia", "Europe", "South America"]),
    ("Which river flows through London?", "the Thames", ["the Seine", "the Danube", "the Rhine"]),
    ("What is the capital of Japan?", "Tokyo", ["Osaka", "Kyoto", "Hiroshima"]),
    ("What is the capital of Italy?", "Rome", ["Milan", "Venice", "Naples"]),
    ("What is the longest river in South America?", "the Amazon", ["the Orinoco", "the Parana", "the Magdalena"]),
    ("What is the capital of Australia?", "Canberra", ["Sydney", "Melbourne", "Perth"]),
    ("Which is the largest country in the world by area?", "Russia", ["Canada", "China", "Brazil"]),
    ("In which mountain range is Mount Everest?", "the Himalayas", ["the Andes", "the Alps", "the Rocky Mountains"]),
    ("What is the capital of Spain?", "Madrid", ["Barcelona", "Seville", "Valencia"]),
    ("Which is the largest hot desert in the world?", "the Sahara", ["the Gobi", "the Kalahari", "the Atacama"]),
    ("On which continent is Brazil?", "South America", ["Africa", "Europe", "Asia"]),
    ("What is the capital of Canada?", "Ottawa", ["Toronto", "Vancouver", "Montreal"]),
    ("Which of these countries is an island?", "Iceland", ["Austria", "Bolivia", "Chad"]),
    ("What is the capital of Germany?", "Berlin", ["Munich", "Hamburg", "Frankfurt"]),
    ("Which ocean lies between Africa and Australia?", "the Indian Ocean", ["the Atlantic Ocean", "the Arctic Ocean",
                                                                           "the Pacific Ocean"]),
    ("The Great Lakes lie on the border between the United States and which country?", "Canada",
     ["Mexico", "Cuba", "Brazil"]),
]

BIOLOGY = [
    ("Which organ pumps blood around the human body?", "the heart", ["the lungs", "the liver", "the kidneys"]),
    ("Which gas do plants take in from the air to make their food?", "carbon dioxide",
     ["oxygen", "nitrogen", "helium"]),
    ("How many legs does an insect have?", "six", ["four", "eight", "ten"]),
    ("What is the basic unit of all living things?", "the cell", ["the atom", "the molecule", "the organ"]),
    ("Which part of a plant takes up water from the soil?", "the roots", ["the leaves", "the flowers", "the seeds"]),
    ("What do bees collect from flowers to make honey?", "nectar", ["seeds", "leaves", "bark"]),
    ("Which blood cells carry oxygen around the body?", "red blood cells",
     ["white blood cells", "platelets", "fat cells"]),
    ("A whale is a kind of what?", "mammal", ["fish", "reptile", "amphibian"]),
    ("In which organs does a human take oxygen into the blood?", "the lungs",
     ["the stomach", "the liver", "the kidneys"]),
    ("Where is most of the DNA in an animal cell?", "in the nucleus",
     ["in the cell membrane", "in the vacuole", "in the ribosomes"]),
    ("What are animals that eat only plants called?", "herbivores", ["carnivores", "omnivores", "predators"]),
    ("Which vitamin does human skin make in sunlight?", "vitamin D", ["vitamin C", "vitamin A", "vitamin K"]),
    ("How many chambers does the human heart have?", "four", ["two", "three", "six"]),
    ("Which of these animals is an amphibian?", "the frog", ["the snake", "the lizard", "the turtle"]),
    ("What is the largest organ of the human body?", "the skin", ["the liver", "the brain", "the heart"]),
    ("What is the change from caterpillar to butterfly called?", "metamorphosis",
     ["photosynthesis", "digestion", "pollination"]),
    ("Which green pigment lets plants capture light?", "chlorophyll", ["hemoglobin", "melanin", "keratin"]),
    ("Which organ makes insulin?", "the pancreas", ["the liver", "the stomach", "the lungs"]),
]

PHYSICS = [
    ("Which force pulls objects towards the Earth?", "gravity", ["friction", "magnetism", "buoyancy"]),
    ("What is the unit of electric current?", "the ampere", ["the volt", "the watt", "the ohm"]),
    ("At sea level, at what temperature in degrees Celsius does pure water boil?", "100", ["0", "50", "200"]),
    ("What is the unit of force?", "the newton", ["the joule", "the pascal", "the watt"]),
    ("In which of these does light travel fastest?", "a vacuum", ["water", "glass", "diamond"]),
    ("What is the unit of energy?", "the joule", ["the newton", "the ampere", "the hertz"]),
    ("Which colour of visible light has the longest wavelength?", "red", ["blue", "violet", "green"]),
    ("Through which of these can sound not travel?", "a vacuum", ["water", "air", "steel"]),
    ("When liquid water freezes into ice, what happens to its volume?", "it increases",
     ["it decreases", "it stays exactly the same", "it drops to zero"]),
    ("Which of these metals does a magnet attract?", "iron", ["copper", "aluminium", "gold"]),
    ("What is the unit of frequency?", "the hertz", ["the volt", "the kelvin", "the newton"]),
    ("What is the energy an object has because it is moving called?", "kinetic energy",
     ["potential energy", "chemical energy", "nuclear energy"]),
    ("About how fast does light travel in a vacuum?", "300,000 kilometres per second",
     ["300 kilometres per second", "3,000 kilometres per second", "30 kilometres per second"]),
    ("Which instrument measures temperature?", "a thermometer", ["a barometer", "an ammeter", "an odometer"]),
    ("What is the bending of light as it passes from air into water called?", "refraction",
     ["reflection", "absorption", "evaporation"]),
    ("Which particle has a negative electric charge?", "the electron", ["the proton", "the neutron", "the photon"]),
    ("What is the unit of electrical resistance?", "the ohm", ["the volt", "the ampere", "the watt"]),
    ("An object floats in water when it is what?", "less dense than water",
     ["denser than water", "heavier than one kilogram", "made of metal"]),
]

ENGLISH = [
    ("Which word means the opposite of \"ancient\"?", "modern", ["old", "historic", "aged"]),
    ("Which word means the same as \"happy\"?", "joyful", ["angry", "tired", "hungry"]),
    ("What is the plural of \"child\"?", "children", ["childs", "childes", "childrens"]),
    ("Which word means \"very big\"?", "enormous", ["tiny", "narrow", "brief"]),
    ("What is the past tense of \"go\"?", "went", ["goed", "going", "goes"]),
    ("Which word means the opposite of \"generous\"?", "selfish", ["kind", "gentle", "honest"]),
    ("Which word names a person who writes books?", "author", ["pilot", "baker", "surgeon"]),
    ("Which word means the same as \"quick\"?", "fast", ["slow", "heavy", "quiet"]),
    ("Which word means the opposite of \"empty\"?", "full", ["hollow", "bare", "vacant"]),
    ("Which word describes something that cannot be seen?", "invisible", ["audible", "edible", "portable"]),
    ("Which word means \"to look at something carefully\"?", "examine", ["ignore", "forget", "throw"]),
    ("What does \"frigid\" mean?", "very cold", ["very hot", "very loud", "very fast"]),
    ("Which of these words is an adverb?", "quickly", ["table", "beautiful", "apple"]),
    ("Which word means the same as \"begin\"?", "start", ["finish", "stop", "end"]),
    ("What is the plural of \"mouse\", the animal?", "mice", ["mouses", "meese", "mousen"]),
    ("Which word means the opposite of \"brave\"?", "cowardly", ["bold", "strong", "fearless"]),
    ("What is a word that means the same as another word called?", "a synonym",
     ["an antonym", "a homophone", "an acronym"]),
    ("What is a large group of fish swimming together called?", "a school", ["a flock", "a herd", "a pack"]),
]

COMPUTING = [
    ("What does \"CPU\" stand for?", "central processing unit",
     ["computer power unit", "central program utility", "control panel unit"]),
    ("How many bits are in a byte?", "8", ["4", "10", "16"]),
    ("Which of these is an input device?", "a keyboard", ["a monitor", "a printer", "a speaker"]),
    ("What does \"RAM\" stand for?", "random access memory",
     ["read all memory", "rapid action module", "run any machine"]),
    ("Which number system uses only the digits 0 and 1?", "binary", ["decimal", "hexadecimal", "octal"]),
    ("What is the binary number 101 in decimal?", str(0b101), ["3", "4", "6"]),
    ("Which of these is a programming language?", "Python", ["Firefox", "Linux", "Bluetooth"]),
    ("Which program is used to view web pages?", "a web browser",
     ["a compiler", "a spreadsheet", "a word processor"]),
    ("What does \"URL\" stand for?", "uniform resource locator",
     ["universal routing link", "user record list", "unified response language"]),
    ("Which of these keeps its data when the computer is switched off?", "a hard disk",
     ["RAM", "the CPU cache", "a CPU register"]),
    ("In Python, which operator tests whether two values are equal?", "==", ["=", ":=", "=>"]),
    ("What is the hexadecimal digit F in decimal?", str(0xF), ["10", "14", "16"]),
    ("Which company makes the Windows operating system?", "Microsoft", ["Apple", "Google", "IBM"]),
    ("What does \"AI\" stand for in computing?", "artificial intelligence",
     ["automatic input", "advanced internet", "analog interface"]),
    ("Which of these is an operating system?", "Linux", ["Photoshop", "JavaScript", "Wikipedia"]),
    ("What is the main circuit board of a computer called?", "the motherboard",
     ["the keyboard", "the dashboard", "the switchboard"]),
    ("What does \"HTML\" stand for?", "HyperText Markup Language",
     ["High Transfer Machine Language", "Home Tool Markup Language", "Hyperlink Text Management Logic"]),
    ("Which key combination copies the selection in most Windows programs?", "Ctrl+C",
     ["Ctrl+V", "Ctrl+Z", "Ctrl+P"]),
]

# Arithmetic: (a, operator word, b); the answer is computed, the distractors are near misses.
ARITHMETIC_ITEMS = [(7, "plus", 5), (15, "minus", 6), (6, "times", 4), (20, "divided by", 5), (9, "plus", 8),
                    (12, "minus", 7), (3, "times", 9), (18, "divided by", 3), (25, "plus", 17), (40, "minus", 15),
                    (8, "times", 7), (56, "divided by", 8), (100, "minus", 1), (11, "times", 11), (14, "plus", 29),
                    (81, "divided by", 9), (7, "times", 6), (63, "minus", 28)]
OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b,
       "divided by": lambda a, b: a // b}


def arithmetic(rng: random.Random) -> list:
    out = []
    for a, op, b in ARITHMETIC_ITEMS:
        if op == "divided by":
            assert a % b == 0, (a, b)
        value = OPS[op](a, b)
        pool = [value + d for d in (-10, -2, -1, 1, 2, 10) if value + d > 0]
        wrong = rng.sample(pool, 3)
        out.append((f"What is {a} {op} {b}?", str(value), [str(w) for w in wrong]))
    return out


def main() -> None:
    rng = random.Random(20260805)
    subjects = {"arithmetic": arithmetic(rng), "geography": GEOGRAPHY, "biology": BIOLOGY, "physics": PHYSICS,
                "english_vocabulary": ENGLISH, "computing": COMPUTING}
    rows = []
    for subject, items in subjects.items():
        assert len(items) == 18, (subject, len(items))
        # Letters balanced within each split (dev 5, test 13); the extra letter rotates over subjects.
        offset = len(rows) // len(items)
        dev, test = [(offset + i) % 4 for i in range(5)], [(offset + i) % 4 for i in range(13)]
        rng.shuffle(dev)
        rng.shuffle(test)
        positions = dev + test
        for i, ((question, right, wrong), pos) in enumerate(zip(items, positions)):
            assert len(wrong) == 3 and right not in wrong and len(set(wrong)) == 3, question
            choices = list(wrong)
            rng.shuffle(choices)
            choices.insert(pos, right)
            rows.append({"id": f"{subject}-{i + 1:02d}", "subject": subject, "question": question,
                         "choices": choices, "answer": LETTERS[pos], "split": "dev" if i < 5 else "test"})
    out = Path(__file__).resolve().parent.parent / "lmtune" / "datasets" / "mcqa.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} questions to {out}")


if __name__ == "__main__":
    main()
